// optim.cu: AdamW over the one contiguous fp32 parameter buffer (adamw_update_cpu, bit for bit) and
// deterministic reductions (the global gradient norm, loss sums).
//
// AdamW's per-element arithmetic uses the __f*_rn intrinsics so that nvcc cannot contract a multiply
// and an add into one fused operation: each step rounds exactly where torch's (and the CPU twin's)
// fp32 arithmetic rounds. Reductions run over a fixed partition (a fixed number of blocks, each a
// contiguous range, threads striding, a fixed tree) in double, so a sum never depends on timing.
#include <math.h>
#include <string.h>

#include "cuda/cuda_util.cuh"

#define RED_BLOCKS 512
#define RED_THREADS 256

__global__ void adamw_kernel(float *param, const float *__restrict__ grad, float *m, float *v, int64_t n, float gscale,
                             int do_scale, float decay, float w1, float b2, float w2, float neg_step, float bc2_sqrt,
                             float eps) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = do_scale ? __fmul_rn(grad[i], gscale) : grad[i];
    float p = __fmul_rn(param[i], decay);
    float mi = __fadd_rn(m[i], __fmul_rn(w1, __fsub_rn(g, m[i])));
    float vi = __fmul_rn(v[i], b2);
    vi = __fadd_rn(vi, __fmul_rn(__fmul_rn(w2, g), g));
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
    param[i] = __fadd_rn(p, __fdiv_rn(__fmul_rn(neg_step, mi), denom));
    m[i] = mi;
    v[i] = vi;
}

extern "C" void adamw_cuda(cuda_ctx *ctx, float *param, const float *grad, float *m, float *v, int64_t n, float grad_scale,
                           double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
    MOSFT_ASSERT(step >= 1);
    if (n == 0) return;
    // The scalars exactly as adamw_update_cpu computes them (doubles rounded once to fp32).
    float decay = (float)(1.0 - lr * weight_decay);
    float w1 = (float)(1.0 - beta1), b2 = (float)beta2, w2 = (float)(1.0 - beta2);
    double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    float neg_step = (float)(-(lr / bc1)), bc2_sqrt = (float)sqrt(bc2), epsf = (float)eps;
    MOSFT_ASSERT(w1 < 0.5f);
    adamw_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(param, grad, m, v, n, grad_scale, grad_scale != 1.0f, decay,
                                                              w1, b2, w2, neg_step, bc2_sqrt, epsf);
    CUDA_LAUNCH_CHECK();
}

__device__ __forceinline__ double block_sum_d(double v) {
    __shared__ double sh[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0;
    return warp_sum_d(v);
}

__global__ void reduce_partial_kernel(const float *__restrict__ x, int64_t n, int64_t per_block, int square,
                                      double *partial) {
    int64_t lo = (int64_t)blockIdx.x * per_block, hi = lo + per_block < n ? lo + per_block : n;
    double s = 0.0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        double v = x[i];
        s += square ? v * v : v;
    }
    s = block_sum_d(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void reduce_final_kernel(double *partial, int nb) {
    double s = 0.0;
    for (int i = threadIdx.x; i < nb; i += blockDim.x) s += partial[i];
    s = block_sum_d(s);
    if (threadIdx.x == 0) partial[nb] = s;
}

extern "C" size_t reduce_scratch_bytes(int64_t n) {
    (void)n;
    return cuda_align(sizeof(double) * (RED_BLOCKS + 1));
}

static double reduce(cuda_ctx *ctx, const float *x, int64_t n, void *partial, int square) {
    if (n == 0) return 0.0;
    double *p = (double *)partial;
    int64_t per = (n + RED_BLOCKS - 1) / RED_BLOCKS;
    reduce_partial_kernel<<<RED_BLOCKS, RED_THREADS, 0, ctx->stream>>>(x, n, per, square, p);
    CUDA_LAUNCH_CHECK();
    reduce_final_kernel<<<1, RED_THREADS, 0, ctx->stream>>>(p, RED_BLOCKS);
    CUDA_LAUNCH_CHECK();
    double out;
    CUDA_CHECK(cudaMemcpyAsync(ctx->host_scratch, p + RED_BLOCKS, sizeof(double), cudaMemcpyDeviceToHost, ctx->stream));
    CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
    memcpy(&out, ctx->host_scratch, sizeof out);
    return out;
}

extern "C" double sum_squares_cuda(cuda_ctx *ctx, const float *x, int64_t n, void *partial) {
    return reduce(ctx, x, n, partial, 1);
}
extern "C" double sum_f32_cuda(cuda_ctx *ctx, const float *x, int64_t n, void *partial) {
    return reduce(ctx, x, n, partial, 0);
}

__global__ void scale_kernel(float *x, int64_t n, float s) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}
extern "C" void scale_f32_cuda(cuda_ctx *ctx, float *x, int64_t n, float s) {
    if (n == 0) return;
    scale_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(x, n, s);
    CUDA_LAUNCH_CHECK();
}
