// norm_act.cu: RMSNorm forward/backward, SwiGLU forward/backward and the embedding lookup (the twins of
// rmsnorm_*_cpu, swiglu_*_cpu and embedding_forward_cpu in core/ops_cpu.c).
//
// The residual add of a LLaMA block is not a separate kernel here: the o_proj and down_proj GEMMs
// write x + y directly (cuBLASLt's C input with beta = 1), so RMSNorm reads the finished residual.
// Rows are bf16 and 16-byte aligned in groups of 8 (C % 8 == 0, asserted), one block per row; SwiGLU
// also takes any intermediate size (an element per thread).
#include "cuda/cuda_util.cuh"

// ---- CUDA kernels ----------------------------------------------------------------------------------

__device__ __forceinline__ void load8(const bf16 *p, float *f) {
    uint4 u = *(const uint4 *)p;
    const bf16 *h = (const bf16 *)&u;
#pragma unroll
    for (int k = 0; k < 8; k++) f[k] = __bfloat162float(h[k]);
}
__device__ __forceinline__ void store8(bf16 *p, const float *f) {
    __align__(16) bf16 h[8];
#pragma unroll
    for (int k = 0; k < 8; k++) h[k] = __float2bfloat16_rn(f[k]);
    *(uint4 *)p = *(const uint4 *)h;
}

__global__ void rmsnorm_forward_kernel(bf16 *out, int64_t ldo, float *rstd, const bf16 *__restrict__ inp,
                                       const float *__restrict__ w, int C, float eps) {
    int64_t t = blockIdx.x;
    const bf16 *x = inp + t * C;
    float ss = 0.0f;
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        float f[8];
        load8(x + c, f);
#pragma unroll
        for (int k = 0; k < 8; k++) ss += f[k] * f[k];
    }
    ss = block_sum(ss);
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    if (rstd && threadIdx.x == 0) rstd[t] = r;
    bf16 *y = out + t * ldo;
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        float f[8];
        load8(x + c, f);
#pragma unroll
        for (int k = 0; k < 8; k++) f[k] = w[c + k] * (f[k] * r);
        store8(y + c, f);
    }
}

// dL/dx_j = r w_j g_j - (r^3 / C) x_j sum_i g_i w_i x_i
__global__ void rmsnorm_backward_kernel(float *ginp, bf16 *ginp_bf16, int64_t ldb, const float *__restrict__ gout,
                                        const bf16 *__restrict__ inp, const float *__restrict__ w,
                                        const float *__restrict__ rstd, int C) {
    int64_t t = blockIdx.x;
    const bf16 *x = inp + t * C;
    const float *g = gout + t * C;
    float dot = 0.0f;
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        float f[8];
        load8(x + c, f);
#pragma unroll
        for (int k = 0; k < 8; k++) dot += g[c + k] * w[c + k] * f[k];
    }
    dot = block_sum(dot);
    float r = rstd[t];
    float coef = r * r * r * dot / (float)C;
    float *gx = ginp + t * C;
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        float f[8], o[8];
        load8(x + c, f);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            o[k] = gx[c + k] + (r * (w[c + k] * g[c + k]) - coef * f[k]);
            gx[c + k] = o[k];
        }
        if (ginp_bf16) store8(ginp_bf16 + t * ldb + c, o);
    }
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

// 8 consecutive elements of one row per thread (I % 8 == 0).
__global__ void swiglu_forward_kernel(bf16 *out, int64_t ldo, const bf16 *__restrict__ gu, int64_t ldgu, int64_t T, int I) {
    int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, per_row = I / 8;
    if (v >= T * per_row) return;
    int64_t t = v / per_row;
    int c = (int)(v % per_row) * 8;
    float g[8], u[8];
    load8(gu + t * ldgu + c, g);
    load8(gu + t * ldgu + I + c, u);
#pragma unroll
    for (int k = 0; k < 8; k++) g[k] = silu_f(g[k]) * u[k];
    store8(out + t * ldo + c, g);
}

// silu'(g) = s (1 + g (1 - s)), s = sigmoid(g); in place over gu.
__global__ void swiglu_backward_kernel(bf16 *gu, int64_t ldgu, const bf16 *__restrict__ gout, int64_t T, int I) {
    int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, per_row = I / 8;
    if (v >= T * per_row) return;
    int64_t t = v / per_row;
    int c = (int)(v % per_row) * 8;
    float g[8], u[8], go[8], dg[8], du[8];
    load8(gu + t * ldgu + c, g);
    load8(gu + t * ldgu + I + c, u);
    load8(gout + t * I + c, go);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float s = 1.0f / (1.0f + expf(-g[k]));
        dg[k] = go[k] * u[k] * (s * (1.0f + g[k] * (1.0f - s)));
        du[k] = go[k] * (g[k] / (1.0f + expf(-g[k])));
    }
    store8(gu + t * ldgu + c, dg);
    store8(gu + t * ldgu + I + c, du);
}

// Any I (stories260K's 172 is not a multiple of 8): one element per thread.
__global__ void swiglu_forward1_kernel(bf16 *out, int64_t ldo, const bf16 *__restrict__ gu, int64_t ldgu, int64_t T,
                                       int I) {
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= T * I) return;
    int64_t t = e / I;
    int c = (int)(e % I);
    float g = __bfloat162float(gu[t * ldgu + c]), u = __bfloat162float(gu[t * ldgu + I + c]);
    out[t * ldo + c] = __float2bfloat16_rn(silu_f(g) * u);
}

__global__ void swiglu_backward1_kernel(bf16 *gu, int64_t ldgu, const bf16 *__restrict__ gout, int64_t T, int I) {
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= T * I) return;
    int64_t t = e / I;
    int c = (int)(e % I);
    float g = __bfloat162float(gu[t * ldgu + c]), u = __bfloat162float(gu[t * ldgu + I + c]);
    float go = __bfloat162float(gout[e]), s = 1.0f / (1.0f + expf(-g));
    gu[t * ldgu + c] = __float2bfloat16_rn(go * u * (s * (1.0f + g * (1.0f - s))));
    gu[t * ldgu + I + c] = __float2bfloat16_rn(go * (g / (1.0f + expf(-g))));
}

__global__ void embedding_kernel(bf16 *out, const int32_t *__restrict__ ids, const bf16 *__restrict__ table, int64_t T,
                                 int C) {
    int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, per_row = C / 8;
    if (v >= T * per_row) return;
    int64_t t = v / per_row, c = (v % per_row) * 8;
    *(uint4 *)(out + t * C + c) = *(const uint4 *)(table + (int64_t)ids[t] * C + c);
}

// ---- kernel launchers ---------------------------------------------------------------------------------

static int row_threads(int C) {
    int n = C / 8;
    if (n >= 128) return 128;
    return n <= 32 ? 32 : (n + 31) / 32 * 32;
}

extern "C" void rmsnorm_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, float *rstd, const bf16 *inp,
                                     const float *weight, int64_t T, int C, float eps) {
    MOSFT_ASSERT(C % 8 == 0 && ldo % 8 == 0);
    if (T == 0) return;
    rmsnorm_forward_kernel<<<(unsigned)T, row_threads(C), 0, ctx->stream>>>(out, ldo, rstd, inp, weight, C, eps);
    CUDA_LAUNCH_CHECK();
}

extern "C" void rmsnorm_backward_cuda(cuda_ctx *ctx, float *ginp, bf16 *ginp_bf16, int64_t ldb, const float *gout,
                                      const bf16 *inp, const float *weight, const float *rstd, int64_t T, int C) {
    MOSFT_ASSERT(C % 8 == 0 && ldb % 8 == 0);
    if (T == 0) return;
    rmsnorm_backward_kernel<<<(unsigned)T, row_threads(C), 0, ctx->stream>>>(ginp, ginp_bf16, ldb, gout, inp, weight, rstd,
                                                                             C);
    CUDA_LAUNCH_CHECK();
}

extern "C" void swiglu_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, const bf16 *gu, int64_t ldgu, int64_t T, int I) {
    if (T == 0) return;
    if (I % 8 || ldo % 8 || ldgu % 8) {
        swiglu_forward1_kernel<<<ceil_div_i(T * I, 256), 256, 0, ctx->stream>>>(out, ldo, gu, ldgu, T, I);
    } else {
        int64_t n = T * (I / 8);
        swiglu_forward_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(out, ldo, gu, ldgu, T, I);
    }
    CUDA_LAUNCH_CHECK();
}

extern "C" void swiglu_backward_cuda(cuda_ctx *ctx, bf16 *gu, int64_t ldgu, const bf16 *gout, int64_t T, int I) {
    if (T == 0) return;
    if (I % 8 || ldgu % 8) {
        swiglu_backward1_kernel<<<ceil_div_i(T * I, 256), 256, 0, ctx->stream>>>(gu, ldgu, gout, T, I);
    } else {
        int64_t n = T * (I / 8);
        swiglu_backward_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(gu, ldgu, gout, T, I);
    }
    CUDA_LAUNCH_CHECK();
}

extern "C" void embedding_forward_cuda(cuda_ctx *ctx, bf16 *out, const int32_t *ids, const bf16 *table, int64_t T, int C) {
    MOSFT_ASSERT(C % 8 == 0);
    int64_t n = T * (C / 8);
    if (n == 0) return;
    embedding_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(out, ids, table, T, C);
    CUDA_LAUNCH_CHECK();
}
