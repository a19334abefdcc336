// test_adapter_peers.c: the peer adapters (PRoLoRA, VeRA, Tied-LoRA, ShareLoRA, SiRA): hand-computed
// factors, the structure each method's spec implies (what is shared, sliced, rotated, truncated),
// initializations, finite-difference gradients through the engine's entry points (every parameter and
// the input, dropout on), SiRA's routing (top-k, capacity, expert dropout) by hand, the special cases
// that must equal LoRA, parameter counts of Llama-2-7B against shared/docs/MOS.md section 5,
// constraint errors, and adapter.mos round trips.
#include <stdint.h>

#include "core/adapter.h"
#include "core/config.h"
#include "core/fileio.h"
#include "core/model.h"
#include "core/rng.h"
#include "tests/test_util.h"

static llama_config tiny_model(int hidden, int inter, int layers, int heads, int kv, int head_dim) {
    llama_config m;
    memset(&m, 0, sizeof m);
    snprintf(m.model_type, sizeof m.model_type, "llama");
    m.hidden = hidden;
    m.intermediate = inter;
    m.n_layers = layers;
    m.n_heads = heads;
    m.n_kv_heads = kv;
    m.head_dim = head_dim;
    m.vocab = 32;
    return m;
}

// q 8->8, k/v 8->4, o 8->8, gate/up 8->12, down 12->8 (GQA, so the widths differ).
static llama_config small_model(void) { return tiny_model(8, 12, 3, 2, 1, 4); }

static llama_config load_fixture(const char *name) {
    char p[256];
    snprintf(p, sizeof p, "tests/fixtures/configs/%s", name);
    llama_config m;
    ck_assert_msg(llama_config_load(&m, p) == MOSFT_OK, "%s", mosft_error());
    return m;
}

static adapter_spec peer_spec(const char *method, int r) {
    mosft_config c;
    config_defaults(&c);
    adapter_spec s;
    adapter_spec_from_config(&s, &c);  // every knob at its default, then the method and rank
    config_free(&c);
    snprintf(s.method, sizeof s.method, "%s", method);
    s.r = r;
    s.alpha = 16;
    s.dropout = 0;
    s.seed = 7;
    for (int t = 0; t < MOD_COUNT; t++) s.targets[t] = 1;
    return s;
}

static uint64_t g_rng = 0x5eed;
static float frand(void) {  // uniform in [-1, 1)
    g_rng = rng_splitmix64(g_rng);
    return (float)((double)(g_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
static void fill_random(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = frand();
}

static adapter *make(const adapter_spec *s, const llama_config *m) {
    adapter *a = NULL;
    ck_assert_msg(adapter_create(&a, s, m) == MOSFT_OK, "%s: %s", s->method, mosft_error());
    return a;
}

static float *tensor(const adapter *a, const char *name) {
    adapter_tensor *t = adapter_find_tensor(a, name);
    ck_assert_msg(t != NULL, "tensor %s missing", name);
    return adapter_tensor_data(a, t);
}

// The factors of (layer, module) into fresh arrays.
static void build(const adapter *a, int layer, int module, float **A, float **B) {
    int di, dout;
    llama_module_dims(&a->model, module, &di, &dout);
    *A = malloc(sizeof(float) * a->rank * di);
    *B = malloc(sizeof(float) * dout * a->rank);
    a->ops->build(a, layer, module, *A, *B);
}

// Delta W of (layer, module) [d_out][d_in] = s B A, in double.
static double *delta_w(const adapter *a, int layer, int module) {
    int di, dout, r = a->rank;
    llama_module_dims(&a->model, module, &di, &dout);
    float *A, *B;
    build(a, layer, module, &A, &B);
    double *dw = malloc(sizeof(double) * dout * di);
    for (int o = 0; o < dout; o++)
        for (int c = 0; c < di; c++) {
            double acc = 0;
            for (int k = 0; k < r; k++) acc += (double)B[o * r + k] * A[k * di + c];
            dw[o * di + c] = a->scaling * acc;
        }
    free(A);
    free(B);
    return dw;
}

// ---- finite differences through the engine's entry points --------------------------------------

typedef struct {
    int T, training;
    float **x, **mask, **gy;  // [L*MOD_COUNT] each
} fd_data;

static double model_loss(const adapter *a, const fd_data *d) {
    const llama_config *m = &a->model;
    double l = 0;
    for (int i = 0; i < m->n_layers; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            if (!a->spec.targets[t]) continue;
            int di, dout, k = i * MOD_COUNT + t;
            llama_module_dims(m, t, &di, &dout);
            float *y = calloc((size_t)d->T * dout, sizeof(float));
            adapter_forward_cpu(a, i, t, d->T, d->x[k], d->mask[k], y, d->training, rng_key(RNG_DROPOUT, 1, 2, 3, (uint64_t)k));
            for (int e = 0; e < d->T * dout; e++) l += (double)d->gy[k][e] * y[e];
            free(y);
        }
    return l;
}

// Central difference of the loss in one float; returns 0 (and no difference) where the routing of a
// routed method changes between -step and +step: the loss jumps there and has no derivative.
static int central_diff(const adapter *a, const fd_data *d, float *v, float step, double l0, double *fd) {
    float keep = *v;
    *v = keep + step;
    double lp = model_loss(a, d);
    *v = keep - step;
    double lm = model_loss(a, d);
    *v = keep;
    *fd = (lp - lm) / (2.0 * step);
    // A smooth loss has |f(+h) - 2 f(0) + f(-h)| ~ f'' h^2; a routing flip jumps by O(1).
    return !a->ops->routed || fabs(lp - 2 * l0 + lm) < 1e3 * (double)step * step * (1 + fabs(l0));
}

// Random parameters (every factor nonzero), random inputs with dropout, then every parameter and the
// last layer's inputs against central differences. `step` 1 is exact for the multilinear low-rank
// methods; SiRA's gate is smooth but not linear, so it takes a small step and a looser tolerance, and
// skips the (rare) coordinates where the step changes the routing.
static void check_gradients(const adapter_spec *s, const llama_config *m, float step, double tol, int training) {
    adapter *a = make(s, m);
    fill_random(a->params, a->n_params);
    for (int b = 0; b < a->n_buffers; b++)  // frozen factors too (a frozen zero would hide a bug)
        if (a->buffers[b].dtype == MOSFT_F32) fill_random(a->buffers[b].data, a->buffers[b].nbytes / sizeof(float));
    int L = m->n_layers, n = L * MOD_COUNT;
    fd_data d = {5, training, calloc(n, sizeof(float *)), calloc(n, sizeof(float *)), calloc(n, sizeof(float *))};
    float **gx = calloc(n, sizeof(float *));
    float *grad = calloc(a->n_params, sizeof(float));
    for (int i = 0; i < L; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            if (!s->targets[t]) continue;
            int di, dout, k = i * MOD_COUNT + t;
            llama_module_dims(m, t, &di, &dout);
            d.x[k] = malloc(sizeof(float) * d.T * di);
            d.mask[k] = malloc(sizeof(float) * d.T * di);
            d.gy[k] = malloc(sizeof(float) * d.T * dout);
            gx[k] = calloc((size_t)d.T * di, sizeof(float));
            fill_random(d.x[k], (size_t)d.T * di);
            fill_random(d.gy[k], (size_t)d.T * dout);
            adapter_dropout_mask(rng_key(RNG_DROPOUT, 9, 0, 0, (uint64_t)k), 0.2f, (size_t)d.T * di, d.mask[k]);
            adapter_backward_cpu(a, i, t, d.T, d.x[k], d.mask[k], d.gy[k], gx[k], grad, d.training,
                                 rng_key(RNG_DROPOUT, 1, 2, 3, (uint64_t)k));
        }
    int checked = 0, kinks = 0, tried = 0;
    double l0 = model_loss(a, &d), fd;
    for (size_t p = 0; p < a->n_params; p++) {
        tried++;
        if (!central_diff(a, &d, &a->params[p], step, l0, &fd)) {
            kinks++;
            continue;
        }
        ck_assert_msg(fabs(fd - grad[p]) <= tol * (1.0 + fabs(fd)), "%s (r %d): parameter %zu: backward %.7g, finite difference %.7g",
                      s->method, s->r, p, grad[p], fd);
        checked += grad[p] != 0;
    }
    ck_assert_msg(checked > (int)a->n_params / 2, "%s: only %d of %zu gradients nonzero", s->method, checked, a->n_params);
    for (int t = 0; t < MOD_COUNT; t++) {
        int k = (L - 1) * MOD_COUNT + t, di, dout;
        if (!s->targets[t]) continue;
        llama_module_dims(m, t, &di, &dout);
        for (int e = 0; e < d.T * di; e++) {
            tried++;
            if (!central_diff(a, &d, &d.x[k][e], step, l0, &fd)) {
                kinks++;
                continue;
            }
            ck_assert_msg(fabs(fd - gx[k][e]) <= tol * (1.0 + fabs(fd)), "%s %s gx[%d]: backward %.7g, finite difference %.7g",
                          s->method, k_module_names[t], e, gx[k][e], fd);
        }
    }
    ck_assert_msg(kinks * 50 <= tried, "%s: the routing changed for %d of %d coordinates", s->method, kinks, tried);
    if (kinks) fprintf(stderr, "%s: %d of %d coordinates skipped (the step changes the routing)\n", s->method, kinks, tried);
    for (int k = 0; k < n; k++) free(d.x[k]), free(d.mask[k]), free(d.gy[k]), free(gx[k]);
    free(d.x), free(d.mask), free(d.gy), free(gx), free(grad);
    adapter_free(a);
}

START_TEST(test_fd_lowrank) {
    llama_config m = small_model();
    adapter_spec s;
    // PRoLoRA: rotation with truncation (d = 4, 8, 12 with m = 3: chunks of 2, 3, 4), unshared rows.
    s = peer_spec("prolora", 4), s.prolora_unshared_r = 1, s.prolora_reduce_a = 3, s.prolora_reduce_b = 2;
    check_gradients(&s, &m, 1.0f, 1e-4, 1);
    s = peer_spec("prolora", 3), s.prolora_unshared_r = 0, s.prolora_reduce_a = 5, s.prolora_reduce_b = 3;
    check_gradients(&s, &m, 1.0f, 1e-4, 1);
    s = peer_spec("prolora", 5), s.prolora_unshared_r = 1, s.prolora_reduce_a = 2, s.prolora_reduce_b = 4;  // strides 2, 1
    check_gradients(&s, &m, 1.0f, 1e-4, 1);
    s = peer_spec("prolora", 2), s.prolora_unshared_r = 2;  // all unshared: LoRA
    check_gradients(&s, &m, 1.0f, 1e-4, 1);
    s = peer_spec("vera", 3);
    check_gradients(&s, &m, 1.0f, 1e-4, 1);
    s = peer_spec("vera", 2), s.targets[MOD_DOWN] = 0, s.targets[MOD_Q] = 0;  // other slices of A and B
    check_gradients(&s, &m, 1.0f, 1e-4, 1);
    static const char *subsets[] = {"vBuA", "BA", "vu", "uA", "v", "B"};
    for (size_t i = 0; i < sizeof subsets / sizeof subsets[0]; i++) {
        s = peer_spec("tied_lora", 3);
        snprintf(s.tied_lora_trainable, sizeof s.tied_lora_trainable, "%s", subsets[i]);
        check_gradients(&s, &m, 1.0f, 1e-4, 1);
    }
    static const char *shares[] = {"A", "B", "AB", "qkv"};
    for (size_t i = 0; i < 4; i++) {
        s = peer_spec("sharelora", 2);
        snprintf(s.sharelora_share, sizeof s.sharelora_share, "%s", shares[i]);
        check_gradients(&s, &m, 1.0f, 1e-4, 1);
    }
    s = peer_spec("sharelora", 2), snprintf(s.sharelora_share, sizeof s.sharelora_share, "qkv");
    s.targets[MOD_Q] = 0;  // only k and v share the qkv A
    check_gradients(&s, &m, 1.0f, 1e-4, 1);
}
END_TEST

START_TEST(test_fd_sira) {
    llama_config m = tiny_model(6, 8, 2, 2, 1, 3);
    adapter_spec s = peer_spec("sira", 2);
    s.sira_experts = 3, s.sira_top_k = 2, s.sira_capacity_factor = 0.7, s.sira_expert_dropout = 0.3;
    check_gradients(&s, &m, 2e-3f, 2e-3, 1);  // training: capacity drops tokens, dropout on the gate
    check_gradients(&s, &m, 2e-3f, 2e-3, 0);  // eval: no dropout
    s.sira_experts = 4, s.sira_top_k = 1, s.sira_capacity_factor = 2;
    check_gradients(&s, &m, 2e-3f, 2e-3, 1);
}
END_TEST

// ---- PRoLoRA ---------------------------------------------------------------------------------------

START_TEST(test_prolora_hand) {
    // down_proj of hidden 3, intermediate 4: d_in = 4, d_out = 3; r = 2, u = 0, m = n = 2:
    // c_A = 2, c_B = 2 (the second B chunk is cut to 1 row), strides 1.
    llama_config m = tiny_model(3, 4, 1, 1, 1, 3);
    adapter_spec s = peer_spec("prolora", 2);
    memset(s.targets, 0, sizeof s.targets);
    s.targets[MOD_DOWN] = 1;
    s.prolora_unshared_r = 0, s.prolora_reduce_a = 2, s.prolora_reduce_b = 2;
    adapter *a = make(&s, &m);
    ck_assert_int_eq((int)a->n_params, 2 * 2 + 2 * 2);
    float *A0 = tensor(a, "prolora.layers.0.down.A0"), *B0 = tensor(a, "prolora.layers.0.down.B0");
    static const float a0[4] = {1, 2, 3, 4}, b0[4] = {5, 6, 7, 8};  // A0 [2][2], B0 [2][2] = B0[j][k]
    memcpy(A0, a0, sizeof a0);
    memcpy(B0, b0, sizeof b0);
    float A[2][4], B[3][2];
    a->ops->build(a, 0, MOD_DOWN, &A[0][0], &B[0][0]);
    // A[k][i*2 + j] = A0[(k + i) % 2][j];  B[i*2 + j][k] = B0[j][(k + i) % 2]
    static const float A_exp[2][4] = {{1, 2, 3, 4}, {3, 4, 1, 2}};
    static const float B_exp[3][2] = {{5, 6}, {7, 8}, {6, 5}};
    ck_assert_mem_eq(A, A_exp, sizeof A);
    ck_assert_mem_eq(B, B_exp, sizeof B);
    // Scatter is the transpose: ones everywhere count the copies of each chunk entry.
    float gA[2][4], gB[3][2], grad[8] = {0};
    for (int i = 0; i < 8; i++) (&gA[0][0])[i] = 1;
    for (int i = 0; i < 6; i++) (&gB[0][0])[i] = 1;
    a->ops->scatter(a, 0, MOD_DOWN, &gA[0][0], &gB[0][0], grad);
    static const float g_exp[8] = {2, 2, 2, 2, 2, 2, 1, 1};  // A0: each entry twice; B0 row j = 0 twice, j = 1 once
    ck_assert_mem_eq(grad, g_exp, sizeof g_exp);
    adapter_free(a);
    // r = 5, u = 1, m = 2, n = 3 on 4 -> 3: r' = 4, c_A = 2, c_B = 1, strides s_A = 2, s_B = 1; A_u is
    // the last row of A, B_u the last column of B.
    s.r = 5, s.prolora_unshared_r = 1, s.prolora_reduce_b = 3;
    a = make(&s, &m);
    ck_assert_int_eq((int)a->n_params, 4 * (2 + 1) + 1 * (4 + 3));
    fill_random(a->params, a->n_params);
    float *A0b = tensor(a, "prolora.layers.0.down.A0"), *Au = tensor(a, "prolora.layers.0.down.A_u"),
          *B0b = tensor(a, "prolora.layers.0.down.B0"), *Bu = tensor(a, "prolora.layers.0.down.B_u");
    float A2[5][4], B2[3][5];
    a->ops->build(a, 0, MOD_DOWN, &A2[0][0], &B2[0][0]);
    for (int k = 0; k < 4; k++)
        for (int c = 0; c < 4; c++) ck_assert(A2[k][c] == A0b[((k + (c / 2) * 2) % 4) * 2 + c % 2]);
    for (int c = 0; c < 4; c++) ck_assert(A2[4][c] == Au[c]);
    for (int o = 0; o < 3; o++) {
        for (int k = 0; k < 4; k++) ck_assert(B2[o][k] == B0b[(k + o) % 4]);  // B0 [1][4]: chunk row j = 0
        ck_assert(B2[o][4] == Bu[o]);
    }
    adapter_free(a);
}
END_TEST

// m = n = 1: no sharing inside the layer, PRoLoRA is LoRA of rank r from the same seed, bit for bit.
START_TEST(test_prolora_is_lora) {
    llama_config m = small_model();
    for (int u = 0; u <= 3; u += 3) {
        adapter_spec sp = peer_spec("prolora", 3), sl = peer_spec("lora", 3);
        sp.prolora_unshared_r = u, sp.prolora_reduce_a = sp.prolora_reduce_b = 1;
        adapter *p = make(&sp, &m), *l = make(&sl, &m);
        ck_assert_int_eq((int)p->n_params, (int)l->n_params);
        ck_assert(p->scaling == l->scaling);
        for (int i = 0; i < m.n_layers; i++)
            for (int t = 0; t < MOD_COUNT; t++) {
                float *Ap, *Bp, *Al, *Bl;
                int di, dout;
                llama_module_dims(&m, t, &di, &dout);
                build(p, i, t, &Ap, &Bp);
                build(l, i, t, &Al, &Bl);
                ck_assert_msg(!memcmp(Ap, Al, sizeof(float) * 3 * di), "u=%d layer %d %s: A differs from LoRA", u, i,
                              k_module_names[t]);
                ck_assert(!memcmp(Bp, Bl, sizeof(float) * 3 * dout));
                free(Ap), free(Bp), free(Al), free(Bl);
            }
        adapter_free(p);
        adapter_free(l);
    }
}
END_TEST

START_TEST(test_prolora_init) {
    llama_config m = load_fixture("llama2-7b");
    adapter_spec s = peer_spec("prolora", 4);
    s.prolora_unshared_r = 1, s.prolora_reduce_a = s.prolora_reduce_b = 2;
    memset(s.targets, 0, sizeof s.targets);
    s.targets[MOD_DOWN] = 1;
    adapter *a = make(&s, &m);
    ck_assert_int_eq((int)adapter_find_tensor(a, "prolora.layers.5.down.A0")->shape[1], 5504);
    ck_assert_int_eq((int)adapter_find_tensor(a, "prolora.layers.5.down.B0")->shape[0], 2048);
    // Rectified: the bound is 1/sqrt(11008) (the full d_in), not 1/sqrt(5504).
    double bound = 1.0 / sqrt(11008.0), sq = 0;
    size_t n = 0;
    for (int i = 0; i < a->n_tensors; i++) {
        const adapter_tensor *t = &a->tensors[i];
        const float *p = adapter_tensor_data(a, t);
        int is_a = strstr(t->name, ".A0") || strstr(t->name, ".A_u");
        for (size_t e = 0; e < t->numel; e++) {
            if (!is_a) {
                ck_assert(p[e] == 0.0f);
                continue;
            }
            ck_assert(fabs(p[e]) <= bound * (1 + 1.0 / 256) && bf16_round(p[e]) == p[e]);
            sq += (double)p[e] * p[e], n++;
        }
    }
    ck_assert_msg(fabs(sq / n / (bound * bound / 3) - 1) < 0.02, "variance %g vs %g", sq / n, bound * bound / 3);
    adapter_free(a);
}
END_TEST

// ---- VeRA ------------------------------------------------------------------------------------------

START_TEST(test_vera_structure) {
    llama_config m = small_model();
    adapter_spec s = peer_spec("vera", 3);
    s.vera_d_initial = 0.25;
    s.vera_projection_seed = 11;
    adapter *a = make(&s, &m);
    ck_assert(a->scaling == 1.0f && a->rank == 3);
    adapter_buffer *ba = adapter_find_buffer(a, "vera.A"), *bb = adapter_find_buffer(a, "vera.B");
    ck_assert(ba && bb);
    // The largest widths of the adapted types: d_in 12 (down), d_out 12 (gate/up).
    ck_assert(ba->shape[0] == 3 && ba->shape[1] == 12 && bb->shape[0] == 12 && bb->shape[1] == 3);
    float *PA = ba->data, *PB = bb->data;
    for (int e = 0; e < 36; e++) {
        ck_assert(fabs(PA[e]) <= sqrt(6.0 / 12) && fabs(PB[e]) <= sqrt(6.0 / 3));
        ck_assert(PA[e] != 0 && PB[e] != 0);
    }
    for (int i = 0; i < m.n_layers; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            char name[64];
            snprintf(name, sizeof name, "vera.layers.%d.%s.lambda_d", i, k_module_names[t]);
            for (int k = 0; k < 3; k++) ck_assert(tensor(a, name)[k] == 0.25f);
            snprintf(name, sizeof name, "vera.layers.%d.%s.lambda_b", i, k_module_names[t]);
            int di, dout;
            llama_module_dims(&m, t, &di, &dout);
            for (int o = 0; o < dout; o++) ck_assert(tensor(a, name)[o] == 0.0f);
        }
    // Factors: diag(d) A[:, :d_in], diag(b) B[:d_out, :].
    fill_random(a->params, a->n_params);
    float *A, *B;
    build(a, 1, MOD_K, &A, &B);  // k: 8 -> 4
    float *ld = tensor(a, "vera.layers.1.k.lambda_d"), *lb = tensor(a, "vera.layers.1.k.lambda_b");
    for (int k = 0; k < 3; k++)
        for (int c = 0; c < 8; c++) ck_assert(A[k * 8 + c] == ld[k] * PA[k * 12 + c]);
    for (int o = 0; o < 4; o++)
        for (int k = 0; k < 3; k++) ck_assert(B[o * 3 + k] == lb[o] * PB[o * 3 + k]);
    free(A), free(B);
    // The projections depend on vera_projection_seed only, not on adapter.seed or the targets' order.
    adapter_spec s2 = s;
    s2.seed = 99;
    s2.targets[MOD_K] = 0;
    adapter *a2 = make(&s2, &m);
    ck_assert_mem_eq(adapter_find_buffer(a2, "vera.A")->data, PA, 36 * sizeof(float));
    ck_assert_mem_eq(adapter_find_buffer(a2, "vera.B")->data, PB, 36 * sizeof(float));
    adapter_free(a2);
    s2 = s;
    s2.vera_projection_seed = 12;
    a2 = make(&s2, &m);
    ck_assert(memcmp(adapter_find_buffer(a2, "vera.A")->data, PA, 36 * sizeof(float)) != 0);
    adapter_free(a2);
    adapter_free(a);
}
END_TEST

START_TEST(test_vera_init_distribution) {
    llama_config m = load_fixture("llama2-7b");
    adapter_spec s = peer_spec("vera", 256);
    adapter *a = make(&s, &m);
    // kaiming-uniform with gain sqrt(2): U(+-sqrt(6 / fan_in)), variance 2 / fan_in; fan_in 11008 for A
    // [256][11008], 256 for B [11008][256].
    const adapter_buffer *ba = adapter_find_buffer(a, "vera.A"), *bb = adapter_find_buffer(a, "vera.B");
    ck_assert(ba->shape[1] == 11008 && bb->shape[0] == 11008);
    for (int w = 0; w < 2; w++) {
        const adapter_buffer *b = w ? bb : ba;
        double fan = w ? 256 : 11008, bound = sqrt(6.0 / fan), sum = 0, sq = 0;
        size_t n = b->nbytes / 4;
        const float *p = b->data;
        for (size_t e = 0; e < n; e++) {
            ck_assert(fabs(p[e]) <= bound);
            sum += p[e], sq += (double)p[e] * p[e];
        }
        ck_assert_msg(fabs(sum / n) < 0.01 * bound && fabs(sq / n / (2.0 / fan) - 1) < 0.01, "%s: mean %g var %g", b->name,
                      sum / n, sq / n);
    }
    ck_assert_int_eq((int64_t)a->n_params, 1417216);
    adapter_free(a);
}
END_TEST

// ---- Tied-LoRA ---------------------------------------------------------------------------------------

START_TEST(test_tied_lora) {
    llama_config m = small_model();
    adapter_spec s = peer_spec("tied_lora", 3);
    adapter *a = make(&s, &m);
    ck_assert(a->scaling == 16.0f / 3);
    // All trainable: A is LoRA's layer-0 A, B = 0, u = v = 1.
    adapter_spec sl = peer_spec("lora", 3);
    adapter *l = make(&sl, &m);
    for (int t = 0; t < MOD_COUNT; t++) {
        char name[64];
        int di, dout;
        llama_module_dims(&m, t, &di, &dout);
        snprintf(name, sizeof name, "tied_lora.%s.A", k_module_names[t]);
        char ln[64];
        snprintf(ln, sizeof ln, "lora.layers.0.%s.A", k_module_names[t]);
        ck_assert_mem_eq(tensor(a, name), tensor(l, ln), sizeof(float) * 3 * di);
        snprintf(name, sizeof name, "tied_lora.%s.u", k_module_names[t]);
        for (int e = 0; e < 3 * 3; e++) ck_assert(tensor(a, name)[e] == 1.0f);
        snprintf(name, sizeof name, "tied_lora.%s.v", k_module_names[t]);
        for (int e = 0; e < 3 * dout; e++) ck_assert(tensor(a, name)[e] == 1.0f);
        snprintf(name, sizeof name, "tied_lora.%s.B", k_module_names[t]);
        for (int e = 0; e < 3 * dout; e++) ck_assert(tensor(a, name)[e] == 0.0f);
    }
    adapter_free(l);
    // Factors: diag(u_i) A and diag(v_i) B; A and B tied across layers.
    fill_random(a->params, a->n_params);
    float *A, *B;
    build(a, 2, MOD_UP, &A, &B);  // 8 -> 12
    float *As = tensor(a, "tied_lora.up.A"), *Bs = tensor(a, "tied_lora.up.B"), *u = tensor(a, "tied_lora.up.u"),
          *v = tensor(a, "tied_lora.up.v");
    for (int k = 0; k < 3; k++)
        for (int c = 0; c < 8; c++) ck_assert(A[k * 8 + c] == u[2 * 3 + k] * As[k * 8 + c]);
    for (int o = 0; o < 12; o++)
        for (int k = 0; k < 3; k++) ck_assert(B[o * 3 + k] == v[2 * 12 + o] * Bs[o * 3 + k]);
    free(A), free(B);
    adapter_free(a);
}
END_TEST

// Every trainable subset: frozen parts are buffers (saved, not counted), Delta W = 0 at init, and a few
// SGD steps give every trainable part a nonzero gradient (never stuck at 0).
START_TEST(test_tied_lora_subsets) {
    llama_config m = small_model();
    static const char letters[4] = {'v', 'B', 'u', 'A'};
    for (int mask = 1; mask < 16; mask++) {
        adapter_spec s = peer_spec("tied_lora", 2);
        char tr[8] = "";
        int n = 0;
        for (int b = 0; b < 4; b++)
            if (mask >> b & 1) tr[n++] = letters[b];
        snprintf(s.tied_lora_trainable, sizeof s.tied_lora_trainable, "%s", tr);
        adapter *a = make(&s, &m);
        ck_assert_int_eq(a->n_tensors + a->n_buffers, 4 * MOD_COUNT);
        ck_assert_int_eq(a->n_tensors, n * MOD_COUNT);
        ck_assert_int_eq((int64_t)a->n_params, adapter_param_count(&s, &m));
        for (int t = 0; t < MOD_COUNT; t++) {
            double *dw = delta_w(a, 1, t);
            int di, dout;
            llama_module_dims(&m, t, &di, &dout);
            for (int e = 0; e < di * dout; e++) ck_assert_msg(dw[e] == 0, "%s: Delta W != 0 at init", tr);
            free(dw);
        }
        float *seen = calloc(a->n_params, sizeof(float));
        for (int step = 0; step < 3; step++) {
            float *grad = calloc(a->n_params, sizeof(float));
            for (int i = 0; i < m.n_layers; i++)
                for (int t = 0; t < MOD_COUNT; t++) {
                    int di, dout, T = 3;
                    llama_module_dims(&m, t, &di, &dout);
                    float x[3 * 12], gy[3 * 12], gx[3 * 12] = {0};
                    fill_random(x, (size_t)T * di);
                    fill_random(gy, (size_t)T * dout);
                    adapter_backward_cpu(a, i, t, T, x, NULL, gy, gx, grad, 1, 0);
                }
            for (size_t p = 0; p < a->n_params; p++) {
                seen[p] += fabsf(grad[p]);
                a->params[p] -= 0.1f * grad[p];
            }
            free(grad);
        }
        for (int i = 0; i < a->n_tensors; i++) {
            double tot = 0;
            for (size_t e = 0; e < a->tensors[i].numel; e++) tot += seen[a->tensors[i].offset + e];
            ck_assert_msg(tot > 0, "trainable \"%s\": %s never gets a gradient", tr, a->tensors[i].name);
        }
        free(seen);
        adapter_free(a);
    }
}
END_TEST

// ---- ShareLoRA ---------------------------------------------------------------------------------------

START_TEST(test_sharelora) {
    llama_config m = small_model();
    static const char *shares[] = {"A", "B", "AB", "qkv"};
    adapter_spec sl = peer_spec("lora", 2);
    adapter *l = make(&sl, &m);
    for (int v = 0; v < 4; v++) {
        adapter_spec s = peer_spec("sharelora", 2);
        snprintf(s.sharelora_share, sizeof s.sharelora_share, "%s", shares[v]);
        adapter *a = make(&s, &m);
        ck_assert(a->scaling == 8.0f);
        ck_assert_int_eq((int64_t)a->n_params, adapter_param_count(&s, &m));
        // Init: every B = 0; a shared A ~ N(0, 1/r^2); a per-layer A is LoRA's A.
        for (int i = 0; i < a->n_tensors; i++) {
            const adapter_tensor *t = &a->tensors[i];
            const float *p = adapter_tensor_data(a, t);
            size_t len = strlen(t->name);
            if (t->name[len - 1] == 'B') {
                for (size_t e = 0; e < t->numel; e++) ck_assert(p[e] == 0.0f);
            } else if (strstr(t->name, "layers.")) {
                char ln[64];
                snprintf(ln, sizeof ln, "lora%s", t->name + strlen("sharelora"));
                ck_assert_mem_eq(p, tensor(l, ln), t->numel * sizeof(float));
            }
        }
        fill_random(a->params, a->n_params);
        int sa = strchr(shares[v], 'A') || v == 3, sb = strchr(shares[v], 'B') != NULL;
        for (int t = 0; t < MOD_COUNT; t++) {
            float *A0, *B0, *A2, *B2;
            int di, dout;
            llama_module_dims(&m, t, &di, &dout);
            build(a, 0, t, &A0, &B0);
            build(a, 2, t, &A2, &B2);
            ck_assert_int_eq(!memcmp(A0, A2, sizeof(float) * 2 * di), sa);
            ck_assert_int_eq(!memcmp(B0, B2, sizeof(float) * 2 * dout), sb);
            free(A0), free(B0), free(A2), free(B2);
        }
        // qkv: one A for q, k and v of every layer; o has its own.
        float *Aq, *Bq, *Av, *Bv, *Ao, *Bo;
        build(a, 0, MOD_Q, &Aq, &Bq);
        build(a, 1, MOD_V, &Av, &Bv);
        build(a, 1, MOD_O, &Ao, &Bo);
        ck_assert_int_eq(!memcmp(Aq, Av, sizeof(float) * 2 * 8), v == 3);
        ck_assert(memcmp(Aq, Ao, sizeof(float) * 2 * 8) != 0);
        free(Aq), free(Bq), free(Av), free(Bv), free(Ao), free(Bo);
        adapter_free(a);
    }
    adapter_free(l);
}
END_TEST

START_TEST(test_sharelora_init_distribution) {
    llama_config m = load_fixture("llama2-7b");
    adapter_spec s = peer_spec("sharelora", 8);
    adapter *a = make(&s, &m);
    double sum = 0, sq = 0;
    size_t n = 0;
    for (int t = 0; t < MOD_COUNT; t++) {
        char name[64];
        snprintf(name, sizeof name, "sharelora.%s.A", k_module_names[t]);
        const adapter_tensor *ta = adapter_find_tensor(a, name);
        const float *p = adapter_tensor_data(a, ta);
        for (size_t e = 0; e < ta->numel; e++) sum += p[e], sq += (double)p[e] * p[e], n++;
    }
    double mean = sum / n, sd = sqrt(sq / n - mean * mean);
    ck_assert_msg(fabs(mean) < 0.002 && fabs(sd - 1.0 / 8) < 0.002, "shared A mean %g std %g, expected 0 and 1/8", mean, sd);
    ck_assert_int_eq((int64_t)a->n_params, 8 * 1395456);
    adapter_free(a);
}
END_TEST

// ---- SiRA --------------------------------------------------------------------------------------------

// q of hidden 8 (8 -> 8), E = 4, r = 1, A_e = e_0 (h = x[0]) and B_e = the unit vector of output e, so
// y[t][e] = s g_te x_t[0] shows each expert's gate weight. The gate favors expert 0, then 1, for every
// token: z = [3, 2, 0, 0] (W_g[e][1] with x_t[1] = 1).
static adapter *sira_probe(double cf, int k, double q) {
    llama_config m = tiny_model(8, 8, 1, 2, 2, 4);
    adapter_spec s = peer_spec("sira", 1);
    memset(s.targets, 0, sizeof s.targets);
    s.targets[MOD_Q] = 1;
    s.alpha = 2;  // s = 2
    s.sira_experts = 4, s.sira_top_k = k, s.sira_capacity_factor = cf, s.sira_expert_dropout = q;
    adapter *a = make(&s, &m);
    memset(a->params, 0, a->n_params * sizeof(float));
    float *A = tensor(a, "sira.layers.0.q.A"), *B = tensor(a, "sira.layers.0.q.B"), *W = tensor(a, "sira.layers.0.q.gate");
    static const float z[4] = {3, 2, 0, 0};
    for (int e = 0; e < 4; e++) {
        A[e * 8 + 0] = 1;      // A [E][1][8]
        B[e * 8 + e] = 1;      // B [E][8][1]
        W[e * 8 + 1] = z[e];   // W_g [E][8]
    }
    return a;
}

START_TEST(test_sira_capacity) {
    double p0 = exp(3) / (exp(3) + exp(2) + 2), p1 = exp(2) / (exp(3) + exp(2) + 2);
    float x[4][8] = {{0}}, y[4][8];
    for (int t = 0; t < 4; t++) x[t][0] = (float)(t + 1), x[t][1] = 1;
    // k = 2, cf = 1, T = 4, E = 4: C = ceil(1 * 2 * 4 / 4) = 2. Tokens 0, 1 take experts 0 and 1; tokens
    // 2, 3 find both full and get nothing. No renormalization: the weights are p0 and p1.
    adapter *a = sira_probe(1.0, 2, 0.0);
    memset(y, 0, sizeof y);
    adapter_forward_cpu(a, 0, MOD_Q, 4, &x[0][0], NULL, &y[0][0], 0, 0);
    for (int t = 0; t < 4; t++)
        for (int o = 0; o < 8; o++) {
            double want = t < 2 && o == 0 ? 2 * p0 * (t + 1) : t < 2 && o == 1 ? 2 * p1 * (t + 1) : 0;
            ck_assert_msg(fabs(y[t][o] - want) < 1e-6, "cf 1: y[%d][%d] = %g, expected %g", t, o, y[t][o], want);
        }
    adapter_free(a);
    // cf = 2: C = 4, nobody is dropped. cf = 1.5: C = 3, token 3 dropped.
    for (int c = 0; c < 2; c++) {
        a = sira_probe(c ? 1.5 : 2.0, 2, 0.0);
        memset(y, 0, sizeof y);
        adapter_forward_cpu(a, 0, MOD_Q, 4, &x[0][0], NULL, &y[0][0], 0, 0);
        for (int t = 0; t < 4; t++) {
            int kept = c ? t < 3 : 1;
            ck_assert(fabs(y[t][0] - (kept ? 2 * p0 * (t + 1) : 0)) < 1e-6);
            ck_assert(fabs(y[t][1] - (kept ? 2 * p1 * (t + 1) : 0)) < 1e-6);
            ck_assert(y[t][2] == 0 && y[t][3] == 0);
        }
        adapter_free(a);
    }
    // k = 1, cf = 1: C = ceil(4 / 4) = 1; only token 0 reaches expert 0.
    a = sira_probe(1.0, 1, 0.0);
    memset(y, 0, sizeof y);
    adapter_forward_cpu(a, 0, MOD_Q, 4, &x[0][0], NULL, &y[0][0], 0, 0);
    ck_assert(fabs(y[0][0] - 2 * p0) < 1e-6);
    for (int t = 1; t < 4; t++)
        for (int o = 0; o < 8; o++) ck_assert(y[t][o] == 0);
    adapter_free(a);
    // Capacity rounds up: cf 1.2, k 1, T 10, E 4: 3 exactly (not 4).
    a = sira_probe(1.2, 1, 0.0);
    float x10[10][8] = {{0}}, y10[10][8] = {{0}};
    for (int t = 0; t < 10; t++) x10[t][0] = 1, x10[t][1] = 1;
    adapter_forward_cpu(a, 0, MOD_Q, 10, &x10[0][0], NULL, &y10[0][0], 0, 0);
    for (int t = 0; t < 10; t++) ck_assert_msg((y10[t][0] != 0) == (t < 3), "cf 1.2: token %d", t);
    adapter_free(a);
}
END_TEST

// Padding rows (tok_mask 0) are not routed and take no capacity: with cf 1, k 2, 4 real tokens and
// 4 padding rows in between, C = ceil(2 * 4 / 4) = 2 as without padding, and the real tokens get what
// they get without the padding rows.
START_TEST(test_sira_skips_padding) {
    adapter *a = sira_probe(1.0, 2, 0.0);
    float x[8][8] = {{0}}, y[8][8] = {{0}}, yref[4][8] = {{0}}, xr[4][8] = {{0}};
    int32_t mask[8] = {0, 1, 0, 1, 1, 0, 0, 1};
    for (int t = 0, j = 0; t < 8; t++) {
        x[t][0] = (float)(t + 1), x[t][1] = 1;
        if (mask[t]) memcpy(xr[j++], x[t], sizeof x[t]);
    }
    a->ops->forward(a, 0, MOD_Q, &x[0][0], 8, &y[0][0], 0, 0, mask);
    a->ops->forward(a, 0, MOD_Q, &xr[0][0], 4, &yref[0][0], 0, 0, NULL);
    for (int t = 0, j = 0; t < 8; t++) {
        for (int o = 0; o < 8; o++) {
            if (mask[t])
                ck_assert_msg(y[t][o] == yref[j][o], "row %d col %d: %g vs %g", t, o, y[t][o], yref[j][o]);
            else
                ck_assert_msg(y[t][o] == 0, "padding row %d was routed", t);
        }
        j += mask[t];
    }
    // Backward: padding rows get no input gradient and add nothing to the parameters.
    float gy[8][8], gx[8][8] = {{0}};
    for (int t = 0; t < 8; t++)
        for (int o = 0; o < 8; o++) gy[t][o] = 0.25f * (float)(o + 1) - 0.1f * (float)t;
    float *grad = xcalloc(a->n_params, sizeof(float));
    a->ops->backward(a, 0, MOD_Q, &x[0][0], &gy[0][0], 8, &gx[0][0], grad, 0, 0, mask);
    for (int t = 0; t < 8; t++)
        if (!mask[t])
            for (int c = 0; c < 8; c++) ck_assert(gx[t][c] == 0);
    free(grad);
    adapter_free(a);
}
END_TEST

START_TEST(test_sira_expert_dropout) {
    // cf large: no capacity drops. Training with q = 0.5: each (token, expert) weight is 0 or 2 p.
    adapter *a = sira_probe(100.0, 2, 0.5);
    enum { T = 64 };
    static float x[T][8], y[T][8], y2[T][8], ye[T][8];
    for (int t = 0; t < T; t++) x[t][0] = 1, x[t][1] = 1;
    double p0 = exp(3) / (exp(3) + exp(2) + 2);
    memset(y, 0, sizeof y), memset(y2, 0, sizeof y2), memset(ye, 0, sizeof ye);
    uint64_t key = rng_key(RNG_DROPOUT, 5, 1, 0, 3);
    adapter_forward_cpu(a, 0, MOD_Q, T, &x[0][0], NULL, &y[0][0], 1, key);
    adapter_forward_cpu(a, 0, MOD_Q, T, &x[0][0], NULL, &y2[0][0], 1, key);
    ck_assert_mem_eq(y, y2, sizeof y);  // the same key: the same mask (the backward's recompute)
    adapter_forward_cpu(a, 0, MOD_Q, T, &x[0][0], NULL, &ye[0][0], 0, key);
    int dropped = 0;
    for (int t = 0; t < T; t++) {
        ck_assert(fabs(ye[t][0] - 2 * p0) < 1e-6);  // eval: no dropout
        ck_assert(fabs(y[t][0]) < 1e-6 || fabs(y[t][0] - 2 * 2 * p0) < 1e-5);
        dropped += fabs(y[t][0]) < 1e-6;
    }
    ck_assert_msg(dropped > 16 && dropped < 48, "%d of %d dropped at q = 0.5", dropped, T);
    memset(y2, 0, sizeof y2);
    adapter_forward_cpu(a, 0, MOD_Q, T, &x[0][0], NULL, &y2[0][0], 1, key + 1);
    ck_assert(memcmp(y, y2, sizeof y) != 0);  // another step: another mask
    adapter_free(a);
}
END_TEST

// E = k = 1, cf >= 1, no expert dropout: the gate is the constant 1 and SiRA is LoRA (the same A at
// init; with the same A and B the same output and gradients up to float summation order, and no
// gradient for the gate).
START_TEST(test_sira_one_expert_is_lora) {
    llama_config m = small_model();
    adapter_spec ss = peer_spec("sira", 2), sl = peer_spec("lora", 2);
    ss.sira_experts = 1, ss.sira_top_k = 1, ss.sira_capacity_factor = 1, ss.sira_expert_dropout = 0;
    adapter *a = make(&ss, &m), *l = make(&sl, &m);
    for (int i = 0; i < m.n_layers; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            char n1[64], n2[64];
            snprintf(n1, sizeof n1, "sira.layers.%d.%s.A", i, k_module_names[t]);
            snprintf(n2, sizeof n2, "lora.layers.%d.%s.A", i, k_module_names[t]);
            ck_assert_mem_eq(tensor(a, n1), tensor(l, n2), adapter_find_tensor(l, n2)->numel * sizeof(float));
        }
    fill_random(l->params, l->n_params);
    fill_random(a->params, a->n_params);  // the gate: any values
    float *ga = calloc(a->n_params, sizeof(float)), *gl = calloc(l->n_params, sizeof(float));
    for (int i = 0; i < m.n_layers; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            char n[64];
            const char *w[2] = {"A", "B"};
            for (int k = 0; k < 2; k++) {
                snprintf(n, sizeof n, "lora.layers.%d.%s.%s", i, k_module_names[t], w[k]);
                const adapter_tensor *tl = adapter_find_tensor(l, n);
                snprintf(n, sizeof n, "sira.layers.%d.%s.%s", i, k_module_names[t], w[k]);
                memcpy(tensor(a, n), adapter_tensor_data(l, tl), tl->numel * sizeof(float));
            }
            int di, dout, T = 4;
            llama_module_dims(&m, t, &di, &dout);
            float x[4 * 12], mask[4 * 12], gy[4 * 12], ya[4 * 12] = {0}, yl[4 * 12] = {0}, gxa[4 * 12] = {0},
                                                                    gxl[4 * 12] = {0};
            fill_random(x, (size_t)T * di);
            fill_random(gy, (size_t)T * dout);
            adapter_dropout_mask(rng_key(RNG_DROPOUT, 4, 0, (uint64_t)i, (uint64_t)t), 0.25f, (size_t)T * di, mask);
            adapter_forward_cpu(a, i, t, T, x, mask, ya, 1, 77);
            adapter_forward_cpu(l, i, t, T, x, mask, yl, 1, 77);
            ck_assert(max_tol_ratio(ya, yl, (size_t)T * dout, 1e-4, 1e-4, NULL) <= 1);
            adapter_backward_cpu(a, i, t, T, x, mask, gy, gxa, ga, 1, 77);
            adapter_backward_cpu(l, i, t, T, x, mask, gy, gxl, gl, 1, 77);
            ck_assert(max_tol_ratio(gxa, gxl, (size_t)T * di, 1e-4, 1e-4, NULL) <= 1);
        }
    for (int i = 0; i < m.n_layers; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            char n[64];
            const char *w[2] = {"A", "B"};
            for (int k = 0; k < 2; k++) {
                snprintf(n, sizeof n, "lora.layers.%d.%s.%s", i, k_module_names[t], w[k]);
                const adapter_tensor *tl = adapter_find_tensor(l, n);
                snprintf(n, sizeof n, "sira.layers.%d.%s.%s", i, k_module_names[t], w[k]);
                const adapter_tensor *ts = adapter_find_tensor(a, n);
                ck_assert(max_tol_ratio(ga + ts->offset, gl + tl->offset, tl->numel, 1e-4, 1e-4, NULL) <= 1);
            }
            snprintf(n, sizeof n, "sira.layers.%d.%s.gate", i, k_module_names[t]);
            const adapter_tensor *tg = adapter_find_tensor(a, n);
            for (size_t e = 0; e < tg->numel; e++) ck_assert(ga[tg->offset + e] == 0.0f);
        }
    free(ga), free(gl);
    adapter_free(a);
    adapter_free(l);
}
END_TEST

// ---- parameter counts (MOS.md section 5) ---------------------------------------------------------------

START_TEST(test_param_counts) {
    llama_config m7 = load_fixture("llama2-7b");
    adapter_spec s = peer_spec("vera", 256);
    ck_assert_int_eq(adapter_param_count(&s, &m7), 1417216);
    for (int r = 1; r <= 16; r *= 2) {
        s = peer_spec("sharelora", r);
        snprintf(s.sharelora_share, sizeof s.sharelora_share, "A");
        ck_assert_int_eq(adapter_param_count(&s, &m7), (int64_t)1395456 * r);
        snprintf(s.sharelora_share, sizeof s.sharelora_share, "B");
        ck_assert_int_eq(adapter_param_count(&s, &m7), (int64_t)1181184 * r);
        snprintf(s.sharelora_share, sizeof s.sharelora_share, "AB");
        ck_assert_int_eq(adapter_param_count(&s, &m7), (int64_t)78080 * r);  // r * S_io
        // qkv: one A of 4096 for q, k, v; A per type for o (4096), gate, up (4096), down (11008); B per layer.
        snprintf(s.sharelora_share, sizeof s.sharelora_share, "qkv");
        ck_assert_int_eq(adapter_param_count(&s, &m7), (int64_t)r * (4096 + 4096 + 2 * 4096 + 11008) + (int64_t)32 * r * 42496);
    }
    // PRoLoRA r = 4, u = 0, m = n = 2: the LoRA r = 2 budget (5.00M); r = 8, m = n = 4 as well.
    s = peer_spec("prolora", 4), s.prolora_unshared_r = 0, s.prolora_reduce_a = s.prolora_reduce_b = 2;
    ck_assert_int_eq(adapter_param_count(&s, &m7), 4997120);
    s.r = 8, s.prolora_reduce_a = s.prolora_reduce_b = 4;
    ck_assert_int_eq(adapter_param_count(&s, &m7), 4997120);
    s.r = 4, s.prolora_unshared_r = 1, s.prolora_reduce_a = s.prolora_reduce_b = 2;  // 3 (d/2) + 1 d = 2.5 d
    ck_assert_int_eq(adapter_param_count(&s, &m7), 6246400);
    // Tied-LoRA, all trained: per type r (d_in + d_out) + L (r + d_out) = r S_io + L (7 r + S_out).
    s = peer_spec("tied_lora", 8);
    ck_assert_int_eq(adapter_param_count(&s, &m7), (int64_t)8 * 78080 + (int64_t)32 * (7 * 8 + 42496));
    snprintf(s.tied_lora_trainable, sizeof s.tied_lora_trainable, "vu");  // VeRA-like: L (7 r + S_out)
    ck_assert_int_eq(adapter_param_count(&s, &m7), (int64_t)32 * (7 * 8 + 42496));
    snprintf(s.tied_lora_trainable, sizeof s.tied_lora_trainable, "BA");  // ShareAB
    ck_assert_int_eq(adapter_param_count(&s, &m7), (int64_t)8 * 78080);
    // PRoLoRA's calculate_params.py on QKV only: 4 d r + L (r + 3 d) is with u, v and A, B on q, k, v:
    // 3 r (d + d) + L (3 r + 3 d). (Its 4dr counts one A for the three; that scoping is ShareLoRA's qkv.)
    memset(s.targets, 0, sizeof s.targets);
    s.targets[MOD_Q] = s.targets[MOD_K] = s.targets[MOD_V] = 1;
    snprintf(s.tied_lora_trainable, sizeof s.tied_lora_trainable, "vBuA");
    ck_assert_int_eq(adapter_param_count(&s, &m7), (int64_t)3 * 8 * 8192 + (int64_t)32 * (3 * 8 + 3 * 4096));
    // SiRA: L sum_t (E r (d_in + d_out) + E d_in).
    s = peer_spec("sira", 2), s.sira_experts = 4, s.sira_top_k = 2;
    ck_assert_int_eq(adapter_param_count(&s, &m7), (int64_t)32 * (4 * 2 * 78080 + 4 * 35584));
    // The allocations agree with the formulas.
    static const char *methods[] = {"prolora", "vera", "tied_lora", "sharelora", "sira"};
    for (int i = 0; i < 5; i++) {
        s = peer_spec(methods[i], 4);
        snprintf(s.sharelora_share, sizeof s.sharelora_share, "qkv");
        s.prolora_unshared_r = 1;
        adapter *a = NULL;
        ck_assert_int_eq(adapter_create_layout(&a, &s, &m7), MOSFT_OK);
        ck_assert_msg((int64_t)a->n_params == adapter_param_count(&s, &m7), "%s: allocated %zu, counted %lld", methods[i],
                      a->n_params, (long long)adapter_param_count(&s, &m7));
        adapter_free(a);
    }
}
END_TEST

// ---- constraints ----------------------------------------------------------------------------------------

static void expect_error(const adapter_spec *s, const llama_config *m, const char *needle) {
    adapter *a = NULL;
    mosft_error_clear();
    ck_assert_int_eq(adapter_create(&a, s, m), MOSFT_ERR_INPUT);
    ck_assert_ptr_null(a);
    ck_assert_msg(strstr(mosft_error(), needle), "message \"%s\" lacks \"%s\"", mosft_error(), needle);
    ck_assert_int_eq(adapter_spec_check(s, m), MOSFT_ERR_INPUT);
}

START_TEST(test_constraints) {
    llama_config m = small_model();
    adapter_spec s = peer_spec("prolora", 4);
    s.prolora_unshared_r = 5;
    expect_error(&s, &m, "adapter.prolora_unshared_r");
    s.prolora_unshared_r = -1;
    expect_error(&s, &m, "adapter.prolora_unshared_r");
    s = peer_spec("prolora", 4), s.prolora_reduce_a = 0;
    expect_error(&s, &m, "adapter.prolora_reduce_a");
    s = peer_spec("prolora", 4), s.prolora_reduce_b = 0;
    expect_error(&s, &m, "adapter.prolora_reduce_b");
    s = peer_spec("vera", 4), s.vera_d_initial = NAN;
    expect_error(&s, &m, "adapter.vera_d_initial");
    static const char *bad_tied[] = {"", "x", "vv", "vBuAx", "ab"};
    for (int i = 0; i < 5; i++) {
        s = peer_spec("tied_lora", 4);
        snprintf(s.tied_lora_trainable, sizeof s.tied_lora_trainable, "%s", bad_tied[i]);
        expect_error(&s, &m, "adapter.tied_lora_trainable");
    }
    s = peer_spec("sharelora", 4), snprintf(s.sharelora_share, sizeof s.sharelora_share, "C");
    expect_error(&s, &m, "adapter.sharelora_share");
    s = peer_spec("sira", 4), s.sira_top_k = 5, s.sira_experts = 4;
    expect_error(&s, &m, "adapter.sira_top_k");
    s = peer_spec("sira", 4), s.sira_experts = 0;
    expect_error(&s, &m, "adapter.sira_experts");
    s = peer_spec("sira", 4), s.sira_capacity_factor = 0;
    expect_error(&s, &m, "adapter.sira_capacity_factor");
    s = peer_spec("sira", 4), s.sira_expert_dropout = 1;
    expect_error(&s, &m, "adapter.sira_expert_dropout");
    // The method list names every peer.
    s = peer_spec("nope", 4);
    expect_error(&s, &m, "sharelora");
    ck_assert(strstr(mosft_error(), "prolora") && strstr(mosft_error(), "vera") && strstr(mosft_error(), "tied_lora") &&
              strstr(mosft_error(), "sira"));
}
END_TEST

// ---- adapter.mos ------------------------------------------------------------------------------------------

static void roundtrip(const adapter_spec *s, const llama_config *m, const char *dir) {
    adapter *a = make(s, m);
    fill_random(a->params, a->n_params);
    a->step = 42;
    char path[512];
    snprintf(path, sizeof path, "%s/%s.mos", dir, s->method);
    ck_assert_int_eq(adapter_save(a, path), MOSFT_OK);
    adapter *b = NULL;
    ck_assert_msg(adapter_load(&b, path, m) == MOSFT_OK, "%s: %s", s->method, mosft_error());
    char *ja = adapter_spec_to_json(&a->spec), *jb = adapter_spec_to_json(&b->spec);
    ck_assert_str_eq(ja, jb);
    free(ja), free(jb);
    ck_assert(a->rank == b->rank && a->scaling == b->scaling && b->step == 42);
    ck_assert_int_eq((int)a->n_params, (int)b->n_params);
    ck_assert_mem_eq(a->params, b->params, a->n_params * sizeof(float));
    ck_assert_int_eq(a->n_buffers, b->n_buffers);
    for (int i = 0; i < a->n_buffers; i++) ck_assert_mem_eq(a->buffers[i].data, b->buffers[i].data, a->buffers[i].nbytes);
    // The same branch from both.
    int T = 3;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        float x[3 * 12], ya[3 * 12] = {0}, yb[3 * 12] = {0};
        fill_random(x, (size_t)T * di);
        adapter_forward_cpu(a, 1, t, T, x, NULL, ya, 0, 0);
        adapter_forward_cpu(b, 1, t, T, x, NULL, yb, 0, 0);
        ck_assert_mem_eq(ya, yb, sizeof(float) * T * dout);
    }
    adapter_free(b);
    // A knob the method rejects, written into the file, is an input error naming it.
    adapter_spec bad = a->spec;
    const char *needle = NULL;
    if (!strcmp(s->method, "prolora")) bad.prolora_unshared_r = bad.r + 1, needle = "prolora_unshared_r";
    if (!strcmp(s->method, "tied_lora")) snprintf(bad.tied_lora_trainable, sizeof bad.tied_lora_trainable, "zz"), needle = "tied_lora_trainable";
    if (!strcmp(s->method, "sharelora")) snprintf(bad.sharelora_share, sizeof bad.sharelora_share, "Q"), needle = "sharelora_share";
    if (!strcmp(s->method, "sira")) bad.sira_top_k = bad.sira_experts + 1, needle = "sira_top_k";
    if (needle) {
        a->spec = bad;
        ck_assert_int_eq(adapter_save(a, path), MOSFT_OK);
        ck_assert_int_eq(adapter_load(&b, path, m), MOSFT_ERR_INPUT);
        ck_assert_msg(strstr(mosft_error(), needle) && strstr(mosft_error(), path), "%s", mosft_error());
    }
    adapter_free(a);
}

START_TEST(test_file_roundtrip) {
    llama_config m = small_model();
    char dir[256];
    snprintf(dir, sizeof dir, "%s", test_tmpdir());
    adapter_spec s = peer_spec("prolora", 4);
    s.prolora_unshared_r = 1, s.prolora_reduce_a = 3;
    s.targets[MOD_V] = 0;
    roundtrip(&s, &m, dir);
    s = peer_spec("vera", 4), s.vera_projection_seed = 3, s.vera_d_initial = 0.5;
    roundtrip(&s, &m, dir);
    s = peer_spec("tied_lora", 3), snprintf(s.tied_lora_trainable, sizeof s.tied_lora_trainable, "uB");  // A, v buffers
    roundtrip(&s, &m, dir);
    s = peer_spec("sharelora", 2), snprintf(s.sharelora_share, sizeof s.sharelora_share, "qkv");
    roundtrip(&s, &m, dir);
    s = peer_spec("sira", 2), s.sira_experts = 3, s.sira_top_k = 2;
    roundtrip(&s, &m, dir);
    // A frozen VeRA projection that is not finite is refused on load.
    s = peer_spec("vera", 2);
    adapter *a = make(&s, &m);
    ((float *)adapter_find_buffer(a, "vera.B")->data)[5] = NAN;
    char path[512];
    snprintf(path, sizeof path, "%s/nan.mos", dir);
    ck_assert_int_eq(adapter_save(a, path), MOSFT_OK);
    adapter_free(a);
    a = NULL;
    ck_assert_int_eq(adapter_load(&a, path, &m), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "vera.B") && strstr(mosft_error(), "finite"), "%s", mosft_error());
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("adapter_peers");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_fd_lowrank);
    tcase_add_test(tc, test_fd_sira);
    tcase_add_test(tc, test_prolora_hand);
    tcase_add_test(tc, test_prolora_is_lora);
    tcase_add_test(tc, test_prolora_init);
    tcase_add_test(tc, test_vera_structure);
    tcase_add_test(tc, test_vera_init_distribution);
    tcase_add_test(tc, test_tied_lora);
    tcase_add_test(tc, test_tied_lora_subsets);
    tcase_add_test(tc, test_sharelora);
    tcase_add_test(tc, test_sharelora_init_distribution);
    tcase_add_test(tc, test_sira_capacity);
    tcase_add_test(tc, test_sira_skips_padding);
    tcase_add_test(tc, test_sira_expert_dropout);
    tcase_add_test(tc, test_sira_one_expert_is_lora);
    tcase_add_test(tc, test_param_counts);
    tcase_add_test(tc, test_constraints);
    tcase_add_test(tc, test_file_roundtrip);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(suite)
