// gpu_util.h: helpers of the GPU tests: device buffers, random bf16-exact inputs, comparisons with
// written tolerances that print the first mismatches.
#ifndef MOSFT_GPU_UTIL_H
#define MOSFT_GPU_UTIL_H

#include <cuda_runtime_api.h>

#include "core/dtype.h"
#include "core/rng.h"
#include "cuda/ops_cuda.h"
#include "tests/test_util.h"

#define CK_CUDA(call)                                                                                      \
    do {                                                                                                   \
        cudaError_t e_ = (call);                                                                           \
        ck_assert_msg(e_ == cudaSuccess, "%s: %s", #call, cudaGetErrorString(e_));                          \
    } while (0)

static inline void *dev_alloc(size_t bytes) {
    void *p = NULL;
    CK_CUDA(cudaMalloc(&p, bytes ? bytes : 1));
    CK_CUDA(cudaMemset(p, 0xff, bytes ? bytes : 1));  // poison: every output element must be written
    CK_CUDA(cudaDeviceSynchronize());  // the kernels run on a non-blocking stream: no implicit order
    return p;
}
static inline void *dev_up(const void *h, size_t bytes) {
    void *p = dev_alloc(bytes);
    CK_CUDA(cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice));
    // a copy from pageable memory returns once the data is staged, not landed: without this, a kernel on
    // the non-blocking stream can run while the tail of the DMA is still to overwrite what it wrote
    CK_CUDA(cudaDeviceSynchronize());
    return p;
}
static inline void dev_down(void *h, const void *d, size_t bytes) {
    CK_CUDA(cudaDeviceSynchronize());
    CK_CUDA(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
}

// Fresh random inputs: a host generator seeded per call site, values rounded to bf16 so that the CPU
// twin sees exactly what the GPU sees.
static inline float rnd_normal(rng_state *r) {
    double u1 = (rng_next_double(r) + 1e-12), u2 = rng_next_double(r);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
static inline float *rnd_bf16(rng_state *r, size_t n, float std) {
    float *x = (float *)xmalloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) x[i] = bf16_round(std * rnd_normal(r));
    return x;
}
static inline uint16_t *to_bf16(const float *x, size_t n) {
    uint16_t *h = (uint16_t *)xmalloc(2 * (n ? n : 1));
    for (size_t i = 0; i < n; i++) h[i] = f32_to_bf16(x[i]);
    return h;
}
static inline float *from_bf16(const uint16_t *h, size_t n) {
    float *x = (float *)xmalloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) x[i] = bf16_to_f32(h[i]);
    return x;
}
static inline void *dev_bf16(const float *x, size_t n) {
    uint16_t *h = to_bf16(x, n);
    void *d = dev_up(h, 2 * n);
    free(h);
    return d;
}
static inline float *down_bf16(const void *d, size_t n) {
    uint16_t *h = (uint16_t *)xmalloc(2 * (n ? n : 1));
    dev_down(h, d, 2 * n);
    float *x = from_bf16(h, n);
    free(h);
    return x;
}
static inline float *down_f32(const void *d, size_t n) {
    float *x = (float *)xmalloc(sizeof(float) * (n ? n : 1));
    dev_down(x, d, sizeof(float) * n);
    return x;
}
static inline double max_abs(const float *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)x[i]));
    return m;
}

// |got - want| <= atol + rtol |want| everywhere (NaN fails); prints the first mismatches.
static inline int close_enough(const char *what, const float *got, const float *want, size_t n, double atol,
                               double rtol) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= atol + rtol * fabs((double)want[i]))) {
            if (bad < 5)
                fprintf(stderr, "  %s[%zu]: got %.8g, want %.8g (|diff| %.3g > %.3g)\n", what, i, (double)got[i],
                        (double)want[i], d, atol + rtol * fabs((double)want[i]));
            bad++;
        }
    }
    double e = rel_l2(got, want, n);
    fprintf(stderr, "%-34s n=%-8zu rel L2 %.3g  max|ref| %.3g  %s\n", what, n, e, max_abs(want, n),
            bad ? "MISMATCH" : "ok");
    return bad == 0;
}

#endif
