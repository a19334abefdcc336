// test_engine_peers.c: the peer adapters inside the CPU training engine (core/backend_cpu.c) on the
// real stories260K model (NF4 base), one fixed micro-batch: finite differences of the engine's loss
// on the parameters with the largest gradients (dropout on, so the masks and SiRA's gate dropout are
// reproduced), recompute = full identical to recompute = none, and AdamW steps that reduce the loss
// from each method's own initialization.
#include <math.h>

#include "core/adapter.h"
#include "core/backend.h"
#include "core/config.h"
#include "core/model.h"
#include "core/rng.h"
#include "tests/test_util.h"
#include <time.h>
static double now_s(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

#define MODEL_DIR "tests/fixtures/stories260K"

typedef struct {
    const char *what;
    adapter_spec s;
} peer_case;

static adapter_spec peer_spec(const char *method, int r) {
    mosft_config c;
    config_defaults(&c);
    adapter_spec s;
    adapter_spec_from_config(&s, &c);
    config_free(&c);
    snprintf(s.method, sizeof s.method, "%s", method);
    s.r = r;
    s.alpha = 16;
    s.dropout = 0.1;
    s.seed = 1;
    for (int t = 0; t < MOD_COUNT; t++) s.targets[t] = 1;
    return s;
}

static int make_cases(peer_case *c) {
    int n = 0;
    c[n].what = "prolora r4 u1 m2 n2", c[n].s = peer_spec("prolora", 4), c[n++].s.prolora_unshared_r = 1;
    c[n].what = "vera r16", c[n++].s = peer_spec("vera", 16);
    c[n].what = "tied_lora r4 vBuA", c[n++].s = peer_spec("tied_lora", 4);
    c[n].what = "sharelora r4 qkv", c[n].s = peer_spec("sharelora", 4);
    snprintf(c[n++].s.sharelora_share, 8, "qkv");
    c[n].what = "sharelora r4 B", c[n].s = peer_spec("sharelora", 4);
    snprintf(c[n++].s.sharelora_share, 8, "B");
    c[n].what = "sira E4 k2 r2", c[n].s = peer_spec("sira", 2), c[n].s.sira_experts = 4, c[n].s.sira_top_k = 2;
    c[n++].s.sira_capacity_factor = 1.0;
    return n;
}

// One right-padded micro-batch of 2 x 32 token ids (fixed), labels = the ids, the first 4 and the
// padding unsupervised.
typedef struct {
    int32_t ids[2 * 32], labels[2 * 32], mask[2 * 32];
    micro_batch mb;
} batch;

static void batch_make(batch *b, int vocab) {
    int B = 2, S = 32;
    for (int i = 0; i < B * S; i++) {
        int t = i % S, row = i / S, pad = row == 1 && t >= 26;
        b->ids[i] = pad ? 0 : 3 + (int)(rng_u32(rng_key(RNG_INIT, 5, 5, 5, 5), (uint64_t)i) % (uint32_t)(vocab - 3));
        b->mask[i] = !pad;
        b->labels[i] = pad || t < 4 ? -100 : b->ids[i];
    }
    b->mb = (micro_batch){B, S, b->ids, b->labels, b->mask};
}

static double step_loss(backend *be, const micro_batch *mb, const dropout_ctx *dc) {
    int64_t ns = 0;
    for (int i = 0; i < mb->B * mb->S; i++) ns += i % mb->S > 0 && mb->labels[i] != -100;
    double s = 0;
    int64_t n = 0;
    ck_assert_int_eq(be->ops->forward_backward(be, mb, 1.0f / (float)ns, dc, &s, &n), MOSFT_OK);
    ck_assert_int_eq(n, ns);
    return s / (double)n;
}

static backend *open_backend(const llama_model *m, adapter *ad, const char *recompute) {
    backend *be = NULL;
    backend_opts opt = {recompute, 0.9, 0.999, 1e-8, 0.0, 0, 0};
    ck_assert_int_eq(backend_cpu_create(&be, m, ad, &opt), MOSFT_OK);
    return be;
}

static void randomize(adapter *a, uint64_t seed) {
    uint64_t k = rng_key(RNG_INIT, seed, 99, 0, 0);
    for (size_t i = 0; i < a->n_params; i++) a->params[i] += 0.05f * rng_normal(k, i);
}

START_TEST(test_engine_fd) {
    llama_model m;
    ck_assert_int_eq(llama_model_load(&m, MODEL_DIR, "nf4", 1), MOSFT_OK);
    batch b;
    batch_make(&b, m.cfg.vocab);
    peer_case cases[8];
    int n = make_cases(cases);
    // SiRA with k = E and room for every token: the routing is the smooth softmax (the top-k and capacity
    // cut-offs, where the loss jumps, are tested by hand in test_adapter_peers).
    cases[n - 1].s.sira_experts = cases[n - 1].s.sira_top_k = 3, cases[n - 1].s.sira_capacity_factor = 1.0;
    cases[n - 1].what = "sira E3 k3";
    dropout_ctx dc = {3, 2, 0};
    for (int ci = 0; ci < n; ci++) {
        adapter *a = NULL;
        ck_assert_int_eq(adapter_create(&a, &cases[ci].s, &m.cfg), MOSFT_OK);
        randomize(a, (uint64_t)ci);
        backend *be = open_backend(&m, a, "full");
        be->ops->set_state(be, a->params, NULL, NULL);
        step_loss(be, &b.mb, &dc);
        float *g = xmalloc(sizeof(float) * a->n_params);
        be->ops->get_grads(be, g);
        // The largest gradient of the first, a middle and the last tensor.
        int pick[3] = {0, a->n_tensors / 2, a->n_tensors - 1};
        for (int k = 0; k < 3; k++) {
            const adapter_tensor *t = &a->tensors[pick[k]];
            size_t best = 0;
            for (size_t i = 0; i < t->numel; i++)
                if (fabs(g[t->offset + i]) > fabs(g[t->offset + best])) best = i;
            float *p = adapter_tensor_data(a, t) + best, p0 = *p;
            // Central differences at h and h/2, extrapolated (Richardson): the h^2 term of the network's
            // curvature cancels.
            double h = 1e-2 * fmax(1.0, fabs(p0)), fdh[2];
            for (int w = 0; w < 2; w++) {
                double hw = w ? h / 2 : h, l[2];
                for (int sgn = 0; sgn < 2; sgn++) {
                    *p = (float)(p0 + (sgn ? -hw : hw));
                    be->ops->set_state(be, a->params, NULL, NULL);
                    be->ops->zero_grad(be);
                    l[sgn] = step_loss(be, &b.mb, &dc);
                }
                fdh[w] = (l[0] - l[1]) / (2 * hw);
            }
            *p = p0;
            be->ops->set_state(be, a->params, NULL, NULL);
            be->ops->zero_grad(be);
            double l0 = step_loss(be, &b.mb, &dc);
            // The loss is a float sum: its rounding (~1e-7 of the loss) over the step bounds what FD resolves.
            double fd = (4 * fdh[1] - fdh[0]) / 3, an = g[t->offset + best], noise = 4e-6 * fabs(l0) / h;
            fprintf(stderr, "%-20s FD %s[%zu]: backward %.6g, finite difference %.6g\n", cases[ci].what, t->name, best, an,
                    fd);
            ck_assert_msg(an != 0 && fabs(fd - an) <= 5e-3 * fabs(an) + noise, "%s: %s[%zu]: backward %g vs %g",
                          cases[ci].what, t->name, best, an, fd);
        }
        free(g);
        backend_destroy(be);
        adapter_free(a);
    }
    llama_model_free(&m);
}
END_TEST

// recompute = full regenerates the dropout masks (and SiRA's routing and gate dropout) exactly.
START_TEST(test_engine_recompute) {
    llama_model m;
    ck_assert_int_eq(llama_model_load(&m, MODEL_DIR, "nf4", 1), MOSFT_OK);
    batch b;
    batch_make(&b, m.cfg.vocab);
    peer_case cases[8];
    int n = make_cases(cases);
    dropout_ctx dc = {9, 1, 0};
    for (int ci = 0; ci < n; ci++) {
        adapter *a = NULL;
        ck_assert_int_eq(adapter_create(&a, &cases[ci].s, &m.cfg), MOSFT_OK);
        randomize(a, 50 + (uint64_t)ci);
        backend *b1 = open_backend(&m, a, "none"), *b2 = open_backend(&m, a, "full");
        b1->ops->set_state(b1, a->params, NULL, NULL);
        b2->ops->set_state(b2, a->params, NULL, NULL);
        double l1 = step_loss(b1, &b.mb, &dc), l2 = step_loss(b2, &b.mb, &dc);
        ck_assert_msg(l1 == l2, "%s: loss %.9g vs %.9g", cases[ci].what, l1, l2);
        float *g1 = xmalloc(sizeof(float) * a->n_params), *g2 = xmalloc(sizeof(float) * a->n_params);
        b1->ops->get_grads(b1, g1);
        b2->ops->get_grads(b2, g2);
        ck_assert_msg(!memcmp(g1, g2, sizeof(float) * a->n_params), "%s: gradients differ under recompute", cases[ci].what);
        free(g1), free(g2);
        backend_destroy(b1);
        backend_destroy(b2);
        adapter_free(a);
    }
    llama_model_free(&m);
}
END_TEST

// 20 AdamW steps on the fixed batch from each method's own init (Delta W = 0): the loss goes down.
START_TEST(test_engine_trains) {
    llama_model m;
    ck_assert_int_eq(llama_model_load(&m, MODEL_DIR, "nf4", 1), MOSFT_OK);
    batch b;
    batch_make(&b, m.cfg.vocab);
    peer_case cases[8];
    int n = make_cases(cases);
    for (int ci = 0; ci < n; ci++) {
        adapter *a = NULL;
        ck_assert_int_eq(adapter_create(&a, &cases[ci].s, &m.cfg), MOSFT_OK);
        backend *be = open_backend(&m, a, "none");
        double first = 0, last = 0, t0 = now_s();
        for (int step = 0; step < 20; step++) {
            dropout_ctx dc = {1, step, 0};
            double l = step_loss(be, &b.mb, &dc);
            if (step == 0) first = l;
            last = l;
            double norm = be->ops->grad_norm(be), clip = 1.0 / (norm + 1e-6);
            be->ops->optimizer_step(be, 1e-2f, (float)(clip < 1 ? clip : 1), step + 1);
        }
        fprintf(stderr, "%-20s %zu params: loss %.4f -> %.4f after 20 steps (%.1f s)\n", cases[ci].what, a->n_params, first, last, now_s() - t0);
        ck_assert_msg(last < first - 0.05, "%s: loss %.4f -> %.4f", cases[ci].what, first, last);
        backend_destroy(be);
        adapter_free(a);
    }
    llama_model_free(&m);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("engine_peers");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, test_engine_fd);
    tcase_add_test(tc, test_engine_recompute);
    tcase_add_test(tc, test_engine_trains);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(suite)
