// test_ops_cpu_torch.c: the CPU reference ops against PyTorch + transformers on the same inputs.
//
// tests/fixtures/ops/ops_ref.safetensors was written by scripts/ref_ops_torch.py with the real HF code
// (LlamaRMSNorm, LlamaRotaryEmbedding default and llama3 + apply_rotary_pos_emb, sdpa_attention_forward
// with create_causal_mask, silu*up, ForCausalLMLoss, torch.optim.AdamW): inputs, outputs and the
// autograd input gradients of sum(gout * out). Tolerance: fp32 rounding differences only (~1e-5
// relative; torch sums in other orders).
#include <stdint.h>

#include "core/model.h"
#include "core/ops_cpu.h"
#include "core/safetensors.h"
#include "tests/test_util.h"

#define FIXTURE "tests/fixtures/ops/ops_ref.safetensors"

static st_file g_st;

static void open_fixture(void) {
    int rc = st_open(&g_st, FIXTURE);
    ck_assert_msg(rc == MOSFT_OK, "%s: %s", FIXTURE, mosft_error());
}

// A tensor of the fixture as a fresh fp32 buffer; its element count must be `numel`.
static float *get_f32(const char *name, int64_t numel) {
    const st_tensor *t = st_find(&g_st, name);
    ck_assert_msg(t != NULL, "%s: tensor %s missing (re-run scripts/ref_ops_torch.py)", FIXTURE, name);
    ck_assert_msg(t->numel == numel, "%s: %s has %lld elements, expected %lld", FIXTURE, name, (long long)t->numel,
                  (long long)numel);
    float *p = xmalloc((size_t)numel * sizeof(float));
    st_tensor_to_f32(t, p);
    return p;
}
static int32_t *get_i32(const char *name, int64_t numel) {
    const st_tensor *t = st_find(&g_st, name);
    ck_assert_msg(t != NULL && t->dtype == MOSFT_I32 && t->numel == numel, "%s: %s: expected I32[%lld]", FIXTURE,
                  name, (long long)numel);
    int32_t *p = xmalloc((size_t)numel * sizeof(int32_t));
    memcpy(p, t->data, (size_t)numel * sizeof(int32_t));
    return p;
}
static double meta_num(const char *key) {
    const char *v = st_meta(&g_st, key);
    ck_assert_msg(v != NULL, "%s: __metadata__ has no %s", FIXTURE, key);
    return atof(v);
}
static int64_t dim(const char *name, int d) {
    const st_tensor *t = st_find(&g_st, name);
    ck_assert_msg(t != NULL && d < t->ndim, "%s: %s: no dimension %d", FIXTURE, name, d);
    return t->shape[d];
}

static void expect_close(const char *what, const float *a, const float *b, size_t n, double atol, double rtol) {
    size_t w = 0;
    double r = max_tol_ratio(a, b, n, atol, rtol, &w);
    if (getenv("TEST_VERBOSE")) fprintf(stderr, "torch %-28s worst ratio %.3f\n", what, r);
    if (getenv("TEST_VERBOSE")) fprintf(stderr, "      worst at %zu: %.9g vs %.9g\n", w, (double)a[w], (double)b[w]);
    ck_assert_msg(r <= 1.0, "%s: element %zu: got %.9g, torch %.9g (ratio %.2f)", what, w, (double)a[w], (double)b[w],
                  r);
}

START_TEST(test_torch_rmsnorm) {
    open_fixture();
    int64_t T = dim("rmsnorm.x", 0), C = dim("rmsnorm.x", 1), n = T * C;
    float *x = get_f32("rmsnorm.x", n), *w = get_f32("rmsnorm.weight", C), *y = get_f32("rmsnorm.y", n);
    float *gy = get_f32("rmsnorm.gy", n), *gx = get_f32("rmsnorm.gx", n);
    float eps = (float)meta_num("rmsnorm.eps");
    float *out = xmalloc((size_t)n * sizeof(float)), *rstd = xmalloc((size_t)T * sizeof(float));
    float *g = xcalloc((size_t)n, sizeof(float));
    rmsnorm_forward_cpu(out, rstd, x, w, T, (int)C, eps);
    rmsnorm_backward_cpu(g, gy, x, w, rstd, T, (int)C, eps);
    expect_close("rmsnorm forward", out, y, (size_t)n, 1e-6, 1e-5);
    expect_close("rmsnorm backward", g, gx, (size_t)n, 1e-6, 1e-5);
    free(x), free(w), free(y), free(gy), free(gx), free(out), free(rstd), free(g);
    st_close(&g_st);
}
END_TEST

// One rope case: x [B][S][H][D] rotated with `inv_freq` (ours or HF's) against HF's output and gradient.
static void rope_case(const char *name, const float *inv_freq) {
    char k[64];
    snprintf(k, sizeof k, "%s.x", name);
    int64_t B = dim(k, 0), S = dim(k, 1), H = dim(k, 2), D = dim(k, 3), n = B * S * H * D;
    float *x = get_f32(k, n);
    snprintf(k, sizeof k, "%s.pos", name);
    int32_t *pos = get_i32(k, B * S);
    snprintf(k, sizeof k, "%s.y", name);
    float *y = get_f32(k, n);
    snprintf(k, sizeof k, "%s.gy", name);
    float *gy = get_f32(k, n);
    snprintf(k, sizeof k, "%s.gx", name);
    float *gx = get_f32(k, n);
    rope_forward_cpu(x, pos, inv_freq, B * S, (int)H, (int)D);
    rope_backward_cpu(gy, pos, inv_freq, B * S, (int)H, (int)D);
    snprintf(k, sizeof k, "%s forward", name);
    expect_close(k, x, y, (size_t)n, 1e-6, 1e-5);
    snprintf(k, sizeof k, "%s backward", name);
    expect_close(k, gy, gx, (size_t)n, 1e-6, 1e-5);
    free(x), free(pos), free(y), free(gy), free(gx);
}

// llama_rope_inv_freq (core/model_config.c) in fp32 against HF's inv_freq buffer.
static void check_inv_freq(const llama_config *c, const char *name, float *ours) {
    int half = c->head_dim / 2;
    double inv[64];
    llama_rope_inv_freq(c, inv);
    for (int i = 0; i < half; i++) ours[i] = (float)inv[i];
    float *hf = get_f32(name, half);
    expect_close(name, ours, hf, (size_t)half, 0.0, 3e-7);
    free(hf);
}

START_TEST(test_torch_rope) {
    open_fixture();
    int D = (int)dim("rope_default.x", 3);
    ck_assert_int_le(D, 128);
    llama_config c;
    memset(&c, 0, sizeof c);
    c.head_dim = D;
    c.rope_theta = meta_num("rope_default.theta");
    float ours_default[64], ours_llama3[64];
    check_inv_freq(&c, "rope_default.inv_freq", ours_default);
    c.rope_theta = meta_num("rope_llama3.rope_theta");
    c.rope_llama3 = 1;
    c.rope_factor = meta_num("rope_llama3.factor");
    c.rope_low_freq_factor = meta_num("rope_llama3.low_freq_factor");
    c.rope_high_freq_factor = meta_num("rope_llama3.high_freq_factor");
    c.rope_orig_max_pos = (int)meta_num("rope_llama3.original_max_position_embeddings");
    check_inv_freq(&c, "rope_llama3.inv_freq", ours_llama3);
    // Positions 0..9 with our inv_freq; far positions (up to 131071) with HF's, where one ulp of
    // inv_freq would move the angle visibly: that case checks that the fp32 angle is formed as HF does.
    rope_case("rope_default", ours_default);
    rope_case("rope_llama3", ours_llama3);
    float *hf_inv = get_f32("rope_far.inv_freq", D / 2);
    rope_case("rope_far", hf_inv);
    free(hf_inv);
    st_close(&g_st);
}
END_TEST

START_TEST(test_torch_attention) {
    open_fixture();
    int64_t B = dim("attn.q", 0), S = dim("attn.q", 1), Hq = dim("attn.q", 2), D = dim("attn.q", 3);
    int64_t Hkv = dim("attn.k", 2), nq = B * S * Hq * D, nk = B * S * Hkv * D;
    float *q = get_f32("attn.q", nq), *k = get_f32("attn.k", nk), *v = get_f32("attn.v", nk);
    int32_t *mask = get_i32("attn.mask", B * S);
    float *o_ref = get_f32("attn.out", nq), *go = get_f32("attn.gout", nq), *gq_ref = get_f32("attn.gq", nq);
    float *gk_ref = get_f32("attn.gk", nk), *gv_ref = get_f32("attn.gv", nk);
    float *o = xmalloc((size_t)nq * sizeof(float)), *gq = xcalloc((size_t)nq, sizeof(float));
    float *gk = xcalloc((size_t)nk, sizeof(float)), *gv = xcalloc((size_t)nk, sizeof(float));
    attention_forward_cpu(o, q, k, v, mask, (int)B, (int)S, (int)Hq, (int)Hkv, (int)D);
    attention_backward_cpu(gq, gk, gv, go, q, k, v, mask, (int)B, (int)S, (int)Hq, (int)Hkv, (int)D);
    // Padded query rows included: HF attends them causally to the real keys, as we do. Gradients that
    // are 0 in exact arithmetic (a row with a single key has p = 1, so ds = 0) come out exactly 0 here
    // and ~1e-6 in torch (gradients here are up to ~3): hence the absolute part of the tolerance.
    expect_close("attention forward", o, o_ref, (size_t)nq, 1e-6, 1e-5);
    expect_close("attention d/dq", gq, gq_ref, (size_t)nq, 3e-6, 1e-5);
    expect_close("attention d/dk", gk, gk_ref, (size_t)nk, 3e-6, 1e-5);
    expect_close("attention d/dv", gv, gv_ref, (size_t)nk, 3e-6, 1e-5);
    free(q), free(k), free(v), free(mask), free(o_ref), free(go), free(gq_ref), free(gk_ref), free(gv_ref);
    free(o), free(gq), free(gk), free(gv);
    st_close(&g_st);
}
END_TEST

START_TEST(test_torch_swiglu) {
    open_fixture();
    int64_t n = dim("swiglu.gate", 0) * dim("swiglu.gate", 1);
    float *gate = get_f32("swiglu.gate", n), *up = get_f32("swiglu.up", n), *y = get_f32("swiglu.y", n);
    float *gy = get_f32("swiglu.gy", n), *gg_ref = get_f32("swiglu.ggate", n), *gu_ref = get_f32("swiglu.gup", n);
    float *out = xmalloc((size_t)n * sizeof(float)), *gg = xcalloc((size_t)n, sizeof(float));
    float *gu = xcalloc((size_t)n, sizeof(float));
    swiglu_forward_cpu(out, gate, up, n);
    swiglu_backward_cpu(gg, gu, gy, gate, up, n);
    expect_close("swiglu forward", out, y, (size_t)n, 1e-6, 1e-5);
    expect_close("swiglu d/dgate", gg, gg_ref, (size_t)n, 1e-6, 1e-5);
    expect_close("swiglu d/dup", gu, gu_ref, (size_t)n, 1e-6, 1e-5);
    free(gate), free(up), free(y), free(gy), free(gg_ref), free(gu_ref), free(out), free(gg), free(gu);
    st_close(&g_st);
}
END_TEST

START_TEST(test_torch_lmhead_ce) {
    open_fixture();
    int64_t B = dim("ce.h", 0), S = dim("ce.h", 1), C = dim("ce.h", 2), V = dim("ce.W", 0), T = B * S;
    float *h = get_f32("ce.h", T * C), *W = get_f32("ce.W", V * C), *logits_ref = get_f32("ce.logits", T * V);
    float *loss_ref = get_f32("ce.loss", 1), *gh_ref = get_f32("ce.gh", T * C);
    int32_t *labels = get_i32("ce.labels", T);
    // HF shifts inside the loss: the target of position s is the label of s+1 in the same sequence.
    int32_t *targets = xmalloc((size_t)T * sizeof(int32_t));
    int64_t n_sup = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t s = 0; s < S; s++) {
            targets[b * S + s] = s + 1 < S ? labels[b * S + s + 1] : OPS_IGNORE_INDEX;
            n_sup += targets[b * S + s] != OPS_IGNORE_INDEX;
        }
    float *logits = xmalloc((size_t)(T * V) * sizeof(float)), *gh = xcalloc((size_t)(T * C), sizeof(float));
    int64_t counted = 0;
    double loss_sum = lmhead_ce_forward_backward_cpu(h, W, targets, T, (int)C, (int)V, 1.0f / (float)n_sup, gh,
                                                     logits, &counted);
    ck_assert_int_eq(counted, n_sup);
    expect_close("lm_head logits", logits, logits_ref, (size_t)(T * V), 1e-6, 1e-5);
    double mean = loss_sum / (double)counted;
    ck_assert_msg(fabs(mean - loss_ref[0]) <= 1e-5 * fabs(loss_ref[0]), "loss %.9g, torch %.9g", mean,
                  (double)loss_ref[0]);
    expect_close("cross-entropy d/dh", gh, gh_ref, (size_t)(T * C), 1e-7, 1e-5);
    free(h), free(W), free(logits_ref), free(loss_ref), free(gh_ref), free(labels), free(targets), free(logits);
    free(gh);
    st_close(&g_st);
}
END_TEST

START_TEST(test_torch_adamw) {
    open_fixture();
    int64_t n = dim("adamw.p0", 0);
    float *p = get_f32("adamw.p0", n), *m = xcalloc((size_t)n, sizeof(float)), *v = xcalloc((size_t)n, sizeof(float));
    double lr = meta_num("adamw.lr"), b1 = meta_num("adamw.beta1"), b2 = meta_num("adamw.beta2");
    double eps = meta_num("adamw.eps"), wd = meta_num("adamw.weight_decay");
    for (int step = 1; step <= 3; step++) {
        char k[32];
        snprintf(k, sizeof k, "adamw.g%d", step);
        float *g = get_f32(k, n);
        snprintf(k, sizeof k, "adamw.p%d", step);
        float *p_ref = get_f32(k, n);
        adamw_update_cpu(p, g, m, v, n, lr, b1, b2, eps, wd, step);
        snprintf(k, sizeof k, "adamw step %d", step);
        expect_close(k, p, p_ref, (size_t)n, 1e-7, 1e-6);
        free(g), free(p_ref);
    }
    float *m_ref = get_f32("adamw.m3", n), *v_ref = get_f32("adamw.v3", n);
    expect_close("adamw exp_avg", m, m_ref, (size_t)n, 1e-8, 1e-6);
    expect_close("adamw exp_avg_sq", v, v_ref, (size_t)n, 1e-10, 1e-6);
    free(p), free(m), free(v), free(m_ref), free(v_ref);
    st_close(&g_st);
}
END_TEST

static Suite *torch_suite(void) {
    Suite *s = suite_create("ops_cpu_torch");
    TCase *tc = tcase_create("torch");
    tcase_add_test(tc, test_torch_rmsnorm);
    tcase_add_test(tc, test_torch_rope);
    tcase_add_test(tc, test_torch_attention);
    tcase_add_test(tc, test_torch_swiglu);
    tcase_add_test(tc, test_torch_lmhead_ce);
    tcase_add_test(tc, test_torch_adamw);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(torch_suite)
