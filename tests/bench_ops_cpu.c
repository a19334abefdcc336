// bench_ops_cpu.c: speed of the CPU reference ops (not a test: `make build/tests/bench_ops_cpu`).
//   build/tests/bench_ops_cpu [threads]     prints GFLOP/s of matmul_forward_cpu and its two backward
// variants at a few LLaMA-like sizes, then the attention and the fused lm_head + cross-entropy.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/common.h"
#include "core/ops_cpu.h"
#include "core/rng.h"

static float *rand_buf(size_t n, uint64_t seed) {
    float *p = xmalloc_aligned(n * sizeof(float));
    uint64_t key = rng_key(99, seed, 0, 0, 0);
    for (size_t i = 0; i < n; i++) p[i] = rng_uniform(key, i) * 2.0f - 1.0f;
    return p;
}

// Best of a few repetitions (the machine is shared).
static double bench_matmul(int which, int64_t T, int K, int N) {
    float *a = rand_buf((size_t)T * K, 1), *w = rand_buf((size_t)N * K, 2), *o = rand_buf((size_t)T * N, 3);
    double best = 1e30, flops = 2.0 * (double)T * K * N;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = mosft_now();
        if (which == 0) matmul_forward_cpu(o, a, w, T, K, N, 0);
        else if (which == 1) matmul_backward_input_cpu(a, o, w, T, K, N);
        else matmul_backward_weight_cpu(w, o, a, T, K, N);
        double dt = mosft_now() - t0;
        if (dt < best) best = dt;
        if (best * (rep + 1) > 3.0) break;
    }
    free(a);
    free(w);
    free(o);
    return flops / best * 1e-9;
}

// Causal attention: 4 flops per (query, allowed key, d) for q.k and p.v; the backward about 2.5x that.
static void bench_attention(int B, int S, int Hq, int Hkv, int D) {
    size_t nq = (size_t)B * S * Hq * D, nk = (size_t)B * S * Hkv * D;
    float *q = rand_buf(nq, 4), *k = rand_buf(nk, 5), *v = rand_buf(nk, 6), *o = rand_buf(nq, 7);
    float *gq = rand_buf(nq, 8), *gk = rand_buf(nk, 9), *gv = rand_buf(nk, 10);
    double flops = 4.0 * B * Hq * ((double)S * (S + 1) / 2) * D;
    double t0 = mosft_now();
    attention_forward_cpu(o, q, k, v, NULL, B, S, Hq, Hkv, D);
    double t1 = mosft_now();
    attention_backward_cpu(gq, gk, gv, o, q, k, v, NULL, B, S, Hq, Hkv, D);
    double t2 = mosft_now();
    printf("attention B=%d S=%d Hq=%d Hkv=%d D=%d: forward %.3f s (%.2f GFLOP/s), backward %.3f s\n", B, S, Hq, Hkv, D,
           t1 - t0, flops / (t1 - t0) * 1e-9, t2 - t1);
    free(q), free(k), free(v), free(o), free(gq), free(gk), free(gv);
}

static void bench_ce(int64_t T, int C, int V) {
    float *h = rand_buf((size_t)T * C, 11), *W = rand_buf((size_t)V * C, 12), *gh = rand_buf((size_t)T * C, 13);
    int32_t *y = xmalloc((size_t)T * sizeof(int32_t));
    for (int64_t t = 0; t < T; t++) y[t] = (int32_t)(t * 7919 % V);
    double t0 = mosft_now();
    lmhead_ce_forward_backward_cpu(h, W, y, T, C, V, 1.0f / (float)T, gh, NULL, NULL);
    double dt = mosft_now() - t0, flops = 4.0 * (double)T * C * V;
    printf("lm_head+CE T=%lld C=%d V=%d (forward+backward): %.3f s (%.2f GFLOP/s in its two matmuls)\n", (long long)T,
           C, V, dt, flops / dt * 1e-9);
    free(h), free(W), free(gh), free(y);
}

int main(int argc, char **argv) {
    if (argc > 1) ops_cpu_set_threads(atoi(argv[1]));
    printf("threads %d%s\n", ops_cpu_threads(), getenv("MOSFT_GEMM_SSE") ? " (SSE kernel forced)" : "");
    static const int sizes[][3] = {{512, 512, 512}, {1024, 2048, 2048}, {2048, 4096, 4096}, {512, 4096, 11008},
                                   {2048, 4096, 16}, {2048, 16, 4096}, {256, 64, 512}};
    const char *names[3] = {"forward  out=inp W^T", "bwd_inp  ginp+=gout W", "bwd_wt   gW+=gout^T inp"};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        for (int which = 0; which < 3; which++) {
            int64_t T = sizes[s][0];
            int K = sizes[s][1], N = sizes[s][2];
            printf("matmul %-24s T=%-5lld K=%-5d N=%-5d  %7.2f GFLOP/s\n", names[which], (long long)T, K, N,
                   bench_matmul(which, T, K, N));
            fflush(stdout);
        }
    bench_attention(1, 512, 32, 8, 128);
    bench_ce(256, 2048, 32000);
    return 0;
}
