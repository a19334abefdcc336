// norm_act.cu: RMSNorm forward/backward, SwiGLU forward/backward and the embedding lookup (the twins of
// rmsnorm_*_cpu, swiglu_*_cpu and embedding_forward_cpu in core/ops_cpu.c).
//
// The residual add of a LLaMA block is not a separate kernel here: the o_proj and down_proj GEMMs
// write x + y directly (cuBLASLt's C input with beta = 1), so RMSNorm reads the finished residual.
// Rows are bf16 and 16-byte aligned in groups of 8 (C % 8 == 0, asserted), one block per row; SwiGLU
// also takes any intermediate size (an element per thread).
#include "cuda/cuda_util.cuh"

// ---- CUDA kernels ----------------------------------------------------------------------------------

__global__ void rmsnorm_forward_kernel(bf16 *out, int64_t ldo, float *rstd, const bf16 *__restrict__ inp,
                                       const float *__restrict__ w, int C, float eps) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    int64_t t = blockIdx.x;
    const bf16 *x = inp + t * C;
    float ss = 0.0f;
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        float f[8];
        load_bf16<8>(x + c, f);
#pragma unroll
        for (int k = 0; k < 8; k++) ss += f[k] * f[k];
    }
    ss = block_sum(ss);
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    if (rstd && threadIdx.x == 0) rstd[t] = r;
    bf16 *y = out + t * ldo;
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        float f[8];
        load_bf16<8>(x + c, f);
#pragma unroll
        for (int k = 0; k < 8; k++) f[k] = w[c + k] * (f[k] * r);
        store_bf16<8>(y + c, f);
    }
}

// 8 consecutive elements as floats: the norm's weight, its output gradient (fp32 from the lm_head's loss,
// bf16 from the layers' input-gradient GEMMs).
__device__ __forceinline__ void load8(const float *g, float *f) {
    float4 a = *(const float4 *)g, b = *(const float4 *)(g + 4);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16 *g, float *f) { load_bf16<8>(g, f); }

// The residual stream's gradient dL/dx is held as a pair of bf16 tensors, hi + lo: hi = bf16(dL/dx) is
// what the next input-gradient GEMM reads (row stride ldh: the adapter's columns ride beside it) and lo =
// bf16(dL/dx - hi) the rest, so the pair keeps ~17 bits of the sum: 8 bytes an element of a norm's
// traffic (4 read, 4 written) where an fp32 value and its bf16 copy for the GEMM took 10 (ncu, a 3B norm:
// 328 -> 280 MB, 116.7 -> 104 us), and the first norm writes the pair without zeroing it first. hi + lo
// is exact in fp32.
__device__ __forceinline__ void split_store8(bf16 *hi, bf16 *lo, const float *o) {
    float l[8];
    __align__(16) bf16 h[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        h[k] = __float2bfloat16_rn(o[k]);
        l[k] = o[k] - __bfloat162float(h[k]);
    }
    *(uint4 *)hi = *(const uint4 *)h;
    store_bf16<8>(lo, l);
}
__device__ __forceinline__ void load_pair8(const bf16 *hi, const bf16 *lo, float *o) {
    float l[8];
    load_bf16<8>(hi, o);
    load_bf16<8>(lo, l);
#pragma unroll
    for (int k = 0; k < 8; k++) o[k] += l[k];
}

// dL/dx_j = r w_j g_j - (r^3 / C) x_j sum_i g_i w_i x_i, added to hi + lo (acc) or written there (!acc).
template <typename TG>
__global__ void rmsnorm_backward_kernel(bf16 *ghi, int64_t ldh, bf16 *glo, int acc, const TG *__restrict__ gout,
                                        const bf16 *__restrict__ inp, const float *__restrict__ w,
                                        const float *__restrict__ rstd, int C) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    int64_t t = blockIdx.x;
    const bf16 *x = inp + t * C;
    const TG *g = gout + t * C;
    float dot = 0.0f;
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        float f[8], gv[8];
        load_bf16<8>(x + c, f);
        load8(g + c, gv);
#pragma unroll
        for (int k = 0; k < 8; k++) dot += gv[k] * w[c + k] * f[k];
    }
    dot = block_sum(dot);
    float r = rstd[t];
    float coef = r * r * r * dot / (float)C;
    bf16 *hi = ghi + t * ldh, *lo = glo + t * C;
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        float f[8], o[8] = {}, gv[8];
        load_bf16<8>(x + c, f);
        load8(g + c, gv);
        if (acc) load_pair8(hi + c, lo + c, o);
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] = o[k] + (r * (w[c + k] * gv[k]) - coef * f[k]);
        split_store8(hi + c, lo + c, o);
    }
}

// The same two ops with the row in registers: one read of x (and of g, w) per row instead of two. Thread
// j holds the vectors j, j + blockDim, ... (NV of them): the summation order of the loop kernels above,
// so both give the same bits. For rows up to NV * 8 * blockDim elements.
template <int NV>
__global__ void __launch_bounds__(128) rmsnorm_forward_reg_kernel(bf16 *out, int64_t ldo, float *rstd,
                                                                  const bf16 *__restrict__ inp, const float *__restrict__ w,
                                                                  int C, float eps) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    int64_t t = blockIdx.x;
    const bf16 *x = inp + t * C;
    float f[NV][8];
    float ss = 0.0f;
#pragma unroll
    for (int v = 0; v < NV; v++) {
        int c = (v * blockDim.x + threadIdx.x) * 8;
        if (c < C) {
            load_bf16<8>(x + c, f[v]);
#pragma unroll
            for (int k = 0; k < 8; k++) ss += f[v][k] * f[v][k];
        }
    }
    ss = block_sum(ss);
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    if (rstd && threadIdx.x == 0) rstd[t] = r;
    bf16 *y = out + t * ldo;
#pragma unroll
    for (int v = 0; v < NV; v++) {
        int c = (v * blockDim.x + threadIdx.x) * 8;
        if (c < C) {
            float wv[8];
            load8(w + c, wv);
#pragma unroll
            for (int k = 0; k < 8; k++) f[v][k] = wv[k] * (f[v][k] * r);
            store_bf16<8>(y + c, f[v]);
        }
    }
}

// 8 raw elements held in registers between the backward's two passes (bf16: one 16-byte vector; fp32:
// two), unpacked by load8.
template <typename T>
struct raw8 {
    uint4 v[sizeof(T) / 2];
    __device__ __forceinline__ void load(const T *p) {
#pragma unroll
        for (int i = 0; i < (int)(sizeof(T) / 2); i++) v[i] = ((const uint4 *)p)[i];
    }
    __device__ __forceinline__ void get(float *f) const { load8((const T *)v, f); }
};

// The row's inputs (x, the output gradient and, with acc, the pair's old values) are all loaded in the
// first pass and held raw (bf16) in registers, so one round of loads is in flight a row and the second
// pass only unpacks (the pair's loads used to wait for the row's sum): ncu, one layer's norm in the step,
// 3B 104.0 -> 99.0 us, 7B 154.2 -> 132.5 (docs/BENCHMARKS.md, eighteenth session).
template <int NV, typename TG>
__global__ void __launch_bounds__(128) rmsnorm_backward_reg_kernel(bf16 *ghi, int64_t ldh, bf16 *glo, int acc,
                                                                   const TG *__restrict__ gout,
                                                                   const bf16 *__restrict__ inp,
                                                                   const float *__restrict__ w,
                                                                   const float *__restrict__ rstd, int C) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    int64_t t = blockIdx.x;
    const bf16 *x = inp + t * C;
    const TG *g = gout + t * C;
    bf16 *hi = ghi + t * ldh, *lo = glo + t * C;
    raw8<bf16> xr[NV], ph[NV], pl[NV];  // x and the pair's old values, raw
    raw8<TG> gr[NV];
    float dot = 0.0f;
#pragma unroll
    for (int v = 0; v < NV; v++) {
        int c = (v * blockDim.x + threadIdx.x) * 8;
        if (c < C) {
            if (acc) ph[v].load(hi + c), pl[v].load(lo + c);
            xr[v].load(x + c);
            gr[v].load(g + c);
            float xf[8], gv[8], wv[8];
            xr[v].get(xf);
            gr[v].get(gv);
            load8(w + c, wv);
#pragma unroll
            for (int k = 0; k < 8; k++) dot += (gv[k] * wv[k]) * xf[k];
        }
    }
    dot = block_sum(dot);
    float r = rstd[t];
    float coef = r * r * r * dot / (float)C;
#pragma unroll
    for (int v = 0; v < NV; v++) {
        int c = (v * blockDim.x + threadIdx.x) * 8;
        if (c < C) {
            float o[8] = {}, xf[8], gv[8], wv[8];
            if (acc) load_pair8((const bf16 *)ph[v].v, (const bf16 *)pl[v].v, o);
            xr[v].get(xf);
            gr[v].get(gv);
            load8(w + c, wv);
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = o[k] + (r * (gv[k] * wv[k]) - coef * xf[k]);
            split_store8(hi + c, lo + c, o);
        }
    }
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

// 8 consecutive elements of one row per thread (I % 8 == 0).
__global__ void swiglu_forward_kernel(bf16 *out, int64_t ldo, const bf16 *__restrict__ gu, int64_t ldgu, int64_t T, int I) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, per_row = I / 8;
    if (v >= T * per_row) return;
    int64_t t = v / per_row;
    int c = (int)(v % per_row) * 8;
    float g[8], u[8];
    load_bf16<8>(gu + t * ldgu + c, g);
    load_bf16<8>(gu + t * ldgu + I + c, u);
#pragma unroll
    for (int k = 0; k < 8; k++) g[k] = silu_f(g[k]) * u[k];
    store_bf16<8>(out + t * ldo + c, g);
}

// silu'(g) = s (1 + g (1 - s)), s = sigmoid(g); in place over gu.
__global__ void swiglu_backward_kernel(bf16 *gu, int64_t ldgu, const bf16 *__restrict__ gout, int64_t T, int I) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, per_row = I / 8;
    if (v >= T * per_row) return;
    int64_t t = v / per_row;
    int c = (int)(v % per_row) * 8;
    float g[8], u[8], go[8], dg[8], du[8];
    load_bf16<8>(gu + t * ldgu + c, g);
    load_bf16<8>(gu + t * ldgu + I + c, u);
    load_bf16<8>(gout + t * I + c, go);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float s = 1.0f / (1.0f + expf(-g[k]));
        dg[k] = go[k] * u[k] * (s * (1.0f + g[k] * (1.0f - s)));
        du[k] = go[k] * (g[k] / (1.0f + expf(-g[k])));
    }
    store_bf16<8>(gu + t * ldgu + c, dg);
    store_bf16<8>(gu + t * ldgu + I + c, du);
}

// Any I (stories260K's 172 is not a multiple of 8): one element per thread.
__global__ void swiglu_forward1_kernel(bf16 *out, int64_t ldo, const bf16 *__restrict__ gu, int64_t ldgu, int64_t T,
                                       int I) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= T * I) return;
    int64_t t = e / I;
    int c = (int)(e % I);
    float g = __bfloat162float(gu[t * ldgu + c]), u = __bfloat162float(gu[t * ldgu + I + c]);
    out[t * ldo + c] = __float2bfloat16_rn(silu_f(g) * u);
}

__global__ void swiglu_backward1_kernel(bf16 *gu, int64_t ldgu, const bf16 *__restrict__ gout, int64_t T, int I) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
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

// Vectors of 8 per thread for the register kernels (0: the row is too wide, take the loop kernels).
static int row_vectors(int C, int threads) {
    int nv = (C / 8 + threads - 1) / threads;
    return nv <= 8 ? nv : 0;
}

extern "C" void rmsnorm_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, float *rstd, const bf16 *inp,
                                     const float *weight, int64_t T, int C, float eps) {
    MOSFT_ASSERT(C % 8 == 0 && ldo % 8 == 0);
    if (T == 0) return;
    int th = row_threads(C);
    cudaStream_t st = ctx->stream;
    switch (row_vectors(C, th)) {
#define RN_CASE(n)                                                                                                  \
    case n:                                                                                                         \
        launch_pdl(rmsnorm_forward_reg_kernel<n>, dim3((unsigned)T), dim3(th), 0, st, out, ldo, rstd, inp, weight, C, \
                   eps);                                                                                             \
        break;
        RN_CASE(1) RN_CASE(2) RN_CASE(3) RN_CASE(4) RN_CASE(5) RN_CASE(6) RN_CASE(7) RN_CASE(8)
#undef RN_CASE
    default:
        launch_pdl(rmsnorm_forward_kernel, dim3((unsigned)T), dim3(th), 0, st, out, ldo, rstd, inp, weight, C, eps);
        break;
    }
    CUDA_LAUNCH_CHECK();
}

template <typename TG>
static void rmsnorm_backward_launch(cudaStream_t st, bf16 *ghi, int64_t ldh, bf16 *glo, int acc, const TG *gout,
                                    const bf16 *inp, const float *weight, const float *rstd, int64_t T, int C) {
    int th = row_threads(C);
    switch (row_vectors(C, th)) {
#define RN_CASE(n)                                                                                                  \
    case n:                                                                                                         \
        launch_pdl(rmsnorm_backward_reg_kernel<n, TG>, dim3((unsigned)T), dim3(th), 0, st, ghi, ldh, glo, acc, gout, \
                   inp, weight, rstd, C);                                                                            \
        break;
        RN_CASE(1) RN_CASE(2) RN_CASE(3) RN_CASE(4) RN_CASE(5) RN_CASE(6) RN_CASE(7) RN_CASE(8)
#undef RN_CASE
    default:
        launch_pdl(rmsnorm_backward_kernel<TG>, dim3((unsigned)T), dim3(th), 0, st, ghi, ldh, glo, acc, gout, inp, weight,
                   rstd, C);
        break;
    }
}

extern "C" void rmsnorm_backward_cuda(cuda_ctx *ctx, bf16 *ghi, int64_t ldh, bf16 *glo, int acc, const void *gout,
                                      int gout_f32, const bf16 *inp, const float *weight, const float *rstd, int64_t T,
                                      int C) {
    MOSFT_ASSERT(C % 8 == 0 && ldh % 8 == 0);
    if (T == 0) return;
    if (gout_f32)
        rmsnorm_backward_launch(ctx->stream, ghi, ldh, glo, acc, (const float *)gout, inp, weight, rstd, T, C);
    else
        rmsnorm_backward_launch(ctx->stream, ghi, ldh, glo, acc, (const bf16 *)gout, inp, weight, rstd, T, C);
    CUDA_LAUNCH_CHECK();
}

extern "C" void swiglu_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, const bf16 *gu, int64_t ldgu, int64_t T, int I) {
    if (T == 0) return;
    if (I % 8 || ldo % 8 || ldgu % 8) {
        launch_pdl(swiglu_forward1_kernel, dim3(ceil_div_i(T * I, 256)), dim3(256), 0, ctx->stream, out, ldo, gu, ldgu,
                   T, I);
    } else {
        int64_t n = T * (I / 8);
        launch_pdl(swiglu_forward_kernel, dim3(ceil_div_i(n, 256)), dim3(256), 0, ctx->stream, out, ldo, gu, ldgu, T,
                   I);
    }
    CUDA_LAUNCH_CHECK();
}

extern "C" void swiglu_backward_cuda(cuda_ctx *ctx, bf16 *gu, int64_t ldgu, const bf16 *gout, int64_t T, int I) {
    if (T == 0) return;
    if (I % 8 || ldgu % 8) {
        launch_pdl(swiglu_backward1_kernel, dim3(ceil_div_i(T * I, 256)), dim3(256), 0, ctx->stream, gu, ldgu, gout, T,
                   I);
    } else {
        int64_t n = T * (I / 8);
        launch_pdl(swiglu_backward_kernel, dim3(ceil_div_i(n, 256)), dim3(256), 0, ctx->stream, gu, ldgu, gout, T, I);
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
