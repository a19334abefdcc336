// loss.cu: lm_head fused with the causal-LM cross-entropy (twin of lmhead_ce_forward_backward_cpu).
//
// Llama 3's vocabulary makes the logits of a micro-batch gigabytes ([T][128256]), so rows go through in
// chunks: logits of the chunk (one GEMM), one kernel for the loss and the logits' gradient (an online
// max/sum over the row, then softmax - onehot written as bf16), and the chunk's dh (one GEMM). Only the
// chunk's logits ever exist. As in the CPU twin, only the rows that are asked for go through (in
// training the supervised ones: a chat template's prompt tokens have no loss, and SuperNI's examples are
// ~97 % prompt): they are gathered into a compact chunk of h, and the chunk's dh is scattered back into
// their rows of gh.
//
// The logits are bf16, as transformers' bf16 lm_head gives them before its loss upcasts them to fp32
// (the softmax and the loss are fp32 here too), and the gradient is written over them in place: half the
// bytes of fp32 logits, and a row (256 KB at 128K) is read the second time from L2. Only when every
// row's logits go to the host (forward_logits: no gradient) are they fp32.
#include <math.h>

#include "cuda/cuda_util.cuh"
#include "cuda/mma.cuh"

#define CE_THREADS 1024
#define CE_IGNORE (-100)

// Merge two (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2) {
    float M = fmaxf(m, m2);
    if (M == -INFINITY) return;
    s = s * expf(m - M) + s2 * expf(m2 - M);
    m = M;
}

// dL/dlogit of one logit x: softmax - one-hot, flushed to zero below 1e-20, times the loss scale. lse2 =
// lse log2(e): exp(x - lse) is one FMA and one ex2.approx (ex2_ftz, cuda/mma.cuh), as in the first pass:
// the kernel is bound by its instructions (~60 % of the issue slots), and expf's range reduction was a
// fifth of them.
__device__ __forceinline__ float ce_grad(float x, float lse2, bool target, float scale) {
    float d = ex2_ftz(fmaf(x, LOG2E_F, -lse2)) - (target ? 1.0f : 0.0f);
    return fabsf(d) < 1e-20f ? 0.0f : d * scale;
}

__device__ __forceinline__ float logit_f(float x) { return x; }
__device__ __forceinline__ float logit_f(bf16 x) { return __bfloat162float(x); }
// 16 bytes of logits: 4 fp32 or 8 bf16.
__device__ __forceinline__ void load16(const float *p, float *x) {
    float4 v = *(const float4 *)p;
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
}
__device__ __forceinline__ void load16(const bf16 *p, float *x) { load_bf16<8>(p, x); }

// One row of the chunk, by the whole block: row i of logits/dlogits is row r of the batch (rows[r0 + i], or
// r0 + i without a row list), whose target and loss are targets[r] and row_loss[r]. List entries from
// n_rows on only pad the chunk: zero gradient, nothing written for their row. dlogits may be the
// logits themselves (bf16): each thread reads its logits before it writes their gradients, and the
// target's logit is read before the block's first barrier.
// VEC (V a multiple of a 16-byte vector): 16-byte loads and one rescale of the running sum per vector
// (scalar loads left the kernel at ~1.7 TB/s).
template <typename TL, bool VEC>
__device__ __forceinline__ void ce_row(const TL *logits, bf16 *dlogits, const int32_t *__restrict__ targets,
                                       const int32_t *__restrict__ rows, int64_t r0, int64_t i, int64_t n_rows, int V,
                                       float scale, float *row_loss) {
    constexpr int N = 16 / sizeof(TL);
    int64_t r = rows ? rows[r0 + i] : r0 + i;
    int y = r0 + i < n_rows ? targets[r] : CE_IGNORE;
    const TL *l = logits + i * V;
    bf16 *dl = dlogits ? dlogits + i * V : NULL;
    if (y == CE_IGNORE) {  // a pad, or every row was asked for (the logits were wanted): no loss, no gradient
        if (threadIdx.x == 0 && r0 + i < n_rows) row_loss[r] = 0.0f;
        if (dl)
            for (int j = threadIdx.x; j < V; j += blockDim.x) dl[j] = __float2bfloat16_rn(0.0f);
        return;  // (the whole block: y is the row's)
    }
    float ly = threadIdx.x == 0 ? logit_f(l[y]) : 0.0f;
    float m = -INFINITY, s = 0.0f;
    if (VEC) {
#pragma unroll 4
        for (int j = threadIdx.x; j < V / N; j += blockDim.x) {
            float x[N];
            load16(l + (int64_t)j * N, x);
            float mx = x[0];
#pragma unroll
            for (int k = 1; k < N; k++) mx = fmaxf(mx, x[k]);
            if (mx > m) {  // from -inf: expf(-inf) = 0 clears the empty sum
                s *= expf(m - mx);
                m = mx;
            }
            float m2 = m * LOG2E_F;  // exp(x - m) as ce_grad's
#pragma unroll
            for (int k = 0; k < N; k++) x[k] = ex2_ftz(fmaf(x[k], LOG2E_F, -m2));
#pragma unroll
            for (int k = 0; k < N / 2; k++) x[k] = x[2 * k] + x[2 * k + 1];  // a fixed tree: ((e0 + e1) + (e2 + e3))
#pragma unroll
            for (int w = N / 4; w > 0; w /= 2)
#pragma unroll
                for (int k = 0; k < w; k++) x[k] += x[k + w];
            s += x[0];
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            float x = logit_f(l[j]);
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
    __shared__ float sm[32], ss[32];  // (one block's rows share them: ce_kernel's barrier between rows)
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
    if (threadIdx.x == 0) row_loss[r] = lse - ly;
    if (!dl) return;
    float lse2 = lse * LOG2E_F;
    if (VEC) {  // U vectors loaded before any is stored (dl may be l: the compiler could not batch them)
        constexpr int U = 4;
        for (int j0 = threadIdx.x; j0 < V / N; j0 += U * blockDim.x) {
            float x[U][N];
#pragma unroll
            for (int u = 0; u < U; u++)
                if (j0 + u * (int)blockDim.x < V / N) load16(l + (int64_t)(j0 + u * blockDim.x) * N, x[u]);
#pragma unroll
            for (int u = 0; u < U; u++) {
                int j = j0 + u * blockDim.x;
                if (j >= V / N) break;
#pragma unroll
                for (int k = 0; k < N; k++) x[u][k] = ce_grad(x[u][k], lse2, N * j + k == y, scale);
                store_bf16<N>(dl + (int64_t)j * N, x[u]);
            }
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x) dl[j] = __float2bfloat16_rn(ce_grad(logit_f(l[j]), lse2, j == y, scale));
    }
}

// One block a multiprocessor, each taking rows i, i + gridDim.x, ...: the rows in flight (132 x 256 KB
// of bf16 logits at 128K) mostly stay in L2 for the second pass (ncu, a 3B step's 8192 rows: 2.15 ms
// against 2.29 with a block of 512 threads a row).
template <typename TL, bool VEC>
__global__ void __launch_bounds__(CE_THREADS) ce_kernel(const TL *logits, bf16 *dlogits,
                                                         const int32_t *__restrict__ targets,
                                                         const int32_t *__restrict__ rows, int64_t r0, int64_t n,
                                                         int64_t n_rows, int V, float scale, float *row_loss) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        ce_row<TL, VEC>(logits, dlogits, targets, rows, r0, i, n_rows, V, scale, row_loss);
        __syncthreads();  // the reduction's shared memory is the next row's
    }
}

template <typename TL>
static void ce_launch(cuda_ctx *ctx, int64_t n, const TL *lg, bf16 *dl, const int32_t *targets, const int32_t *rows,
                      int64_t r0, int64_t n_rows, int V, float scale, float *row_loss) {
    unsigned grid = n > ctx->sm_count ? (unsigned)ctx->sm_count : (unsigned)n;
    if (V % (16 / (int)sizeof(TL)) == 0)  // 16-byte rows (the scratch is cudaMalloc'd)
        launch_pdl(ce_kernel<TL, true>, grid, dim3(CE_THREADS), 0, ctx->stream, lg, dl, targets, rows, r0, n, n_rows, V,
                   scale, row_loss);
    else
        launch_pdl(ce_kernel<TL, false>, grid, dim3(CE_THREADS), 0, ctx->stream, lg, dl, targets, rows, r0, n, n_rows,
                   V, scale, row_loss);
    CUDA_LAUNCH_CHECK();
}

// Rows per chunk so that a chunk's scratch (bf16 logits, the gathered rows of h, their fp32 dh: 2 V + 6 C
// bytes a row) takes at most `budget` bytes.
extern "C" int64_t lmhead_ce_chunk_rows(size_t budget, int C, int V) {
    int64_t n = (int64_t)(budget / ((size_t)V * 2 + (size_t)C * 6));
    return n < 1 ? 1 : n;
}


// hc[i][0:C] = h[rows[i]][0:C] (bf16), one block per row.
__global__ void gather_rows_kernel(const bf16 *__restrict__ h, const int32_t *__restrict__ rows, bf16 *__restrict__ hc,
                                   int C) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
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
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    const float *src = ghc + (int64_t)blockIdx.x * C;
    float *dst = gh + (int64_t)rows[blockIdx.x] * C;
    if (C % 4 == 0)
        for (int j = threadIdx.x; j < C / 4; j += blockDim.x) ((float4 *)dst)[j] = ((const float4 *)src)[j];
    else
        for (int j = threadIdx.x; j < C; j += blockDim.x) dst[j] = src[j];
}

// [chunk][V] bf16 logits (or fp32 for half the rows), [chunk][C] bf16 gathered h, [chunk][C] fp32 dh.
extern "C" size_t lmhead_ce_scratch_bytes(int64_t chunk_rows, int C, int V) {
    return cuda_align((size_t)chunk_rows * V * 2) + cuda_align((size_t)chunk_rows * C * 2) +
           cuda_align((size_t)chunk_rows * C * 4);
}

extern "C" void lmhead_ce_cuda(cuda_ctx *ctx, const bf16 *h, const bf16 *W, const int32_t *targets, int64_t T, int C, int V,
                               float scale, float *gh, float *row_loss, float *logits_host, void *scratch,
                               int64_t chunk_rows, const int32_t *rows, int64_t n_rows, int64_t n_list) {
    char *p = (char *)scratch;
    bf16 *lg = (bf16 *)p;      // [chunk][V] bf16 logits, then their gradient
    float *lg32 = (float *)p;  // [chunk / 2][V] fp32 logits (logits_host)
    bf16 *hc = (bf16 *)(p += cuda_align((size_t)chunk_rows * V * 2));  // [chunk][C]
    float *ghc = (float *)(p + cuda_align((size_t)chunk_rows * C * 2));  // [chunk][C]
    if (logits_host && (rows || gh)) {  // a programming error: every row's logits, and only them
        fprintf(stderr, "lmhead_ce_cuda: logits_host needs rows == NULL and gh == NULL\n");
        abort();
    }
    if (logits_host && (chunk_rows /= 2) < 1) chunk_rows = 1;
    if (!rows) n_rows = n_list = T;
    int64_t n_chunks = (n_list + chunk_rows - 1) / chunk_rows;
    if (n_chunks > 0) chunk_rows = (n_list + n_chunks - 1) / n_chunks;  // equal chunks: no small last one
    if (rows) {  // the rows left out: loss 0, no gradient
        CUDA_CHECK(cudaMemsetAsync(row_loss, 0, sizeof(float) * (size_t)T, ctx->stream));
        if (gh) CUDA_CHECK(cudaMemsetAsync(gh, 0, sizeof(float) * (size_t)(T * C), ctx->stream));
    }
    for (int64_t r0 = 0; r0 < n_list; r0 += chunk_rows) {
        int64_t n = n_list - r0 < chunk_rows ? n_list - r0 : chunk_rows;
        const bf16 *hx = h + r0 * C;  // [n][C]: the chunk's rows of h
        if (rows) {
            launch_pdl(gather_rows_kernel, dim3((unsigned)n), dim3(128), 0, ctx->stream, h, rows + r0, hc, C);
            CUDA_LAUNCH_CHECK();
            hx = hc;
        }
        if (logits_host) {
            gemm_cuda(ctx, 0, 1, n, V, C, 1.0f, hx, C, W, C, 0.0f, NULL, lg32, V, GEMM_F32);
            CUDA_CHECK(cudaMemcpyAsync(logits_host + r0 * V, lg32, sizeof(float) * (size_t)(n * V), cudaMemcpyDeviceToHost,
                                       ctx->stream));
            ce_launch(ctx, n, (const float *)lg32, NULL, targets, rows, r0, n_rows, V, scale, row_loss);
            continue;
        }
        gemm_cuda(ctx, 0, 1, n, V, C, 1.0f, hx, C, W, C, 0.0f, NULL, lg, V, GEMM_BF16);
        ce_launch(ctx, n, (const bf16 *)lg, gh ? lg : NULL, targets, rows, r0, n_rows, V, scale, row_loss);
        if (!gh) continue;
        gemm_cuda(ctx, 0, 0, n, C, V, 1.0f, lg, V, W, C, 0.0f, NULL, rows ? ghc : gh + r0 * C, C, GEMM_F32);
        int64_t real = n_rows - r0 < n ? n_rows - r0 : n;  // the pads' dh (zero) stays out of gh
        if (rows && real > 0) {
            launch_pdl(scatter_rows_kernel, dim3((unsigned)real), dim3(128), 0, ctx->stream, ghc, rows + r0, gh, C);
            CUDA_LAUNCH_CHECK();
        }
    }
    if (logits_host) CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
}
