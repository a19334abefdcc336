// loss.cu: lm_head fused with the causal-LM cross-entropy (twin of lmhead_ce_forward_backward_cpu).
//
// Llama 3's vocabulary makes the logits of a micro-batch gigabytes ([T][128256] fp32), so rows go
// through in chunks: logits of the chunk (one GEMM, fp32 out), one kernel for the loss and the
// logits' gradient (an online max/sum over the row, then softmax - onehot written as bf16), and the
// chunk's dh (one GEMM). Only the chunk's logits ever exist. As in the CPU twin, only the rows that
// are asked for go through (in training the supervised ones: a chat template's prompt tokens have no
// loss, and SuperNI's examples are ~97 % prompt): they are gathered into a compact chunk of h, and
// the chunk's dh is scattered back into their rows of gh.
#include <math.h>

#include "cuda/cuda_util.cuh"

#define CE_THREADS 512
#define CE_IGNORE (-100)

// Merge two (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2) {
    float M = fmaxf(m, m2);
    if (M == -INFINITY) return;
    s = s * expf(m - M) + s2 * expf(m2 - M);
    m = M;
}

// One block per row of the chunk: row i of logits/dlogits is row r of the batch (rows[r0 + i], or
// r0 + i without a row list), whose target and loss are targets[r] and row_loss[r]. List entries from
// n_rows on only pad the chunk: zero gradient, nothing written for their row.
// VEC (V % 4 == 0): four logits a load and one rescale of the running sum per four (the row is read
// twice from memory, 2 GB a pass at Llama 3's vocabulary and 4096 rows: scalar loads left the kernel
// at ~1.7 TB/s).
// dL/dlogit of one logit x: softmax - one-hot, flushed to zero below 1e-20, times the loss scale.
__device__ __forceinline__ float ce_grad(float x, float lse, bool target, float scale) {
    float d = expf(x - lse) - (target ? 1.0f : 0.0f);
    return fabsf(d) < 1e-20f ? 0.0f : d * scale;
}

template <bool VEC>
__global__ void ce_kernel(const float *__restrict__ logits, bf16 *dlogits, const int32_t *__restrict__ targets,
                          const int32_t *__restrict__ rows, int64_t r0, int64_t n_rows, int V, float scale,
                          float *row_loss) {
    int64_t i = blockIdx.x, r = rows ? rows[r0 + i] : r0 + i;
    int y = r0 + i < n_rows ? targets[r] : CE_IGNORE;
    const float *l = logits + i * V;
    if (y == CE_IGNORE) {  // a pad, or every row was asked for (the logits were wanted): no loss, no gradient
        if (threadIdx.x == 0 && r0 + i < n_rows) row_loss[r] = 0.0f;
        if (dlogits)
            for (int j = threadIdx.x; j < V; j += blockDim.x) dlogits[i * V + j] = __float2bfloat16_rn(0.0f);
        return;
    }
    float m = -INFINITY, s = 0.0f;
    if (VEC) {
        const float4 *l4 = (const float4 *)l;
#pragma unroll 4
        for (int j = threadIdx.x; j < V / 4; j += blockDim.x) {
            float4 x = l4[j];
            float mx = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
            if (mx > m) {  // from -inf: expf(-inf) = 0 clears the empty sum
                s *= expf(m - mx);
                m = mx;
            }
            s += (expf(x.x - m) + expf(x.y - m)) + (expf(x.z - m) + expf(x.w - m));
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            float x = l[j];
            if (x > m) {
                s = s * expf(m - x) + 1.0f;
                m = x;
            } else {
                s += expf(x - m);
            }
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    __shared__ float sm[32], ss[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        sm[w] = m;
        ss[w] = s;
    }
    __syncthreads();
    m = lane < nw ? sm[lane] : -INFINITY;
    s = lane < nw ? ss[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    float lse = m + logf(s);
    if (threadIdx.x == 0) row_loss[r] = lse - l[y];
    if (!dlogits) return;
    if (VEC) {
        const float4 *l4 = (const float4 *)l;
        uint2 *d4 = (uint2 *)(dlogits + i * V);
#pragma unroll 4
        for (int j = threadIdx.x; j < V / 4; j += blockDim.x) {
            float4 x = l4[j];
            float d[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int k = 0; k < 4; k++) d[k] = ce_grad(d[k], lse, 4 * j + k == y, scale);
            __nv_bfloat162 a = __floats2bfloat162_rn(d[0], d[1]), b = __floats2bfloat162_rn(d[2], d[3]);
            d4[j] = make_uint2(*(uint32_t *)&a, *(uint32_t *)&b);
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x)
            dlogits[i * V + j] = __float2bfloat16_rn(ce_grad(l[j], lse, j == y, scale));
    }
}

extern "C" int64_t lmhead_ce_chunk_rows(size_t budget, int V) {
    int64_t n = (int64_t)(budget / ((size_t)V * 6));
    return n < 1 ? 1 : n;
}

// hc[i][0:C] = h[rows[i]][0:C] (bf16), one block per row.
__global__ void gather_rows_kernel(const bf16 *__restrict__ h, const int32_t *__restrict__ rows, bf16 *__restrict__ hc,
                                   int C) {
    const bf16 *src = h + (int64_t)rows[blockIdx.x] * C;
    bf16 *dst = hc + (int64_t)blockIdx.x * C;
    if (C % 8 == 0)  // 16-byte vectors (cudaMalloc'd buffers, rows of C bf16)
        for (int j = threadIdx.x; j < C / 8; j += blockDim.x) ((uint4 *)dst)[j] = ((const uint4 *)src)[j];
    else
        for (int j = threadIdx.x; j < C; j += blockDim.x) dst[j] = src[j];
}

// gh[rows[i]][0:C] = ghc[i][0:C] (fp32), one block per row.
__global__ void scatter_rows_kernel(const float *__restrict__ ghc, const int32_t *__restrict__ rows, float *__restrict__ gh,
                                    int C) {
    const float *src = ghc + (int64_t)blockIdx.x * C;
    float *dst = gh + (int64_t)rows[blockIdx.x] * C;
    if (C % 4 == 0)
        for (int j = threadIdx.x; j < C / 4; j += blockDim.x) ((float4 *)dst)[j] = ((const float4 *)src)[j];
    else
        for (int j = threadIdx.x; j < C; j += blockDim.x) dst[j] = src[j];
}

// [chunk][V] fp32 logits, [chunk][V] bf16 dlogits, [chunk][C] bf16 gathered h, [chunk][C] fp32 dh.
extern "C" size_t lmhead_ce_scratch_bytes(int64_t chunk_rows, int C, int V) {
    return cuda_align((size_t)chunk_rows * V * 4) + cuda_align((size_t)chunk_rows * V * 2) +
           cuda_align((size_t)chunk_rows * C * 2) + cuda_align((size_t)chunk_rows * C * 4);
}

extern "C" void lmhead_ce_cuda(cuda_ctx *ctx, const bf16 *h, const bf16 *W, const int32_t *targets, int64_t T, int C, int V,
                               float scale, float *gh, float *row_loss, float *logits_host, void *scratch,
                               int64_t chunk_rows, const int32_t *rows, int64_t n_rows, int64_t n_list) {
    char *p = (char *)scratch;
    float *lg = (float *)p;                                        // [chunk][V]
    bf16 *dl = (bf16 *)(p += cuda_align((size_t)chunk_rows * V * 4));  // [chunk][V]
    bf16 *hc = (bf16 *)(p += cuda_align((size_t)chunk_rows * V * 2));  // [chunk][C]
    float *ghc = (float *)(p + cuda_align((size_t)chunk_rows * C * 2));  // [chunk][C]
    if (!rows) n_rows = n_list = T;
    if (rows && logits_host) {  // a programming error: every row's logits need every row
        fprintf(stderr, "lmhead_ce_cuda: logits_host needs rows == NULL\n");
        abort();
    }
    if (rows) {  // the rows left out: loss 0, no gradient
        CUDA_CHECK(cudaMemsetAsync(row_loss, 0, sizeof(float) * (size_t)T, ctx->stream));
        if (gh) CUDA_CHECK(cudaMemsetAsync(gh, 0, sizeof(float) * (size_t)(T * C), ctx->stream));
    }
    for (int64_t r0 = 0; r0 < n_list; r0 += chunk_rows) {
        int64_t n = n_list - r0 < chunk_rows ? n_list - r0 : chunk_rows;
        const bf16 *hx = h + r0 * C;  // [n][C]: the chunk's rows of h
        if (rows) {
            gather_rows_kernel<<<(unsigned)n, 128, 0, ctx->stream>>>(h, rows + r0, hc, C);
            CUDA_LAUNCH_CHECK();
            hx = hc;
        }
        gemm_cuda(ctx, 0, 1, n, V, C, 1.0f, hx, C, W, C, 0.0f, NULL, lg, V, GEMM_F32);
        if (logits_host)
            CUDA_CHECK(cudaMemcpyAsync(logits_host + r0 * V, lg, sizeof(float) * (size_t)(n * V), cudaMemcpyDeviceToHost,
                                       ctx->stream));
        if (V % 4 == 0)  // 16-byte rows (the logits scratch is cudaMalloc'd)
            ce_kernel<true><<<(unsigned)n, CE_THREADS, 0, ctx->stream>>>(lg, gh ? dl : NULL, targets, rows, r0, n_rows, V,
                                                                         scale, row_loss);
        else
            ce_kernel<false><<<(unsigned)n, CE_THREADS, 0, ctx->stream>>>(lg, gh ? dl : NULL, targets, rows, r0, n_rows, V,
                                                                          scale, row_loss);
        CUDA_LAUNCH_CHECK();
        if (!gh) continue;
        gemm_cuda(ctx, 0, 0, n, C, V, 1.0f, dl, V, W, C, 0.0f, NULL, rows ? ghc : gh + r0 * C, C, GEMM_F32);
        int64_t real = n_rows - r0 < n ? n_rows - r0 : n;  // the pads' dh (zero) stays out of gh
        if (rows && real > 0) {
            scatter_rows_kernel<<<(unsigned)real, 128, 0, ctx->stream>>>(ghc, rows + r0, gh, C);
            CUDA_LAUNCH_CHECK();
        }
    }
    if (logits_host) CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
}
