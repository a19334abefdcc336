// probe_util.h: what the standalone GPU probes (bench_flash, bench_gemm: timing programs, not check
// tests) share: a CUDA call check that exits, and the float comparison for qsort (medians).
#ifndef MOSFT_PROBE_UTIL_H
#define MOSFT_PROBE_UTIL_H

#include <cuda_runtime_api.h>
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

static inline int probe_cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

#endif
