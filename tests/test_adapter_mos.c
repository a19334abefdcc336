// test_adapter_mos.c: the MoS and LoRA adapters: MOS.md section 7's exact vector, finite-difference
// gradients of the low-rank math and of the whole pool path, LoRA = MoS with R_p = R_v = r, the index
// tables of every ablation, the initialization, constraint errors, and the parameter counts of the
// paper's models (MOS.md section 2).
#include <stdint.h>

#include "core/adapter.h"
#include "core/config.h"
#include "core/info.h"
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

static adapter_spec mos_spec(int r, int Rv, int Rp, int l, double alpha) {
    adapter_spec s;
    memset(&s, 0, sizeof s);
    snprintf(s.method, sizeof s.method, "mos");
    s.r = r;
    s.equiv_rank = Rv;
    s.private_rank = Rp;
    s.shards = l;
    s.alpha = alpha;
    s.dropout = 0;
    for (int t = 0; t < MOD_COUNT; t++) s.targets[t] = 1;
    s.seed = 7;
    s.pair_dissociation = 1;
    s.scale_mean = 1;
    s.scale_std = 0;
    return s;
}

static adapter_spec lora_spec(int r, double alpha) {
    adapter_spec s = mos_spec(r, 1, 0, 1, alpha);
    snprintf(s.method, sizeof s.method, "lora");
    return s;
}

static const int32_t *table(const adapter *a, int module, char which, int layer) {
    char name[64];
    snprintf(name, sizeof name, "mos.%s.index_%c", k_module_names[module], which);
    adapter_buffer *b = adapter_find_buffer(a, name);
    ck_assert_ptr_nonnull(b);
    return (const int32_t *)b->data + (size_t)layer * b->shape[1];
}

static float *pool(const adapter *a, int module, char which) {
    char name[64];
    snprintf(name, sizeof name, "mos.%s.pool_%c", k_module_names[module], which);
    adapter_tensor *t = adapter_find_tensor(a, name);
    ck_assert_ptr_nonnull(t);
    return adapter_tensor_data(a, t);
}

static uint64_t g_rng = 0x1234567;
static float frand(void) {  // uniform in [-1, 1)
    g_rng = rng_splitmix64(g_rng);
    return (float)((double)(g_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
static void fill_random(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = frand();
}

// ---- MOS.md section 7: the tiny exact vector ------------------------------------------------------

START_TEST(test_exact_vector) {
    // down_proj of a model with intermediate 8, hidden 4: d_in = 8, d_out = 4. L = 2.
    llama_config m = tiny_model(4, 8, 2, 1, 1, 4);
    adapter_spec s = mos_spec(3, 2, 1, 2, 3.0);
    memset(s.targets, 0, sizeof s.targets);
    s.targets[MOD_DOWN] = 1;
    adapter *a = NULL;
    ck_assert_int_eq(adapter_create(&a, &s, &m), MOSFT_OK);
    ck_assert_int_eq(a->rank, 3);
    ck_assert(a->scaling == 1.0f);
    ck_assert_int_eq((int)a->n_params, 48);  // R_v L (d_in + d_out) = 2*2*12
    float *pa = pool(a, MOD_DOWN, 'A'), *pb = pool(a, MOD_DOWN, 'B');
    for (int n = 0; n < 8; n++) {
        for (int c = 0; c < 4; c++) pa[n * 4 + c] = (float)(10 * n + c);
        pb[n * 2 + 0] = (float)(-10 * n);
        pb[n * 2 + 1] = (float)(-(10 * n + 1));
    }
    static const int32_t ia[2][6] = {{3, 0, 1, 2, 4, 5}, {2, 1, 0, 3, 6, 7}};
    static const int32_t ib[2][6] = {{1, 3, 2, 0, 4, 5}, {0, 2, 3, 1, 6, 7}};
    memcpy((int32_t *)table(a, MOD_DOWN, 'A', 0), ia, sizeof ia);
    memcpy((int32_t *)table(a, MOD_DOWN, 'B', 0), ib, sizeof ib);
    ck_assert_int_eq(a->ops->attach(a), MOSFT_OK);  // the vector's tables are valid MoS tables

    static const float A_exp[2][3][8] = {
        {{30, 31, 32, 33, 0, 1, 2, 3}, {10, 11, 12, 13, 20, 21, 22, 23}, {40, 41, 42, 43, 50, 51, 52, 53}},
        {{20, 21, 22, 23, 10, 11, 12, 13}, {0, 1, 2, 3, 30, 31, 32, 33}, {60, 61, 62, 63, 70, 71, 72, 73}}};
    static const float B_exp[2][4][3] = {{{-10, -20, -40}, {-11, -21, -41}, {-30, 0, -50}, {-31, -1, -51}},
                                         {{0, -30, -60}, {-1, -31, -61}, {-20, -10, -70}, {-21, -11, -71}}};
    static const float x[2][8] = {{1, 0, 2, -1, 0, 1, 0, 3}, {0, 1, -1, 0, 2, 0, 1, 0}};
    static const float y_exp[2][2][4] = {{{-14570, -15043, -16680, -17153}, {-7270, -7483, -7580, -7793}},
                                         {{-28590, -29223, -31900, -32533}, {-15390, -15723, -16300, -16633}}};
    static const float gy[2][4] = {{1, -1, 0, 2}, {0, 1, 1, -1}};
    static const float gpa_exp[8][4] = {{-41, -91, -22, -162},  {-1, -61, 18, -122},   {-81, -1, -102, 38},
                                        {-121, -31, -142, -2},  {-101, -40, -162, 101}, {-80, -101, -40, -303},
                                        {-141, -60, -222, 141}, {-120, -141, -60, -423}};
    static const float gpb_exp[8][2] = {{152, 101}, {162, 101}, {142, 101}, {132, 101},
                                        {291, -140}, {151, 431}, {411, -200}, {211, 611}};
    float *grad = calloc(a->n_params, sizeof(float));
    double loss = 0;
    for (int i = 0; i < 2; i++) {
        float A[3][8], B[4][3], y[2][4] = {{0}}, gx[2][8] = {{0}}, gA[3][8], gB[4][3];
        a->ops->build(a, i, MOD_DOWN, &A[0][0], &B[0][0]);
        ck_assert_mem_eq(A, A_exp[i], sizeof A);
        ck_assert_mem_eq(B, B_exp[i], sizeof B);
        adapter_lowrank_forward_cpu(2, 8, 4, 3, a->scaling, &x[0][0], NULL, &A[0][0], &B[0][0], &y[0][0], NULL);
        for (int t = 0; t < 2; t++)
            for (int o = 0; o < 4; o++) {
                ck_assert_msg(y[t][o] == y_exp[i][t][o], "layer %d y[%d][%d] = %g, expected %g", i, t, o, y[t][o],
                              y_exp[i][t][o]);
                loss += (double)gy[t][o] * y[t][o];
            }
        adapter_lowrank_backward_cpu(2, 8, 4, 3, a->scaling, &x[0][0], NULL, &A[0][0], &B[0][0], &gy[0][0], &gx[0][0],
                                     &gA[0][0], &gB[0][0]);
        a->ops->scatter(a, i, MOD_DOWN, &gA[0][0], &gB[0][0], grad);
    }
    ck_assert(loss == -120926.0);
    size_t off_a = adapter_find_tensor(a, "mos.down.pool_A")->offset, off_b = adapter_find_tensor(a, "mos.down.pool_B")->offset;
    for (int n = 0; n < 8; n++) {
        for (int c = 0; c < 4; c++)
            ck_assert_msg(grad[off_a + n * 4 + c] == gpa_exp[n][c], "gPoolA[%d][%d] = %g, expected %g", n, c,
                          grad[off_a + n * 4 + c], gpa_exp[n][c]);
        for (int c = 0; c < 2; c++)
            ck_assert_msg(grad[off_b + n * 2 + c] == gpb_exp[n][c], "gPoolB[%d][%d] = %g, expected %g", n, c,
                          grad[off_b + n * 2 + c], gpb_exp[n][c]);
    }
    free(grad);
    adapter_free(a);
}
END_TEST

// ---- finite differences ---------------------------------------------------------------------------

// loss = sum gy * y with y = s B A (x*mask): linear in every single entry of x, A and B, so a central
// difference with a step of 1 is exact up to float rounding.
static double lowrank_loss(int T, int di, int dout, int r, float s, const float *x, const float *mask, const float *A,
                           const float *B, const float *gy) {
    float *y = calloc((size_t)T * dout, sizeof(float));
    adapter_lowrank_forward_cpu(T, di, dout, r, s, x, mask, A, B, y, NULL);
    double l = 0;
    for (int i = 0; i < T * dout; i++) l += (double)gy[i] * y[i];
    free(y);
    return l;
}

static void fd_check(float *p, const float *analytic, size_t n, const char *what, int T, int di, int dout, int r, float s,
                     const float *x, const float *mask, const float *A, const float *B, const float *gy) {
    for (size_t i = 0; i < n; i++) {
        float keep = p[i];
        p[i] = keep + 1.0f;
        double lp = lowrank_loss(T, di, dout, r, s, x, mask, A, B, gy);
        p[i] = keep - 1.0f;
        double lm = lowrank_loss(T, di, dout, r, s, x, mask, A, B, gy);
        p[i] = keep;
        double fd = (lp - lm) / 2.0;
        ck_assert_msg(fabs(fd - analytic[i]) <= 1e-4 * (1.0 + fabs(fd)), "%s[%zu]: analytic %.7g, finite difference %.7g",
                      what, i, analytic[i], fd);
    }
}

START_TEST(test_lowrank_fd) {
    for (int trial = 0; trial < 40; trial++) {
        int T = 1 + (int)((frand() + 1) * 2.5), di = 1 + (int)((frand() + 1) * 4.5), dout = 1 + (int)((frand() + 1) * 3.5),
            r = 1 + (int)((frand() + 1) * 2);
        float s = 0.5f + (frand() + 1);
        int dropout = trial % 2;
        float *x = malloc(sizeof(float) * T * di), *A = malloc(sizeof(float) * r * di), *B = malloc(sizeof(float) * dout * r),
              *gy = malloc(sizeof(float) * T * dout), *gx = calloc((size_t)T * di, sizeof(float)),
              *gA = malloc(sizeof(float) * r * di), *gB = malloc(sizeof(float) * dout * r),
              *mask = malloc(sizeof(float) * T * di);
        fill_random(x, (size_t)T * di);
        fill_random(A, (size_t)r * di);
        fill_random(B, (size_t)dout * r);
        fill_random(gy, (size_t)T * dout);
        adapter_dropout_mask(rng_key(RNG_DROPOUT, 1, (uint64_t)trial, 0, 0), 0.3f, (size_t)T * di, mask);
        const float *mk = dropout ? mask : NULL;
        // gx accumulates: start from a known value.
        for (int i = 0; i < T * di; i++) gx[i] = 0.25f;
        adapter_lowrank_backward_cpu(T, di, dout, r, s, x, mk, A, B, gy, gx, gA, gB);
        for (int i = 0; i < T * di; i++) gx[i] -= 0.25f;
        fd_check(x, gx, (size_t)T * di, "gx", T, di, dout, r, s, x, mk, A, B, gy);
        fd_check(A, gA, (size_t)r * di, "gA", T, di, dout, r, s, x, mk, A, B, gy);
        fd_check(B, gB, (size_t)dout * r, "gB", T, di, dout, r, s, x, mk, A, B, gy);
        // h_out is xd A^T.
        float *y = calloc((size_t)T * dout, sizeof(float)), *h = malloc(sizeof(float) * T * r);
        adapter_lowrank_forward_cpu(T, di, dout, r, s, x, mk, A, B, y, h);
        for (int t = 0; t < T; t++)
            for (int k = 0; k < r; k++) {
                double acc = 0;
                for (int c = 0; c < di; c++) acc += (double)x[t * di + c] * (mk ? mk[t * di + c] : 1) * A[k * di + c];
                ck_assert(fabs(acc - h[t * r + k]) <= 1e-5 * (1 + fabs(acc)));
            }
        free(y);
        free(h);
        free(x), free(A), free(B), free(gy), free(gx), free(gA), free(gB), free(mask);
    }
}
END_TEST

START_TEST(test_dropout_mask) {
    size_t n = 100000;
    float *m = malloc(sizeof(float) * n), *m2 = malloc(sizeof(float) * n);
    uint64_t key = rng_key(RNG_DROPOUT, 3, 10, 0, 5);
    adapter_dropout_mask(key, 0.1f, n, m);
    adapter_dropout_mask(key, 0.1f, n, m2);
    ck_assert_mem_eq(m, m2, sizeof(float) * n);  // regenerable: the recompute sees the same mask
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        ck_assert(m[i] == 0.0f || m[i] == 1.0f / 0.9f);
        kept += m[i] != 0;
    }
    ck_assert(fabs((double)kept / n - 0.9) < 0.005);
    // 16 bits a decision: element i is rng_keep16's, and the two halves of a word are independent
    // (both dropped in ~p^2 of the pairs)
    size_t both = 0;
    for (size_t i = 0; i < n; i++) {
        ck_assert_int_eq(m[i] != 0.0f, rng_keep16(key, i, rng_dropout_threshold16(0.1f)));
        if (i % 2 == 0) both += m[i] == 0.0f && m[i + 1] == 0.0f;
    }
    ck_assert_msg(fabs((double)both / (n / 2) - 0.01) < 0.003, "both halves dropped in %.4f of the pairs", (double)both / (n / 2));
    adapter_dropout_mask(key, 0.0f, n, m);
    for (size_t i = 0; i < n; i++) ck_assert(m[i] == 1.0f);
    free(m);
    free(m2);
}
END_TEST

// The whole path: every layer and module builds its factors from the shared pools, the loss sums all
// of them, the backward scatters into the pools; compare with central differences on every parameter.
static double model_loss(const adapter *a, int T, float *const *x, float *const *mask, float *const *gy) {
    const llama_config *m = &a->model;
    double l = 0;
    for (int i = 0; i < m->n_layers; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            if (!a->spec.targets[t]) continue;
            int di, dout, k = i * MOD_COUNT + t;
            llama_module_dims(m, t, &di, &dout);
            float *y = malloc(sizeof(float) * T * dout);
            for (int e = 0; e < T * dout; e++) y[e] = 0.5f;  // stands for the base output W0 x
            adapter_forward_cpu(a, i, t, T, x[k], mask[k], y, 1, 0);
            for (int e = 0; e < T * dout; e++) l += (double)gy[k][e] * (y[e] - 0.5f);
            free(y);
        }
    return l;
}

static void check_pool_gradients(const adapter_spec *s, const llama_config *m) {
    adapter *a = NULL;
    ck_assert_msg(adapter_create(&a, s, m) == MOSFT_OK, "%s", mosft_error());
    fill_random(a->params, a->n_params);  // B != 0 so that A's gradient is tested too
    int T = 3, L = m->n_layers;
    float **x = calloc((size_t)L * MOD_COUNT, sizeof(float *)), **mask = calloc((size_t)L * MOD_COUNT, sizeof(float *)),
          **gy = calloc((size_t)L * MOD_COUNT, sizeof(float *)), **gxs = calloc((size_t)L * MOD_COUNT, sizeof(float *));
    float *grad = calloc(a->n_params, sizeof(float));
    for (int i = 0; i < L; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            if (!s->targets[t]) continue;
            int di, dout, k = i * MOD_COUNT + t;
            llama_module_dims(m, t, &di, &dout);
            x[k] = malloc(sizeof(float) * T * di);
            mask[k] = malloc(sizeof(float) * T * di);
            gy[k] = malloc(sizeof(float) * T * dout);
            fill_random(x[k], (size_t)T * di);
            fill_random(gy[k], (size_t)T * dout);
            adapter_dropout_mask(rng_key(RNG_DROPOUT, 9, 0, 0, (uint64_t)k), 0.25f, (size_t)T * di, mask[k]);
            gxs[k] = calloc((size_t)T * di, sizeof(float));
            adapter_backward_cpu(a, i, t, T, x[k], mask[k], gy[k], gxs[k], grad, 1, 0);
        }
    // The input gradients of the last layer's linears, by central differences on x (linear in x too).
    for (int t = 0; t < MOD_COUNT; t++) {
        int k = (L - 1) * MOD_COUNT + t, di, dout;
        if (!s->targets[t]) continue;
        llama_module_dims(m, t, &di, &dout);
        for (int e = 0; e < T * di; e++) {
            float keep = x[k][e];
            x[k][e] = keep + 1.0f;
            double lp = model_loss(a, T, x, mask, gy);
            x[k][e] = keep - 1.0f;
            double lm = model_loss(a, T, x, mask, gy);
            x[k][e] = keep;
            ck_assert_msg(fabs((lp - lm) / 2 - gxs[k][e]) <= 1e-4 * (1 + fabs(gxs[k][e])), "%s gx[%d]: %g vs %g",
                          k_module_names[t], e, gxs[k][e], (lp - lm) / 2);
        }
    }
    for (size_t p = 0; p < a->n_params; p++) {
        float keep = a->params[p];
        a->params[p] = keep + 1.0f;
        double lp = model_loss(a, T, x, mask, gy);
        a->params[p] = keep - 1.0f;
        double lm = model_loss(a, T, x, mask, gy);
        a->params[p] = keep;
        double fd = (lp - lm) / 2.0;
        ck_assert_msg(fabs(fd - grad[p]) <= 1e-4 * (1.0 + fabs(fd)),
                      "%s r=%d R_v=%d R_p=%d l=%d: param %zu: scattered %.7g, finite difference %.7g", s->method, s->r,
                      s->equiv_rank, s->private_rank, s->shards, p, grad[p], fd);
    }
    for (int k = 0; k < L * MOD_COUNT; k++) free(x[k]), free(mask[k]), free(gy[k]), free(gxs[k]);
    free(x), free(mask), free(gy), free(gxs), free(grad);
    adapter_free(a);
}

START_TEST(test_pool_fd) {
    // q 8->8, k/v 8->4, o 8->8, gate/up 8->12, down 12->8: l in {1, 2, 4}.
    llama_config m = tiny_model(8, 12, 3, 2, 1, 4);
    adapter_spec s;
    s = mos_spec(3, 2, 1, 2, 2.0);
    check_pool_gradients(&s, &m);
    s = mos_spec(4, 2, 0, 4, 3.0);  // -sp, l = 4
    check_pool_gradients(&s, &m);
    s = mos_spec(2, 2, 2, 4, 1.0);  // all private
    check_pool_gradients(&s, &m);
    s = mos_spec(3, 2, 1, 2, 2.0);  // -pd with random scaling
    s.pair_dissociation = 0;
    s.scale_std = 0.3;
    s.scale_mean = 2.0;
    check_pool_gradients(&s, &m);
    s = mos_spec(8, 2, 1, 2, 2.0);
    s.pure_sharing = 1;
    s.scale_std = 0.2;
    check_pool_gradients(&s, &m);
    s = mos_spec(4, 2, 1, 2, 2.0);
    s.subset_selection = 1;
    check_pool_gradients(&s, &m);
    s = lora_spec(2, 4.0);
    check_pool_gradients(&s, &m);
}
END_TEST

// ---- LoRA = MoS with R_p = R_v = r ------------------------------------------------------------------

START_TEST(test_lora_equals_mos) {
    llama_config m = tiny_model(8, 12, 3, 2, 1, 4);
    for (int l = 1; l <= 4; l *= 2) {
        adapter_spec sm = mos_spec(2, 2, 2, l, 4.0), sl = lora_spec(2, 4.0);
        sm.seed = sl.seed = 11;
        adapter *am = NULL, *al = NULL;
        ck_assert_int_eq(adapter_create(&am, &sm, &m), MOSFT_OK);
        ck_assert_int_eq(adapter_create(&al, &sl, &m), MOSFT_OK);
        ck_assert_int_eq((int)am->n_params, (int)al->n_params);
        ck_assert(am->scaling == al->scaling && am->rank == al->rank);
        // Three SGD steps on random data; every step builds, backpropagates and scatters in both.
        for (int step = 0; step <= 3; step++) {
            float *gm = calloc(am->n_params, sizeof(float)), *gl = calloc(al->n_params, sizeof(float));
            int nonzero_b = 0;
            for (int i = 0; i < m.n_layers; i++)
                for (int t = 0; t < MOD_COUNT; t++) {
                    int di, dout, T = 4, r = 2;
                    llama_module_dims(&m, t, &di, &dout);
                    float Am[2 * 12], Bm[12 * 2], Al[2 * 12], Bl[12 * 2], gA[2 * 12], gB[12 * 2], x[4 * 12], gy[4 * 12],
                        gx[4 * 12];
                    am->ops->build(am, i, t, Am, Bm);
                    al->ops->build(al, i, t, Al, Bl);
                    ck_assert_msg(!memcmp(Am, Al, sizeof(float) * r * di), "l=%d step %d layer %d %s: A differs", l,
                                  step, i, k_module_names[t]);
                    ck_assert_msg(!memcmp(Bm, Bl, sizeof(float) * dout * r), "l=%d step %d layer %d %s: B differs", l,
                                  step, i, k_module_names[t]);
                    for (int e = 0; e < dout * r; e++) nonzero_b += Bm[e] != 0;
                    fill_random(x, (size_t)T * di);
                    fill_random(gy, (size_t)T * dout);
                    memset(gx, 0, sizeof gx);
                    adapter_lowrank_backward_cpu(T, di, dout, r, am->scaling, x, NULL, Am, Bm, gy, gx, gA, gB);
                    am->ops->scatter(am, i, t, gA, gB, gm);
                    al->ops->scatter(al, i, t, gA, gB, gl);
                }
            if (step == 0) ck_assert_int_eq(nonzero_b, 0);  // B = 0 at init
            if (step == 3) ck_assert_int_gt(nonzero_b, 100);
            for (size_t p = 0; p < am->n_params; p++) am->params[p] -= 0.1f * gm[p];
            for (size_t p = 0; p < al->n_params; p++) al->params[p] -= 0.1f * gl[p];
            free(gm);
            free(gl);
        }
        adapter_free(am);
        adapter_free(al);
    }
}
END_TEST

// ---- index tables and ablations ---------------------------------------------------------------------

static llama_config load_fixture(const char *name) {
    char p[256];
    snprintf(p, sizeof p, "tests/fixtures/configs/%s", name);
    llama_config m;
    ck_assert_msg(llama_config_load(&m, p) == MOSFT_OK, "%s", mosft_error());
    return m;
}

// Structure every MoS table must have: public entries in [0, P) and distinct, then the layer's own
// private shards in order.
static void check_tables(const adapter *a) {
    const adapter_spec *s = &a->spec;
    int L = a->model.n_layers, r = a->rank, l = s->shards;
    int64_t P = (int64_t)(s->equiv_rank - s->private_rank) * L * l, n_priv = (int64_t)s->private_rank * l;
    int npub = (r - s->private_rank) * l;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        for (int w = 0; w < 2; w++)
            for (int i = 0; i < L; i++) {
                const int32_t *tab = table(a, t, w ? 'B' : 'A', i);
                for (int j = 0; j < r * l; j++) {
                    if (j < npub)
                        ck_assert(tab[j] >= 0 && tab[j] < P);
                    else
                        ck_assert_int_eq(tab[j], (int)(P + i * n_priv + (j - npub)));
                    for (int j2 = 0; j2 < j; j2++) ck_assert_int_ne(tab[j], tab[j2]);
                }
            }
    }
}

START_TEST(test_tables_default) {
    llama_config m = load_fixture("llama2-7b");
    adapter_spec s = mos_spec(8, 2, 1, 4, 16.0);
    adapter *a = NULL;
    ck_assert_int_eq(adapter_create(&a, &s, &m), MOSFT_OK);
    ck_assert_int_eq(a->rank, 8);
    ck_assert(a->scaling == 2.0f);
    adapter_buffer *b = adapter_find_buffer(a, "mos.q.index_A");
    ck_assert(b->dtype == MOSFT_I32 && b->shape[0] == 32 && b->shape[1] == 32);
    ck_assert_int_eq((int)adapter_find_tensor(a, "mos.gate.pool_B")->shape[0], 256);
    ck_assert_int_eq((int)adapter_find_tensor(a, "mos.gate.pool_B")->shape[1], 2752);
    ck_assert_int_eq((int)adapter_find_tensor(a, "mos.down.pool_A")->shape[1], 2752);
    check_tables(a);
    // Pair dissociation: A and B tables are separate draws. Sharing: public shards recur across layers.
    // Uniformity: each of the P = 128 public shards is drawn about 7*2*32*28/128 = 98 times.
    int differ = 0, counts[128] = {0};
    for (int t = 0; t < MOD_COUNT; t++)
        for (int i = 0; i < 32; i++) {
            const int32_t *ta = table(a, t, 'A', i), *tb = table(a, t, 'B', i);
            differ += memcmp(ta, tb, 28 * sizeof(int32_t)) != 0;
            for (int j = 0; j < 28; j++) counts[ta[j]]++, counts[tb[j]]++;
        }
    ck_assert_int_eq(differ, 7 * 32);
    for (int n = 0; n < 128; n++) ck_assert_msg(counts[n] > 50 && counts[n] < 150, "shard %d drawn %d times", n, counts[n]);
    // Same seed: same adapter. Another seed: other tables. One module's tables do not depend on the
    // other targets (keyed by module).
    adapter *a2 = NULL, *a3 = NULL, *a4 = NULL;
    ck_assert_int_eq(adapter_create(&a2, &s, &m), MOSFT_OK);
    ck_assert_mem_eq(a->params, a2->params, a->n_params * sizeof(float));
    for (int i = 0; i < a->n_buffers; i++) ck_assert_mem_eq(a->buffers[i].data, a2->buffers[i].data, a->buffers[i].nbytes);
    adapter_spec s3 = s;
    s3.seed = 8;
    ck_assert_int_eq(adapter_create(&a3, &s3, &m), MOSFT_OK);
    ck_assert(memcmp(table(a, MOD_Q, 'A', 0), table(a3, MOD_Q, 'A', 0), 32 * sizeof(int32_t)) != 0);
    adapter_spec s4 = s;
    memset(s4.targets, 0, sizeof s4.targets);
    s4.targets[MOD_V] = 1;
    ck_assert_int_eq(adapter_create(&a4, &s4, &m), MOSFT_OK);
    ck_assert_mem_eq(table(a, MOD_V, 'B', 5), table(a4, MOD_V, 'B', 5), 32 * sizeof(int32_t));
    ck_assert_int_eq((int)a4->n_params, 2 * 32 * (4096 + 4096));
    adapter_free(a2);
    adapter_free(a3);
    adapter_free(a4);
    adapter_free(a);
}
END_TEST

START_TEST(test_tables_ablations) {
    llama_config m = load_fixture("llama2-7b");
    adapter *a = NULL;
    // -pd: I_b = I_a.
    adapter_spec s = mos_spec(8, 2, 1, 4, 16.0);
    s.pair_dissociation = 0;
    ck_assert_int_eq(adapter_create(&a, &s, &m), MOSFT_OK);
    check_tables(a);
    for (int t = 0; t < MOD_COUNT; t++)
        for (int i = 0; i < 32; i++) ck_assert_mem_eq(table(a, t, 'A', i), table(a, t, 'B', i), 32 * sizeof(int32_t));
    adapter_free(a);
    // -vs: l = 1, whole vectors.
    s = mos_spec(8, 2, 1, 1, 16.0);
    ck_assert_int_eq(adapter_create(&a, &s, &m), MOSFT_OK);
    check_tables(a);
    ck_assert_int_eq((int)adapter_find_buffer(a, "mos.q.index_A")->shape[1], 8);
    ck_assert_int_eq((int)adapter_find_tensor(a, "mos.down.pool_A")->shape[0], 64);
    ck_assert_int_eq((int)adapter_find_tensor(a, "mos.down.pool_A")->shape[1], 11008);
    adapter_free(a);
    // -sp: R_p = 0, every shard public.
    s = mos_spec(8, 2, 0, 4, 16.0);
    ck_assert_int_eq(adapter_create(&a, &s, &m), MOSFT_OK);
    check_tables(a);
    for (int i = 0; i < 32; i++)
        for (int j = 0; j < 32; j++) ck_assert(table(a, MOD_UP, 'A', i)[j] < 256);
    adapter_free(a);
    // Pure sharing: l = 1, R_p = 0, r = R_v L = 64, every layer the whole pool in order, same Delta W.
    s = mos_spec(8, 2, 1, 4, 16.0);
    s.pure_sharing = 1;
    ck_assert_int_eq(adapter_create(&a, &s, &m), MOSFT_OK);
    ck_assert_int_eq(a->rank, 64);
    ck_assert_int_eq(a->spec.shards, 1);
    ck_assert_int_eq(a->spec.private_rank, 0);
    ck_assert(a->scaling == 0.25f);
    ck_assert_int_eq((int)a->n_params, 4997120);
    for (int t = 0; t < MOD_COUNT; t++)
        for (int i = 0; i < 32; i++)
            for (int j = 0; j < 64; j++) {
                ck_assert_int_eq(table(a, t, 'A', i)[j], j);
                ck_assert_int_eq(table(a, t, 'B', i)[j], j);
            }
    {
        fill_random(a->params, a->n_params);
        size_t na = 64 * 4096, nb = 4096 * 64;
        float *A0 = malloc(4 * na), *B0 = malloc(4 * nb), *A9 = malloc(4 * na), *B9 = malloc(4 * nb);
        a->ops->build(a, 0, MOD_O, A0, B0);
        a->ops->build(a, 9, MOD_O, A9, B9);
        ck_assert_mem_eq(A0, A9, 4 * na);
        ck_assert_mem_eq(B0, B9, 4 * nb);
        free(A0), free(B0), free(A9), free(B9);
    }
    adapter_free(a);
    // Subset selection: l = 1, R_p = 0, r random pairs per layer (I_b = I_a).
    s = mos_spec(16, 2, 1, 4, 16.0);
    s.subset_selection = 1;
    ck_assert_int_eq(adapter_create(&a, &s, &m), MOSFT_OK);
    ck_assert_int_eq(a->rank, 16);
    ck_assert_int_eq(a->spec.shards, 1);
    ck_assert_int_eq(a->spec.private_rank, 0);
    ck_assert_int_eq(a->spec.pair_dissociation, 0);
    check_tables(a);
    for (int t = 0; t < MOD_COUNT; t++)
        for (int i = 0; i < 32; i++) ck_assert_mem_eq(table(a, t, 'A', i), table(a, t, 'B', i), 16 * sizeof(int32_t));
    ck_assert(memcmp(table(a, MOD_Q, 'A', 0), table(a, MOD_Q, 'A', 1), 16 * sizeof(int32_t)) != 0);
    adapter_free(a);
    // Random scaling: c = v / mu, v ~ N(mu, sigma^2): mean 1, std sigma / mu; folded into A.
    s = mos_spec(8, 2, 1, 4, 16.0);
    s.scale_mean = 2.0;
    s.scale_std = 0.5;
    ck_assert_int_eq(adapter_create(&a, &s, &m), MOSFT_OK);
    check_tables(a);
    double sum = 0, sq = 0;
    int n = 0;
    for (int t = 0; t < MOD_COUNT; t++) {
        char name[32];
        snprintf(name, sizeof name, "mos.%s.scale", k_module_names[t]);
        adapter_buffer *b = adapter_find_buffer(a, name);
        ck_assert(b && b->dtype == MOSFT_F32 && b->shape[0] == 32 && b->shape[1] == 8);
        for (int j = 0; j < 256; j++, n++) {
            double c = ((float *)b->data)[j];
            sum += c;
            sq += c * c;
        }
    }
    double mean = sum / n, sd = sqrt(sq / n - mean * mean);
    ck_assert_msg(fabs(mean - 1.0) < 0.02 && fabs(sd - 0.25) < 0.02, "scale mean %g std %g", mean, sd);
    {
        float *A = malloc(4 * 8 * 4096), *B = malloc(4 * 4096 * 8);
        a->ops->build(a, 3, MOD_K, A, B);
        const float *c = (float *)adapter_find_buffer(a, "mos.k.scale")->data + 3 * 8;
        const int32_t *ia = table(a, MOD_K, 'A', 3);
        const float *pa = pool(a, MOD_K, 'A');
        for (int k = 0; k < 8; k++)
            for (int j = 0; j < 4; j++)
                for (int e = 0; e < 1024; e += 97)
                    ck_assert(A[k * 4096 + j * 1024 + e] == c[k] * pa[(size_t)ia[k * 4 + j] * 1024 + e]);
        free(A);
        free(B);
    }
    adapter_free(a);
}
END_TEST

START_TEST(test_init) {
    llama_config m = load_fixture("llama2-7b");
    adapter_spec s = mos_spec(8, 2, 1, 4, 16.0);
    adapter *a = NULL;
    ck_assert_int_eq(adapter_create(&a, &s, &m), MOSFT_OK);
    for (int t = 0; t < MOD_COUNT; t++) {
        int di, dout;
        llama_module_dims(&m, t, &di, &dout);
        double bound = 1.0 / sqrt(di), sum = 0, sq = 0;
        char name[32];
        snprintf(name, sizeof name, "mos.%s.pool_A", k_module_names[t]);
        adapter_tensor *ta = adapter_find_tensor(a, name);
        const float *pa = adapter_tensor_data(a, ta);
        for (size_t e = 0; e < ta->numel; e++) {
            ck_assert(fabs(pa[e]) <= bound * (1 + 1.0 / 256));  // bf16 rounding may step past the bound
            ck_assert(bf16_round(pa[e]) == pa[e]);
            sum += pa[e];
            sq += (double)pa[e] * pa[e];
        }
        double mean = sum / ta->numel, var = sq / ta->numel;
        ck_assert_msg(fabs(mean) < 0.01 * bound && fabs(var / (bound * bound / 3) - 1) < 0.01, "%s mean %g var %g", name,
                      mean, var);
        snprintf(name, sizeof name, "mos.%s.pool_B", k_module_names[t]);
        adapter_tensor *tb = adapter_find_tensor(a, name);
        for (size_t e = 0; e < tb->numel; e++) ck_assert(adapter_tensor_data(a, tb)[e] == 0.0f);
    }
    adapter_free(a);
}
END_TEST

static void expect_error(const adapter_spec *s, const llama_config *m, const char *needle1, const char *needle2) {
    adapter *a = NULL;
    mosft_error_clear();
    int rc = adapter_create(&a, s, m);
    ck_assert_int_eq(rc, MOSFT_ERR_INPUT);
    ck_assert_ptr_null(a);
    ck_assert_msg(strstr(mosft_error(), needle1) && (!needle2 || strstr(mosft_error(), needle2)),
                  "message \"%s\" lacks \"%s\" / \"%s\"", mosft_error(), needle1, needle2 ? needle2 : "");
    ck_assert_int_eq(adapter_spec_check(s, m), MOSFT_ERR_INPUT);
}

START_TEST(test_constraints) {
    llama_config m7 = load_fixture("llama2-7b"), m3 = load_fixture("llama3.2-3b");
    adapter_spec s = mos_spec(8, 2, 1, 3, 16.0);
    expect_error(&s, &m7, "adapter.shards", "4096");
    ck_assert(strstr(mosft_error_hint(), "256"));
    s = mos_spec(8, 2, 1, 512, 16.0);  // 512 | 4096 but not 11008
    expect_error(&s, &m7, "adapter.shards", "11008");
    s = mos_spec(8, 2, 1, 2048, 16.0);  // 3B: 3072 % 2048 != 0
    expect_error(&s, &m3, "adapter.shards", "3072");
    ck_assert(strstr(mosft_error_hint(), "1024"));
    s = mos_spec(8, 2, 3, 4, 16.0);
    expect_error(&s, &m7, "adapter.private_rank", "min(2, 8)");
    s = mos_spec(2, 4, 3, 4, 16.0);  // R_p > r
    expect_error(&s, &m7, "adapter.private_rank", "got 3");
    s = mos_spec(40, 2, 1, 4, 16.0);  // 39 public vectors > (2-1)*32
    expect_error(&s, &m7, "adapter.r", "32");
    s = mos_spec(4, 2, 2, 4, 16.0);  // all private: r must be R_v
    expect_error(&s, &m7, "adapter.r", "r = R_v");
    s = mos_spec(8, 2, 1, 4, 16.0);
    s.pure_sharing = s.subset_selection = 1;
    expect_error(&s, &m7, "pure_sharing", NULL);
    s = mos_spec(8, 2, 1, 4, 16.0);
    memset(s.targets, 0, sizeof s.targets);
    expect_error(&s, &m7, "adapter.targets", NULL);
    s = mos_spec(8, 2, 1, 4, 16.0);
    snprintf(s.method, sizeof s.method, "nope");
    expect_error(&s, &m7, "adapter.method", "mos");
    // Valid edges: l = gcd; R_p = R_v = r; r - R_p = (R_v - R_p) L exactly.
    adapter *a = NULL;
    s = mos_spec(8, 2, 1, 1024, 16.0);
    ck_assert_int_eq(adapter_create(&a, &s, &m3), MOSFT_OK);
    adapter_free(a);
    s = mos_spec(33, 2, 1, 4, 16.0);
    ck_assert_int_eq(adapter_create(&a, &s, &m7), MOSFT_OK);
    check_tables(a);
    adapter_free(a);
}
END_TEST

// ---- parameter counts (MOS.md section 2) -------------------------------------------------------------

START_TEST(test_param_counts) {
    llama_config m7 = load_fixture("llama2-7b"), m13 = load_fixture("llama2-13b"), m3 = load_fixture("llama3.2-3b");
    static const struct {
        int r;
        int64_t n;
    } lora7[] = {{2, 4997120}, {4, 9994240}, {8, 19988480}, {16, 39976960}, {32, 79953920}, {64, 159907840}};
    for (size_t i = 0; i < sizeof lora7 / sizeof lora7[0]; i++) {
        adapter_spec s = lora_spec(lora7[i].r, 16);
        ck_assert_int_eq(adapter_param_count(&s, &m7), lora7[i].n);
    }
    // MoS: R_v = 2 and 8, any r, l, R_p.
    static const int knobs[][3] = {{2, 1, 0}, {4, 2, 1}, {8, 4, 1}, {16, 8, 2}, {32, 256, 1}, {64, 1, 0}, {2, 16, 2}};
    for (int Rv = 2; Rv <= 8; Rv += 6)
        for (size_t i = 0; i < sizeof knobs / sizeof knobs[0]; i++) {
            int r = knobs[i][0], l = knobs[i][1], Rp = knobs[i][2] > Rv ? Rv : knobs[i][2];
            if (Rp == Rv) r = Rv;
            adapter_spec s = mos_spec(r, Rv, Rp, l, 16);
            ck_assert_int_eq(adapter_spec_check(&s, &m7), MOSFT_OK);
            ck_assert_int_eq(adapter_param_count(&s, &m7), Rv == 2 ? 4997120 : 19988480);
            if (i < 3) {  // the real allocation agrees with the formula
                adapter *a = NULL;
                ck_assert_int_eq(adapter_create_layout(&a, &s, &m7), MOSFT_OK);
                ck_assert_int_eq((int64_t)a->n_params, Rv == 2 ? 4997120 : 19988480);
                adapter_free(a);
            }
        }
    adapter_spec s = lora_spec(2, 16);
    ck_assert_int_eq(adapter_param_count(&s, &m13), 7823360);
    ck_assert_int_eq(adapter_param_count(&s, &m3), 3039232);
    s = lora_spec(1, 16);
    ck_assert_int_eq(adapter_param_count(&s, &m13), 3911680);
    ck_assert_int_eq(adapter_param_count(&s, &m3), 1519616);
    s = mos_spec(8, 2, 1, 512, 16);  // 13B: l | 512
    ck_assert_int_eq(adapter_spec_check(&s, &m13), MOSFT_OK);
    ck_assert_int_eq(adapter_param_count(&s, &m13), 7823360);
    s = mos_spec(16, 2, 1, 1024, 16);
    ck_assert_int_eq(adapter_param_count(&s, &m3), 3039232);
    {
        adapter *a = NULL;
        ck_assert_int_eq(adapter_create_layout(&a, &s, &m3), MOSFT_OK);
        ck_assert_int_eq((int64_t)a->n_params, 3039232);
        ck_assert_int_eq((int)adapter_find_tensor(a, "mos.k.pool_B")->shape[1], 1);  // kv out 1024 / 1024
        adapter_free(a);
    }
}
END_TEST

// `mosft info CONFIG.json` prints the counts.
START_TEST(test_info_config) {
    mosft_config c;
    config_defaults(&c);
    ck_assert_int_eq(config_set(&c, "model.path=tests/fixtures/configs/llama2-7b"), MOSFT_OK);
    // Every knob explicit: the defaults may change.
    ck_assert_int_eq(config_set(&c, "adapter.method=mos"), MOSFT_OK);
    ck_assert_int_eq(config_set(&c, "adapter.r=8"), MOSFT_OK);
    ck_assert_int_eq(config_set(&c, "adapter.equiv_rank=2"), MOSFT_OK);
    ck_assert_int_eq(config_set(&c, "adapter.private_rank=1"), MOSFT_OK);
    ck_assert_int_eq(config_set(&c, "adapter.shards=4"), MOSFT_OK);
    ck_assert_int_eq(config_set(&c, "adapter.pure_sharing=false"), MOSFT_OK);
    ck_assert_int_eq(config_set(&c, "adapter.targets=all"), MOSFT_OK);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    ck_assert_int_eq(info_config(&c, f), MOSFT_OK);
    fclose(f);
    ck_assert_msg(strstr(text, "4,997,120") && strstr(text, "LoRA rank 2") && strstr(text, "mos.gate.pool_B") &&
                      strstr(text, "[256, 2752]") && strstr(text, "19,988,480"),
                  "%s", text);
    free(text);
    ck_assert_int_eq(config_set(&c, "adapter.method=lora"), MOSFT_OK);
    ck_assert_int_eq(config_set(&c, "adapter.r=16"), MOSFT_OK);
    f = open_memstream(&text, &len);
    ck_assert_int_eq(info_config(&c, f), MOSFT_OK);
    fclose(f);
    ck_assert_msg(strstr(text, "39,976,960") && strstr(text, "LoRA rank 16"), "%s", text);
    free(text);
    ck_assert_int_eq(config_set(&c, "adapter.method=mos"), MOSFT_OK);
    ck_assert_int_eq(config_set(&c, "adapter.shards=3"), MOSFT_OK);
    f = open_memstream(&text, &len);
    ck_assert_int_eq(info_config(&c, f), MOSFT_ERR_INPUT);
    fclose(f);
    free(text);
    ck_assert(strstr(mosft_error(), "adapter.shards"));
    config_free(&c);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("adapter_mos");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_exact_vector);
    tcase_add_test(tc, test_lowrank_fd);
    tcase_add_test(tc, test_dropout_mask);
    tcase_add_test(tc, test_pool_fd);
    tcase_add_test(tc, test_lora_equals_mos);
    tcase_add_test(tc, test_tables_default);
    tcase_add_test(tc, test_tables_ablations);
    tcase_add_test(tc, test_init);
    tcase_add_test(tc, test_constraints);
    tcase_add_test(tc, test_param_counts);
    tcase_add_test(tc, test_info_config);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(suite)
