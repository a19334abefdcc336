// bench_overlap.c: can memory-bound kernels hide under the base GEMMs? One 7B gate|up product
// (8192 x 22016 x 4096, bf16) back to back on the main stream, and SwiGLU forward passes (8192 x 11008,
// the step's own kernel, ~0.54 GB each) on a second stream, sustained (the clocks settle under the power
// limit). Serial (one stream) against concurrent, with the products targeting fewer multiprocessors
// (cuda_ctx_set_gemm_sms) so that the other stream finds room. A probe, not a check.
//   build/tests/gpu/bench_overlap [gemms] [swiglus per gemm]
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/dtype.h"
#include "cuda/ops_cuda.h"
#include "tests/gpu/probe_util.h"

// n bytes of random bf16 in [-1, 1) (random bits matter: a product of constants draws less power).
static void *dalloc(size_t n) {
    void *p;
    CK(cudaMalloc(&p, n));
    uint16_t *h = probe_uniform_bf16(n / 2, n, 1.0f);
    CK(cudaMemcpy(p, h, n, cudaMemcpyHostToDevice));
    free(h);
    return p;
}

static float elapsed(cudaEvent_t a, cudaEvent_t b) {
    float ms;
    CK(cudaEventSynchronize(b));
    CK(cudaEventElapsedTime(&ms, a, b));
    return ms;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100, per = argc > 2 ? atoi(argv[2]) : 4;
    const int64_t T = 8192, C = 4096, I = 11008;
    cuda_ctx *m = cuda_ctx_create(), *s = cuda_ctx_create_side();
    if (!m || !s) return 1;
    bf16 *x = dalloc(2 * T * C), *w = dalloc(2 * 2 * I * C), *y = dalloc(2 * T * 2 * I);
    bf16 *gu = dalloc(2 * T * 2 * I), *act = dalloc(2 * T * I);
    CK(cudaDeviceSynchronize());
    cudaStream_t sm = cuda_ctx_stream(m), ss = cuda_ctx_stream(s);
    cudaEvent_t e0, e1, e2;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaEventCreate(&e2));
    int sms_list[] = {0, 124, 116, 108, 100, 92};
    for (int rep = 0; rep < 1; rep++) {
        for (int si = 0; si < (int)(sizeof sms_list / sizeof *sms_list); si++) {
            cuda_ctx_set_gemm_sms(m, sms_list[si]);
            // GEMMs alone
            CK(cudaEventRecord(e0, sm));
            for (int i = 0; i < n; i++) gemm_cuda(m, 0, 1, T, 2 * I, C, 1.0f, x, C, w, C, 0.0f, NULL, y, 2 * I, GEMM_BF16);
            CK(cudaEventRecord(e1, sm));
            float tg = elapsed(e0, e1);
            // SwiGLU alone
            CK(cudaEventRecord(e0, ss));
            for (int i = 0; i < n * per; i++) swiglu_forward_cuda(s, act, I, gu, 2 * I, T, (int)I);
            CK(cudaEventRecord(e1, ss));
            float ta = elapsed(e0, e1);
            // serial on one stream
            CK(cudaEventRecord(e0, sm));
            for (int i = 0; i < n; i++) {
                gemm_cuda(m, 0, 1, T, 2 * I, C, 1.0f, x, C, w, C, 0.0f, NULL, y, 2 * I, GEMM_BF16);
                for (int j = 0; j < per; j++) swiglu_forward_cuda(m, act, I, gu, 2 * I, T, (int)I);
            }
            CK(cudaEventRecord(e1, sm));
            float tser = elapsed(e0, e1);
            // concurrent: products on the main stream, SwiGLU on the side stream
            CK(cudaEventRecord(e0, sm));
            CK(cudaStreamWaitEvent(ss, e0, 0));
            for (int i = 0; i < n; i++) {
                gemm_cuda(m, 0, 1, T, 2 * I, C, 1.0f, x, C, w, C, 0.0f, NULL, y, 2 * I, GEMM_BF16);
                for (int j = 0; j < per; j++) swiglu_forward_cuda(s, act, I, gu, 2 * I, T, (int)I);
            }
            CK(cudaEventRecord(e2, ss));
            CK(cudaStreamWaitEvent(sm, e2, 0));
            CK(cudaEventRecord(e1, sm));
            float tcon = elapsed(e0, e1);
            double tf = 2.0 * T * 2 * I * C * n / (tg * 1e-3) / 1e12;
            printf("sms %3d  gemm alone %7.1f ms (%4.0f TFLOP/s, %.3f each)  swiglu alone %6.1f ms (%.3f each)  "
                   "serial %7.1f  concurrent %7.1f  (saves %5.1f%%)\n",
                   sms_list[si], tg, tf, tg / n, ta, ta / (n * per), tser, tcon, 100.0 * (1.0 - tcon / tser));
            fflush(stdout);
        }
    }
    return 0;
}
