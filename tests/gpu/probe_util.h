// probe_util.h: what the standalone GPU probes (bench_flash, bench_gemm: timing programs, not check
// tests) share: CUDA and cuBLASLt call checks that exit, the float comparison for qsort (medians), and a
// seeded host random stream for their operands.
#ifndef MOSFT_PROBE_UTIL_H
#define MOSFT_PROBE_UTIL_H

#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define CK(call)                                                                                     \
    do {                                                                                             \
        cudaError_t e_ = (call);                                                                     \
        if (e_ != cudaSuccess) {                                                                     \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));    \
            exit(1);                                                                                 \
        }                                                                                            \
    } while (0)

// A cuBLASLt call check that exits (the probes that include cublasLt.h).
#define CB(call)                                                                         \
    do {                                                                                 \
        cublasStatus_t s_ = (call);                                                      \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                               \
            fprintf(stderr, "%s:%d %s: status %d\n", __FILE__, __LINE__, #call, (int)s_); \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

static inline int probe_cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

// xorshift64 from probe_seed(seed): uniform doubles in [0, 1).
static inline uint64_t probe_seed(uint64_t seed) { return seed * 0x9E3779B97F4A7C15ull + 1; }
static inline double probe_uniform(uint64_t *s) {
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    return (double)(*s >> 11) / 9007199254740992.0;
}
// n bf16 (host, malloc'd) uniform in [-a, a); f32_to_bf16 comes from core/dtype.h.
static inline uint16_t *probe_uniform_bf16(size_t n, uint64_t seed, float a) {
    uint16_t *h = (uint16_t *)malloc(2 * n);
    uint64_t s = probe_seed(seed);
    for (size_t i = 0; i < n; i++) h[i] = f32_to_bf16((float)((2.0 * probe_uniform(&s) - 1.0) * a));
    return h;
}

#endif
