// test_ops_cpu.c: the CPU reference ops (core/ops_cpu.h) against independent references:
//  - forwards against naive formulas evaluated in double (attention as a direct loop, RoPE as a complex
//    rotation, RMSNorm and SwiGLU as written, cross-entropy from double logits), and the blocked matmul
//    against the naive fp32 triple loop, bit for bit;
//  - every backward against central finite differences of L = sum(gout * out) (L in double; inputs and
//    gout fresh random values; gradients accumulated onto random starting values to check "+=");
//  - AdamW against two steps written out by hand;
//  - determinism: 1 and 2 threads give the same bits.
// The comparison with PyTorch/transformers is in test_ops_cpu_torch.c.
#include <stdint.h>

#include "core/ops_cpu.h"
#include "core/rng.h"
#include "tests/test_util.h"

// ---- helpers ----
static uint64_t g_stream = 1;

// A fresh buffer of uniform values in [lo, hi), each call its own random stream.
static float *rnd(size_t n, float lo, float hi) {
    float *p = xmalloc((n ? n : 1) * sizeof(float));
    uint64_t key = rng_key(RNG_INIT, 0x0957ull, g_stream++, 0, 0);
    for (size_t i = 0; i < n; i++) p[i] = lo + (hi - lo) * rng_uniform(key, i);
    return p;
}
static float *copyf(const float *x, size_t n) {
    float *p = xmalloc((n ? n : 1) * sizeof(float));
    memcpy(p, x, n * sizeof(float));
    return p;
}
static double dot_d(const float *a, const float *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}
// grad - base, in double rounded to float: the part a "+=" backward added.
static float *added(const float *grad, const float *base, size_t n) {
    float *p = xmalloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = (float)((double)grad[i] - (double)base[i]);
    return p;
}

// Central differences (the 4-point stencil, error O(h^4), so that h can be large enough for the fp32
// rounding of L to stay small) of the objective f at up to 48 coordinates of x[n] against the analytic
// g[n]: |fd - g| <= atol + rtol |fd|, reported as the worst ratio, which must be <= 1. h is a power of
// two so that x +- h, x +- 2h are exact for |x| < 2.
typedef double (*objective_fn)(void *ctx);
static double eval_at(float *x, size_t i, float v, objective_fn f, void *ctx) {
    float xi = x[i];
    x[i] = v;
    double l = f(ctx);
    x[i] = xi;
    return l;
}
static void check_fd(const char *what, float *x, const float *g, size_t n, objective_fn f, void *ctx, double atol,
                     double rtol) {
    const float h = 1.0f / 64;
    size_t probes = n < 48 ? n : 48;
    uint64_t key = rng_key(RNG_INIT, 0xfdull, g_stream++, 0, 0);
    double worst = 0.0, wfd = 0.0;
    size_t wi = 0;
    for (size_t p = 0; p < probes; p++) {
        size_t i = n <= 48 ? p : (size_t)(rng_u32(key, p) % n);
        float xi = x[i];
        double l1 = eval_at(x, i, xi + h, f, ctx) - eval_at(x, i, xi - h, f, ctx);
        double l2 = eval_at(x, i, xi + 2 * h, f, ctx) - eval_at(x, i, xi - 2 * h, f, ctx);
        double fd = (8.0 * l1 - l2) / (12.0 * h);
        double r = fabs(fd - g[i]) / (atol + rtol * fabs(fd));
        if (!(r <= worst)) {
            worst = r;
            wi = i;
            wfd = fd;
        }
    }
    if (getenv("TEST_VERBOSE")) fprintf(stderr, "fd %-28s worst ratio %.3f\n", what, worst);
    ck_assert_msg(worst <= 1.0, "%s: d/dx[%zu]: analytic %.9g, finite difference %.9g (ratio %.2f)", what, wi,
                  (double)g[wi], wfd, worst);
}

static void expect_close(const char *what, const float *a, const float *b, size_t n, double atol, double rtol) {
    size_t w = 0;
    double r = max_tol_ratio(a, b, n, atol, rtol, &w);
    if (getenv("TEST_VERBOSE")) fprintf(stderr, "cmp %-27s worst ratio %.3f\n", what, r);
    ck_assert_msg(r <= 1.0, "%s: element %zu: got %.9g, expected %.9g (ratio %.2f)", what, w, (double)a[w],
                  (double)b[w], r);
}

// ---- matmul ----
// The definition the blocked gemm must reproduce bit for bit: start value, then products in k order.
static void gemm_naive(int ta, int tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                       int64_t ldb, float *C, int64_t ldc, int acc) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            float s = acc ? C[i * ldc + j] : 0.0f;
            for (int64_t k = 0; k < K; k++) {
                float a = ta ? A[k * lda + i] : A[i * lda + k];
                float b = tb ? B[j * ldb + k] : B[k * ldb + j];
                s += a * b;
            }
            C[i * ldc + j] = s;
        }
}

static const int64_t k_shapes[][3] = {{1, 1, 1},    {5, 3, 7},    {6, 16, 2},     {13, 17, 300},
                                      {100, 270, 5}, {97, 33, 513}, {200, 300, 260}, {7, 40, 1}};

START_TEST(test_gemm_matches_naive_bits) {
    for (int baseline = 0; baseline < 2; baseline++) {
        gemm_cpu_force_baseline(baseline);
        for (size_t s = 0; s < sizeof k_shapes / sizeof k_shapes[0]; s++) {
            int64_t M = k_shapes[s][0], N = k_shapes[s][1], K = k_shapes[s][2];
            for (int ta = 0; ta < 2; ta++)
                for (int tb = 0; tb < 2; tb++)
                    for (int acc = 0; acc < 2; acc++) {
                        // Leading dimensions larger than the rows, to catch stride mix-ups.
                        int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
                        float *A = rnd((size_t)(ta ? K : M) * lda, -1, 1);
                        float *B = rnd((size_t)(tb ? N : K) * ldb, -1, 1);
                        float *C = rnd((size_t)M * ldc, -1, 1);
                        float *R = copyf(C, (size_t)M * ldc);
                        gemm_cpu(ta, tb, M, N, K, A, lda, B, ldb, C, ldc, acc);
                        gemm_naive(ta, tb, M, N, K, A, lda, B, ldb, R, ldc, acc);
                        ck_assert_msg(memcmp(C, R, (size_t)M * ldc * sizeof(float)) == 0,
                                      "gemm %lldx%lldx%lld ta=%d tb=%d acc=%d baseline=%d differs from the naive loop",
                                      (long long)M, (long long)N, (long long)K, ta, tb, acc, baseline);
                        free(A);
                        free(B);
                        free(C);
                        free(R);
                    }
        }
    }
    gemm_cpu_force_baseline(0);
}
END_TEST

// The three linear-layer wrappers against a double evaluation of their formulas.
START_TEST(test_matmul_wrappers_formulas) {
    int64_t T = 37;
    int K = 45, N = 29;
    float *x = rnd((size_t)T * K, -1, 1), *W = rnd((size_t)N * K, -1, 1), *g = rnd((size_t)T * N, -1, 1);
    float *y = rnd((size_t)T * N, -1, 1), *y0 = copyf(y, (size_t)T * N);
    float *gx = rnd((size_t)T * K, -1, 1), *gx0 = copyf(gx, (size_t)T * K);
    float *gW = rnd((size_t)N * K, -1, 1), *gW0 = copyf(gW, (size_t)N * K);
    matmul_forward_cpu(y, x, W, T, K, N, 1);
    matmul_backward_input_cpu(gx, g, W, T, K, N);
    matmul_backward_weight_cpu(gW, g, x, T, K, N);
    float *ry = xmalloc((size_t)T * N * sizeof(float)), *rgx = xmalloc((size_t)T * K * sizeof(float));
    float *rgW = xmalloc((size_t)N * K * sizeof(float));
    for (int64_t t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            double s = y0[t * N + n];
            for (int k = 0; k < K; k++) s += (double)x[t * K + k] * W[n * K + k];
            ry[t * N + n] = (float)s;
        }
    for (int64_t t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            double s = gx0[t * K + k];
            for (int n = 0; n < N; n++) s += (double)g[t * N + n] * W[n * K + k];
            rgx[t * K + k] = (float)s;
        }
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            double s = gW0[n * K + k];
            for (int64_t t = 0; t < T; t++) s += (double)g[t * N + n] * x[t * K + k];
            rgW[n * K + k] = (float)s;
        }
    expect_close("matmul forward (accumulate)", y, ry, (size_t)T * N, 1e-5, 1e-5);
    expect_close("matmul backward input", gx, rgx, (size_t)T * K, 1e-5, 1e-5);
    expect_close("matmul backward weight", gW, rgW, (size_t)N * K, 1e-5, 1e-5);
    // accumulate = 0 ignores what was in out.
    float *y2 = rnd((size_t)T * N, -1, 1), *y3 = xcalloc((size_t)T * N, sizeof(float));
    matmul_forward_cpu(y2, x, W, T, K, N, 0);
    matmul_forward_cpu(y3, x, W, T, K, N, 1);
    ck_assert(memcmp(y2, y3, (size_t)T * N * sizeof(float)) == 0);
    free(x), free(W), free(g), free(y), free(y0), free(gx), free(gx0), free(gW), free(gW0);
    free(ry), free(rgx), free(rgW), free(y2), free(y3);
}
END_TEST

typedef struct {
    float *x, *W, *gout, *out;
    int64_t T;
    int K, N;
} mm_ctx;
static double mm_objective(void *p) {
    mm_ctx *c = p;
    matmul_forward_cpu(c->out, c->x, c->W, c->T, c->K, c->N, 0);
    return dot_d(c->gout, c->out, (size_t)c->T * c->N);
}

START_TEST(test_matmul_fd) {
    mm_ctx c = {.T = 9, .K = 21, .N = 14};
    size_t nx = (size_t)c.T * c.K, nw = (size_t)c.N * c.K, no = (size_t)c.T * c.N;
    c.x = rnd(nx, -1, 1), c.W = rnd(nw, -1, 1), c.gout = rnd(no, -1, 1), c.out = rnd(no, -1, 1);
    float *gx = rnd(nx, -1, 1), *gx0 = copyf(gx, nx), *gW = rnd(nw, -1, 1), *gW0 = copyf(gW, nw);
    matmul_backward_input_cpu(gx, c.gout, c.W, c.T, c.K, c.N);
    matmul_backward_weight_cpu(gW, c.gout, c.x, c.T, c.K, c.N);
    float *dx = added(gx, gx0, nx), *dW = added(gW, gW0, nw);
    check_fd("matmul d/dinp", c.x, dx, nx, mm_objective, &c, 5e-5, 5e-4);
    check_fd("matmul d/dW", c.W, dW, nw, mm_objective, &c, 5e-5, 5e-4);
    free(c.x), free(c.W), free(c.gout), free(c.out), free(gx), free(gx0), free(gW), free(gW0), free(dx), free(dW);
}
END_TEST

// ---- RMSNorm ----
typedef struct {
    float *x, *w, *gout, *out;
    int64_t T;
    int C;
    float eps;
} rms_ctx;
static double rms_objective(void *p) {
    rms_ctx *c = p;
    rmsnorm_forward_cpu(c->out, NULL, c->x, c->w, c->T, c->C, c->eps);
    return dot_d(c->gout, c->out, (size_t)c->T * c->C);
}

START_TEST(test_rmsnorm) {
    rms_ctx c = {.T = 6, .C = 33, .eps = 1e-5f};
    size_t n = (size_t)c.T * c.C;
    c.x = rnd(n, -2, 2), c.w = rnd((size_t)c.C, 0.5f, 1.5f), c.gout = rnd(n, -1, 1), c.out = rnd(n, -1, 1);
    c.x[0] *= 1e-3f;  // one row with a tiny first element: nothing special should happen
    float *rstd = rnd((size_t)c.T, 0, 1);
    rmsnorm_forward_cpu(c.out, rstd, c.x, c.w, c.T, c.C, c.eps);
    // Forward against the formula in double.
    float *ref = xmalloc(n * sizeof(float));
    for (int64_t t = 0; t < c.T; t++) {
        double ss = 0;
        for (int i = 0; i < c.C; i++) ss += (double)c.x[t * c.C + i] * c.x[t * c.C + i];
        double r = 1.0 / sqrt(ss / c.C + (double)c.eps);
        ck_assert_msg(fabs(rstd[t] - r) <= 1e-6 * r, "rstd[%lld] = %.9g, expected %.9g", (long long)t, rstd[t], r);
        for (int i = 0; i < c.C; i++) ref[t * c.C + i] = (float)(c.w[i] * (c.x[t * c.C + i] * r));
    }
    expect_close("rmsnorm forward", c.out, ref, n, 1e-6, 1e-6);
    // In place gives the same bits.
    float *inplace = copyf(c.x, n);
    rmsnorm_forward_cpu(inplace, NULL, inplace, c.w, c.T, c.C, c.eps);
    ck_assert(memcmp(inplace, c.out, n * sizeof(float)) == 0);
    // Backward: with the saved rstd and recomputing it give the same bits; FD.
    float *g = rnd(n, -1, 1), *g0 = copyf(g, n), *g2 = copyf(g, n);
    rmsnorm_backward_cpu(g, c.gout, c.x, c.w, rstd, c.T, c.C, c.eps);
    rmsnorm_backward_cpu(g2, c.gout, c.x, c.w, NULL, c.T, c.C, c.eps);
    ck_assert(memcmp(g, g2, n * sizeof(float)) == 0);
    float *dx = added(g, g0, n);
    check_fd("rmsnorm d/dx", c.x, dx, n, rms_objective, &c, 5e-5, 5e-4);
    free(c.x), free(c.w), free(c.gout), free(c.out), free(rstd), free(ref), free(inplace), free(g), free(g0), free(g2);
    free(dx);
}
END_TEST

// ---- RoPE ----
typedef struct {
    float *x, *gout, *y;
    int32_t *pos;
    float *inv_freq;
    int64_t T;
    int H, D;
} rope_ctx;
static double rope_objective(void *p) {
    rope_ctx *c = p;
    size_t n = (size_t)c->T * c->H * c->D;
    memcpy(c->y, c->x, n * sizeof(float));
    rope_forward_cpu(c->y, c->pos, c->inv_freq, c->T, c->H, c->D);
    return dot_d(c->gout, c->y, n);
}

START_TEST(test_rope) {
    rope_ctx c = {.T = 10, .H = 3, .D = 12};
    size_t n = (size_t)c.T * c.H * c.D;
    c.x = rnd(n, -1, 1), c.gout = rnd(n, -1, 1), c.y = xmalloc(n * sizeof(float));
    c.pos = xmalloc((size_t)c.T * sizeof(int32_t));
    for (int64_t t = 0; t < c.T; t++) c.pos[t] = (int32_t)(t % 5 * 7);  // two sequences, positions up to 28
    c.inv_freq = xmalloc((size_t)c.D / 2 * sizeof(float));
    for (int i = 0; i < c.D / 2; i++) c.inv_freq[i] = (float)pow(10000.0, -2.0 * i / c.D);
    rope_objective(&c);
    // Forward: (x1 + i x2) * exp(i a) for each pair (i, i + D/2), in double.
    float *ref = xmalloc(n * sizeof(float));
    for (int64_t t = 0; t < c.T; t++)
        for (int h = 0; h < c.H; h++)
            for (int i = 0; i < c.D / 2; i++) {
                const float *v = c.x + (t * c.H + h) * c.D;
                double complex_re = v[i], complex_im = v[i + c.D / 2], a = c.pos[t] * (double)c.inv_freq[i];
                ref[(t * c.H + h) * c.D + i] = (float)(complex_re * cos(a) - complex_im * sin(a));
                ref[(t * c.H + h) * c.D + i + c.D / 2] = (float)(complex_re * sin(a) + complex_im * cos(a));
            }
    expect_close("rope forward", c.y, ref, n, 2e-6, 1e-6);
    // Backward (in place) against FD, and backward(forward(x)) = x (orthogonal).
    float *g = copyf(c.gout, n);
    rope_backward_cpu(g, c.pos, c.inv_freq, c.T, c.H, c.D);
    check_fd("rope d/dx", c.x, g, n, rope_objective, &c, 5e-5, 5e-4);
    rope_objective(&c);  // c.y = rope(x) again (the FD left a perturbed one)
    rope_backward_cpu(c.y, c.pos, c.inv_freq, c.T, c.H, c.D);
    expect_close("rope backward(forward(x))", c.y, c.x, n, 1e-6, 1e-6);
    free(c.x), free(c.gout), free(c.y), free(c.pos), free(c.inv_freq), free(ref), free(g);
}
END_TEST

// ---- attention ----
typedef struct {
    float *q, *k, *v, *gout, *out;
    int32_t *mask;
    int B, S, Hq, Hkv, D;
} attn_ctx;
static double attn_objective(void *p) {
    attn_ctx *c = p;
    attention_forward_cpu(c->out, c->q, c->k, c->v, c->mask, c->B, c->S, c->Hq, c->Hkv, c->D);
    return dot_d(c->gout, c->out, (size_t)c->B * c->S * c->Hq * c->D);
}

// Direct evaluation in double: p_ij over keys j <= i with mask[j] != 0; rows with none are 0.
static void attention_naive(float *out, const attn_ctx *c) {
    int S = c->S, Hq = c->Hq, Hkv = c->Hkv, D = c->D;
    double *s = xmalloc((size_t)S * sizeof(double));
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < Hq; h++)
            for (int i = 0; i < S; i++) {
                int kvh = h / (Hq / Hkv);
                const float *qi = c->q + ((int64_t)(b * S + i) * Hq + h) * D;
                double mx = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    s[j] = -INFINITY;
                    if (c->mask && !c->mask[b * S + j]) continue;
                    const float *kj = c->k + ((int64_t)(b * S + j) * Hkv + kvh) * D;
                    double d = 0;
                    for (int e = 0; e < D; e++) d += (double)qi[e] * kj[e];
                    s[j] = d / sqrt((double)D);
                    if (s[j] > mx) mx = s[j];
                }
                double z = 0;
                for (int j = 0; j <= i; j++) z += s[j] == -INFINITY ? 0.0 : exp(s[j] - mx);
                for (int e = 0; e < D; e++) {
                    double o = 0;
                    for (int j = 0; j <= i; j++)
                        if (s[j] != -INFINITY)
                            o += exp(s[j] - mx) / z * c->v[((int64_t)(b * S + j) * Hkv + kvh) * D + e];
                    out[((int64_t)(b * S + i) * Hq + h) * D + e] = (float)o;  // 0 when no key: z == 0 and o == 0
                }
            }
    free(s);
}

START_TEST(test_attention) {
    // Three sequences: full, right-padded (length 4), left-padded (first two tokens are padding: its
    // rows 0 and 1 have no key and must come out 0).
    attn_ctx c = {.B = 3, .S = 7, .Hq = 4, .Hkv = 2, .D = 8};
    size_t nq = (size_t)c.B * c.S * c.Hq * c.D, nk = (size_t)c.B * c.S * c.Hkv * c.D;
    c.q = rnd(nq, -1.5f, 1.5f), c.k = rnd(nk, -1.5f, 1.5f), c.v = rnd(nk, -1, 1), c.gout = rnd(nq, -1, 1);
    c.out = rnd(nq, -1, 1);
    c.mask = xmalloc((size_t)c.B * c.S * sizeof(int32_t));
    for (int s = 0; s < c.S; s++) {
        c.mask[0 * c.S + s] = 1;
        c.mask[1 * c.S + s] = s < 4;
        c.mask[2 * c.S + s] = s >= 2;
    }
    attn_objective(&c);
    float *ref = xmalloc(nq * sizeof(float));
    attention_naive(ref, &c);
    expect_close("attention forward", c.out, ref, nq, 1e-6, 1e-5);
    for (int h = 0; h < c.Hq; h++)
        for (int e = 0; e < c.D; e++) ck_assert(c.out[((int64_t)(2 * c.S + 1) * c.Hq + h) * c.D + e] == 0.0f);
    // No mask = all real.
    float *o1 = xmalloc(nq * sizeof(float)), *o2 = xmalloc(nq * sizeof(float));
    int32_t *ones = xmalloc((size_t)c.B * c.S * sizeof(int32_t));
    for (int i = 0; i < c.B * c.S; i++) ones[i] = 1;
    attention_forward_cpu(o1, c.q, c.k, c.v, NULL, c.B, c.S, c.Hq, c.Hkv, c.D);
    attention_forward_cpu(o2, c.q, c.k, c.v, ones, c.B, c.S, c.Hq, c.Hkv, c.D);
    ck_assert(memcmp(o1, o2, nq * sizeof(float)) == 0);
    // Backward (+=) against FD.
    float *gq = rnd(nq, -1, 1), *gk = rnd(nk, -1, 1), *gv = rnd(nk, -1, 1);
    float *gq0 = copyf(gq, nq), *gk0 = copyf(gk, nk), *gv0 = copyf(gv, nk);
    attention_backward_cpu(gq, gk, gv, c.gout, c.q, c.k, c.v, c.mask, c.B, c.S, c.Hq, c.Hkv, c.D);
    // Padded keys are never attended: their gradients are exactly untouched.
    for (int s = 4; s < c.S; s++)
        for (int e = 0; e < c.Hkv * c.D; e++) {
            int64_t i = (int64_t)(1 * c.S + s) * c.Hkv * c.D + e;
            ck_assert(gk[i] == gk0[i] && gv[i] == gv0[i]);
        }
    float *dq = added(gq, gq0, nq), *dk = added(gk, gk0, nk), *dv = added(gv, gv0, nk);
    check_fd("attention d/dq", c.q, dq, nq, attn_objective, &c, 5e-5, 5e-4);
    check_fd("attention d/dk", c.k, dk, nk, attn_objective, &c, 5e-5, 5e-4);
    check_fd("attention d/dv", c.v, dv, nk, attn_objective, &c, 5e-5, 5e-4);
    // Sharp attention (scores ~100 apart, so that many weights fall below exp(-46) and are flushed to
    // exactly 0) still matches the double evaluation (to the fp32 rounding of scores of size ~100),
    // and its gradients the finite differences.
    for (size_t i = 0; i < nq; i++) c.q[i] *= 40.0f;
    attn_objective(&c);
    attention_naive(ref, &c);
    expect_close("attention forward, sharp", c.out, ref, nq, 1e-5, 1e-4);
    memcpy(gq, gq0, nq * sizeof(float));
    memcpy(gk, gk0, nk * sizeof(float));
    attention_backward_cpu(gq, gk, gv, c.gout, c.q, c.k, c.v, c.mask, c.B, c.S, c.Hq, c.Hkv, c.D);
    free(dq), free(dk);
    dq = added(gq, gq0, nq), dk = added(gk, gk0, nk);
    check_fd("attention sharp d/dq", c.q, dq, nq, attn_objective, &c, 5e-4, 5e-4);
    check_fd("attention sharp d/dk", c.k, dk, nk, attn_objective, &c, 5e-4, 5e-4);
    free(c.q), free(c.k), free(c.v), free(c.gout), free(c.out), free(c.mask), free(ref), free(o1), free(o2);
    free(ones), free(gq), free(gk), free(gv), free(gq0), free(gk0), free(gv0), free(dq), free(dk), free(dv);
}
END_TEST

// ---- SwiGLU ----
typedef struct {
    float *gate, *up, *gout, *out;
    int64_t n;
} swiglu_ctx;
static double swiglu_objective(void *p) {
    swiglu_ctx *c = p;
    swiglu_forward_cpu(c->out, c->gate, c->up, c->n);
    return dot_d(c->gout, c->out, (size_t)c->n);
}

START_TEST(test_swiglu) {
    swiglu_ctx c = {.n = 150};
    c.gate = rnd(150, -6, 6), c.up = rnd(150, -2, 2), c.gout = rnd(150, -1, 1), c.out = rnd(150, -1, 1);
    swiglu_objective(&c);
    float ref[150];
    for (int i = 0; i < 150; i++) ref[i] = (float)(c.gate[i] / (1.0 + exp(-(double)c.gate[i])) * c.up[i]);
    expect_close("swiglu forward", c.out, ref, 150, 1e-6, 1e-6);
    float *gg = rnd(150, -1, 1), *gu = rnd(150, -1, 1), *gg0 = copyf(gg, 150), *gu0 = copyf(gu, 150);
    swiglu_backward_cpu(gg, gu, c.gout, c.gate, c.up, c.n);
    float *dg = added(gg, gg0, 150), *du = added(gu, gu0, 150);
    check_fd("swiglu d/dgate", c.gate, dg, 150, swiglu_objective, &c, 5e-5, 5e-4);
    check_fd("swiglu d/dup", c.up, du, 150, swiglu_objective, &c, 5e-5, 5e-4);
    // out may alias gate.
    swiglu_objective(&c);  // c.out for the unperturbed inputs again
    float *al = copyf(c.gate, 150);
    swiglu_forward_cpu(al, al, c.up, 150);
    ck_assert(memcmp(al, c.out, sizeof ref) == 0);
    free(c.gate), free(c.up), free(c.gout), free(c.out), free(gg), free(gu), free(gg0), free(gu0), free(dg), free(du);
    free(al);
}
END_TEST

// ---- embedding ----
START_TEST(test_embedding) {
    int V = 11, C = 5;
    float *table = rnd((size_t)V * C, -1, 1), out[4 * 5];
    int32_t ids[4] = {3, 0, 10, 3};
    embedding_forward_cpu(out, ids, table, 4, C, V);
    for (int t = 0; t < 4; t++)
        for (int i = 0; i < C; i++) ck_assert(out[t * C + i] == table[ids[t] * C + i]);
    free(table);
}
END_TEST

// ---- lm_head + cross-entropy ----
typedef struct {
    float *h, *W;
    int32_t *y;
    int64_t T;
    int C, V;
    float scale;
} ce_ctx;
static double ce_objective(void *p) {
    ce_ctx *c = p;
    return c->scale * lmhead_ce_forward_backward_cpu(c->h, c->W, c->y, c->T, c->C, c->V, c->scale, NULL, NULL, NULL);
}

START_TEST(test_lmhead_ce) {
    ce_ctx c = {.T = 11, .C = 24, .V = 37};
    c.h = rnd((size_t)c.T * c.C, -1, 1), c.W = rnd((size_t)c.V * c.C, -1.5f, 1.5f);
    c.y = xmalloc((size_t)c.T * sizeof(int32_t));
    int64_t n_sup = 0;
    for (int64_t t = 0; t < c.T; t++) {
        c.y[t] = (t % 4 == 1) ? OPS_IGNORE_INDEX : (int32_t)((t * 13 + 5) % c.V);
        n_sup += c.y[t] != OPS_IGNORE_INDEX;
    }
    c.scale = 1.0f / (float)n_sup;
    size_t nh = (size_t)c.T * c.C;
    float *gh = rnd(nh, -1, 1), *gh0 = copyf(gh, nh), *logits = rnd((size_t)c.T * c.V, -1, 1);
    int64_t counted = -1;
    double loss = lmhead_ce_forward_backward_cpu(c.h, c.W, c.y, c.T, c.C, c.V, c.scale, gh, logits, &counted);
    ck_assert_int_eq(counted, n_sup);
    // Forward in double: logits, then logsumexp - logit[y] over the supervised rows.
    double ref_loss = 0;
    float *ref_logits = xmalloc((size_t)c.T * c.V * sizeof(float));
    for (int64_t t = 0; t < c.T; t++) {
        double l[37], mx = -INFINITY, z = 0;
        for (int j = 0; j < c.V; j++) {
            l[j] = 0;
            for (int i = 0; i < c.C; i++) l[j] += (double)c.h[t * c.C + i] * c.W[j * c.C + i];
            ref_logits[t * c.V + j] = (float)l[j];
            if (l[j] > mx) mx = l[j];
        }
        for (int j = 0; j < c.V; j++) z += exp(l[j] - mx);
        if (c.y[t] != OPS_IGNORE_INDEX) ref_loss += mx + log(z) - l[c.y[t]];
    }
    expect_close("lm_head logits", logits, ref_logits, (size_t)c.T * c.V, 1e-5, 1e-5);
    ck_assert_msg(fabs(loss - ref_loss) <= 1e-5 * fabs(ref_loss), "loss %.9g, expected %.9g", loss, ref_loss);
    // Evaluation (no gh, no logits) gives the same loss; chunks of 3 rows give the same bits.
    ck_assert(lmhead_ce_forward_backward_cpu(c.h, c.W, c.y, c.T, c.C, c.V, c.scale, NULL, NULL, NULL) == loss);
    float *ghc = copyf(gh0, nh);
    lmhead_ce_set_chunk_rows_cpu(3);
    double loss_c = lmhead_ce_forward_backward_cpu(c.h, c.W, c.y, c.T, c.C, c.V, c.scale, ghc, NULL, NULL);
    lmhead_ce_set_chunk_rows_cpu(0);
    ck_assert(loss_c == loss);
    ck_assert(memcmp(ghc, gh, nh * sizeof(float)) == 0);
    // Ignored rows get no gradient at all.
    for (int64_t t = 1; t < c.T; t += 4)
        for (int i = 0; i < c.C; i++) ck_assert(gh[t * c.C + i] == gh0[t * c.C + i]);
    float *dh = added(gh, gh0, nh);
    check_fd("lm_head+ce d/dh", c.h, dh, nh, ce_objective, &c, 1e-5, 2e-3);
    // Nothing supervised: loss 0, count 0, gh untouched.
    for (int64_t t = 0; t < c.T; t++) c.y[t] = OPS_IGNORE_INDEX;
    float *gh2 = copyf(gh0, nh);
    ck_assert(lmhead_ce_forward_backward_cpu(c.h, c.W, c.y, c.T, c.C, c.V, 1.0f, gh2, NULL, &counted) == 0.0);
    ck_assert_int_eq(counted, 0);
    ck_assert(memcmp(gh2, gh0, nh * sizeof(float)) == 0);
    free(c.h), free(c.W), free(c.y), free(gh), free(gh0), free(logits), free(ref_logits), free(ghc), free(dh);
    free(gh2);
}
END_TEST

// ---- AdamW ----
// Two steps for one parameter, written out by hand (lr 0.1, betas (0.9, 0.999), eps 1e-8, wd 0.01):
// step 1, g = 0.5, p = 1:
//   p <- 1 * (1 - 0.1*0.01) = 0.999; m = 0.1*0.5 = 0.05; v = 0.001*0.25 = 0.00025
//   m^ = 0.05/0.1 = 0.5; v^ = 0.00025/0.001 = 0.25; p <- 0.999 - 0.1 * 0.5/(sqrt(0.25) + 1e-8)
//      = 0.999 - 0.0999999980000000 = 0.899000002
// step 2, g = -0.25:
//   p <- 0.899000002 * 0.999 = 0.898101001998; m = 0.9*0.05 + 0.1*(-0.25) = 0.02
//   v = 0.999*0.00025 + 0.001*0.0625 = 0.00031225
//   m^ = 0.02/(1 - 0.81) = 0.105263157894737; v^ = 0.00031225/(1 - 0.998001) = 0.156203101550775
//   p <- 0.898101001998 - 0.1 * 0.105263157894737/(0.395225380702 + 1e-8)
//      = 0.898101001998 - 0.026633703292 = 0.871467298706
START_TEST(test_adamw_hand_steps) {
    float p = 1.0f, m = 0.0f, v = 0.0f, g1 = 0.5f, g2 = -0.25f;
    adamw_update_cpu(&p, &g1, &m, &v, 1, 0.1, 0.9, 0.999, 1e-8, 0.01, 1);
    ck_assert_msg(fabs(p - 0.899000002) < 1e-7, "step 1: p = %.9g", p);
    ck_assert_msg(fabs(m - 0.05) < 1e-9 && fabs(v - 0.00025) < 1e-10, "step 1: m = %.9g, v = %.9g", m, v);
    adamw_update_cpu(&p, &g2, &m, &v, 1, 0.1, 0.9, 0.999, 1e-8, 0.01, 2);
    double mhat = 0.02 / 0.19, vhat = 0.00031225 / 0.001999;
    double p2 = 0.898101001998 - 0.1 * mhat / (sqrt(vhat) + 1e-8);
    ck_assert_msg(fabs(p2 - 0.871467298706) < 1e-11, "the hand computation itself: %.12g", p2);
    ck_assert_msg(fabs(p - p2) < 2e-7, "step 2: p = %.9g, expected %.9g", p, p2);
    ck_assert_msg(fabs(m - 0.02) < 1e-8 && fabs(v - 0.00031225) < 1e-10, "step 2: m = %.9g, v = %.9g", m, v);
}
END_TEST

// Many parameters over 3 steps against the textbook form (m^ / (sqrt(v^) + eps)) in double.
START_TEST(test_adamw_formula) {
    int n = 100;
    float *p = rnd(n, -1, 1), *m = xcalloc(n, sizeof(float)), *v = xcalloc(n, sizeof(float));
    double *pd = xmalloc(n * sizeof(double)), *md = xcalloc(n, sizeof(double)), *vd = xcalloc(n, sizeof(double));
    for (int i = 0; i < n; i++) pd[i] = p[i];
    double lr = 3e-3, b1 = 0.9, b2 = 0.95, eps = 1e-6, wd = 0.1;
    for (int step = 1; step <= 3; step++) {
        float *g = rnd(n, -2, 2);
        adamw_update_cpu(p, g, m, v, n, lr, b1, b2, eps, wd, step);
        for (int i = 0; i < n; i++) {
            pd[i] *= 1 - lr * wd;
            md[i] = b1 * md[i] + (1 - b1) * g[i];
            vd[i] = b2 * vd[i] + (1 - b2) * (double)g[i] * g[i];
            double mh = md[i] / (1 - pow(b1, step)), vh = vd[i] / (1 - pow(b2, step));
            pd[i] -= lr * mh / (sqrt(vh) + eps);
        }
        free(g);
    }
    for (int i = 0; i < n; i++) {
        ck_assert_msg(fabs(p[i] - pd[i]) <= 1e-6 * (1 + fabs(pd[i])), "p[%d] = %.9g, expected %.9g", i, p[i], pd[i]);
        // m is a lerp of values up to 2 (its rounding is relative to them); v is a sum of squares.
        ck_assert_msg(fabs(m[i] - md[i]) <= 1e-6, "m[%d] = %.9g, expected %.9g", i, m[i], md[i]);
        ck_assert_msg(fabs(v[i] - vd[i]) <= 1e-6 * fabs(vd[i]), "v[%d] = %.9g, expected %.9g", i, v[i], vd[i]);
    }
    free(p), free(m), free(v), free(pd), free(md), free(vd);
}
END_TEST

START_TEST(test_global_norm) {
    int64_t n = 200003;
    float *x = rnd((size_t)n, -1, 1);
    double ref = 0;
    for (int64_t i = 0; i < n; i++) ref += (double)x[i] * x[i];
    double got = global_norm_sq_cpu(x, n);
    ck_assert_msg(fabs(got - ref) <= 1e-12 * ref, "%.17g vs %.17g", got, ref);
    ck_assert(global_norm_sq_cpu(x, 0) == 0.0);
    free(x);
}
END_TEST

// ---- determinism: 1 and 2 threads, bit for bit, at sizes past every parallel threshold ----
static uint32_t hash_bytes(const void *x, size_t nbytes) {
    uint32_t h = 2166136261u;
    const unsigned char *b = x;
    for (size_t i = 0; i < nbytes; i++) h = (h ^ b[i]) * 16777619u;
    return h;
}
static uint32_t hash_floats(const float *x, size_t n) { return hash_bytes(x, n * sizeof(float)); }

static int64_t n_rows_supervised(const int32_t *y, int64_t T) {
    int64_t n = 0;
    for (int64_t t = 0; t < T; t++) n += y[t] != OPS_IGNORE_INDEX;
    return n;
}

// Runs every op once and returns a hash of all outputs.
static uint32_t run_all_ops(int threads) {
    ops_cpu_set_threads(threads);
    g_stream = 777;  // same inputs for both runs
    uint32_t h = 0;
    {  // matmul, all three
        int64_t T = 300;
        int K = 200, N = 260;
        float *x = rnd((size_t)T * K, -1, 1), *W = rnd((size_t)N * K, -1, 1), *y = rnd((size_t)T * N, -1, 1);
        float *gx = rnd((size_t)T * K, -1, 1), *gW = rnd((size_t)N * K, -1, 1);
        matmul_forward_cpu(y, x, W, T, K, N, 1);
        matmul_backward_input_cpu(gx, y, W, T, K, N);
        matmul_backward_weight_cpu(gW, y, x, T, K, N);
        h ^= hash_floats(y, (size_t)T * N) ^ hash_floats(gx, (size_t)T * K) * 3 ^ hash_floats(gW, (size_t)N * K) * 5;
        free(x), free(W), free(y), free(gx), free(gW);
    }
    {  // rmsnorm, swiglu, rope
        int64_t T = 512;
        int C = 128;
        size_t n = (size_t)T * C;
        float *x = rnd(n, -1, 1), *w = rnd((size_t)C, 0, 2), *y = rnd(n, -1, 1), *gx = rnd(n, -1, 1);
        float *r = rnd((size_t)T, 0, 1), *u = rnd(n, -1, 1), *s = rnd(n, -1, 1);
        float *gg = rnd(n, -1, 1), *gu = rnd(n, -1, 1);
        rmsnorm_forward_cpu(y, r, x, w, T, C, 1e-6f);
        rmsnorm_backward_cpu(gx, u, x, w, r, T, C, 1e-6f);
        swiglu_forward_cpu(s, x, u, (int64_t)n);
        swiglu_backward_cpu(gg, gu, y, x, u, (int64_t)n);
        int32_t *pos = xmalloc((size_t)T * sizeof(int32_t));
        float inv[16];
        for (int64_t t = 0; t < T; t++) pos[t] = (int32_t)(t % 128);
        for (int i = 0; i < 16; i++) inv[i] = powf(10000.0f, -(float)i / 16.0f);
        rope_forward_cpu(y, pos, inv, T, 4, 32);
        rope_backward_cpu(gx, pos, inv, T, 4, 32);
        h ^= hash_floats(y, n) * 7 ^ hash_floats(gx, n) * 11 ^ hash_floats(r, (size_t)T) * 13 ^ hash_floats(s, n) * 17 ^
             hash_floats(gg, n) * 19 ^ hash_floats(gu, n) * 23;
        free(x), free(w), free(y), free(gx), free(r), free(u), free(s), free(gg), free(gu), free(pos);
    }
    {  // attention
        int B = 2, S = 64, Hq = 4, Hkv = 2, D = 16;
        size_t nq = (size_t)B * S * Hq * D, nk = (size_t)B * S * Hkv * D;
        float *q = rnd(nq, -1, 1), *k = rnd(nk, -1, 1), *v = rnd(nk, -1, 1), *o = rnd(nq, -1, 1), *go = rnd(nq, -1, 1);
        float *gq = rnd(nq, -1, 1), *gk = rnd(nk, -1, 1), *gv = rnd(nk, -1, 1);
        int32_t *mask = xmalloc((size_t)B * S * sizeof(int32_t));
        for (int i = 0; i < B * S; i++) mask[i] = i % S < 50 || i < S;
        attention_forward_cpu(o, q, k, v, mask, B, S, Hq, Hkv, D);
        attention_backward_cpu(gq, gk, gv, go, q, k, v, mask, B, S, Hq, Hkv, D);
        h ^= hash_floats(o, nq) * 29 ^ hash_floats(gq, nq) * 31 ^ hash_floats(gk, nk) * 37 ^ hash_floats(gv, nk) * 41;
        free(q), free(k), free(v), free(o), free(go), free(gq), free(gk), free(gv), free(mask);
    }
    {  // lm_head + CE (102 supervised rows x V = 1200: past the threshold of its row loop), AdamW, norm
        int64_t T = 128;
        int C = 64, V = 1200;
        float *x = rnd((size_t)T * C, -1, 1), *W = rnd((size_t)V * C, -1, 1), *gx = rnd((size_t)T * C, -1, 1);
        int32_t *y = xmalloc((size_t)T * sizeof(int32_t));
        for (int64_t t = 0; t < T; t++) y[t] = t % 5 == 0 ? OPS_IGNORE_INDEX : (int32_t)(t * 37 % V);
        double loss = lmhead_ce_forward_backward_cpu(x, W, y, T, C, V, 0.01f, gx, NULL, NULL);
        int64_t n = 100000;
        float *p = rnd((size_t)n, -1, 1), *g = rnd((size_t)n, -1, 1);
        float *m = rnd((size_t)n, -1, 1), *v = rnd((size_t)n, 0, 1);
        adamw_update_cpu(p, g, m, v, n, 1e-3, 0.9, 0.999, 1e-8, 0.01, 5);
        double nrm = global_norm_sq_cpu(g, n);
        MOSFT_ASSERT(n_rows_supervised(y, T) * V >= 65536);
        h ^= hash_floats(gx, (size_t)T * C) * 43 ^ hash_bytes(&loss, sizeof loss) * 47 ^
             hash_floats(p, (size_t)n) * 59 ^ hash_floats(m, (size_t)n) * 61 ^ hash_floats(v, (size_t)n) * 67 ^
             hash_bytes(&nrm, sizeof nrm) * 71;
        free(x), free(W), free(gx), free(y), free(p), free(g), free(m), free(v);
    }
    ops_cpu_set_threads(0);
    return h;
}

START_TEST(test_threads_bitwise) {
    uint32_t h1 = run_all_ops(1), h2 = run_all_ops(2), h1b = run_all_ops(1);
    ck_assert_msg(h1 == h1b, "two single-thread runs differ");
    ck_assert_msg(h1 == h2, "1 and 2 threads differ: %08x vs %08x", h1, h2);
}
END_TEST

static Suite *ops_suite(void) {
    Suite *s = suite_create("ops_cpu");
    TCase *tc = tcase_create("ops");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_gemm_matches_naive_bits);
    tcase_add_test(tc, test_matmul_wrappers_formulas);
    tcase_add_test(tc, test_matmul_fd);
    tcase_add_test(tc, test_rmsnorm);
    tcase_add_test(tc, test_rope);
    tcase_add_test(tc, test_attention);
    tcase_add_test(tc, test_swiglu);
    tcase_add_test(tc, test_embedding);
    tcase_add_test(tc, test_lmhead_ce);
    tcase_add_test(tc, test_adamw_hand_steps);
    tcase_add_test(tc, test_adamw_formula);
    tcase_add_test(tc, test_global_norm);
    tcase_add_test(tc, test_threads_bitwise);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(ops_suite)
