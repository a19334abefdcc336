// bench_ops_cpu.c: speed of the CPU reference ops (not a test: `make build/tests/bench_ops_cpu`).
//   build/tests/bench_ops_cpu [threads]     prints GFLOP/s of matmul_forward_cpu and its two backward
// variants at a few LLaMA-like sizes, then the attention and the fused lm_head + cross-entropy.
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
    return 0;
}
