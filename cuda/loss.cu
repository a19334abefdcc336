// loss.cu: lm_head fused with the causal-LM cross-entropy (twin of lmhead_ce_forward_backward_cpu).
//
// Llama 3's vocabulary makes the logits of a micro-batch gigabytes ([T][128256] fp32), so rows go
// through in chunks: logits of the chunk (one GEMM, fp32 out), one kernel for the loss and the
// logits' gradient (an online max/sum over the row, then softmax - onehot written as bf16), and the
// chunk's dh (one GEMM). Only the chunk's logits ever exist.
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

__global__ void ce_kernel(const float *__restrict__ logits, bf16 *dlogits, const int32_t *__restrict__ targets, int V,
                          float scale, float *row_loss) {
    int64_t r = blockIdx.x;
    int y = targets[r];
    const float *l = logits + r * V;
    if (y == CE_IGNORE) {
        if (threadIdx.x == 0) row_loss[r] = 0.0f;
        if (dlogits)
            for (int j = threadIdx.x; j < V; j += blockDim.x) dlogits[r * V + j] = __float2bfloat16_rn(0.0f);
        return;
    }
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float x = l[j];
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
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
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float d = expf(l[j] - lse) - (j == y ? 1.0f : 0.0f);
        dlogits[r * V + j] = __float2bfloat16_rn(fabsf(d) < 1e-20f ? 0.0f : d * scale);
    }
}

extern "C" int64_t lmhead_ce_chunk_rows(size_t budget, int V) {
    int64_t n = (int64_t)(budget / ((size_t)V * 6));
    return n < 1 ? 1 : n;
}

extern "C" size_t lmhead_ce_scratch_bytes(int64_t chunk_rows, int V) {
    return cuda_align((size_t)chunk_rows * V * 4) + cuda_align((size_t)chunk_rows * V * 2);
}

extern "C" void lmhead_ce_cuda(cuda_ctx *ctx, const bf16 *h, const bf16 *W, const int32_t *targets, int64_t T, int C, int V,
                               float scale, float *gh, float *row_loss, float *logits_host, void *scratch,
                               int64_t chunk_rows) {
    float *lg = (float *)scratch;
    bf16 *dl = (bf16 *)((char *)scratch + cuda_align((size_t)chunk_rows * V * 4));
    for (int64_t r0 = 0; r0 < T; r0 += chunk_rows) {
        int64_t n = T - r0 < chunk_rows ? T - r0 : chunk_rows;
        gemm_cuda(ctx, 0, 1, n, V, C, 1.0f, h + r0 * C, C, W, C, 0.0f, NULL, lg, V, GEMM_F32);
        if (logits_host)
            CUDA_CHECK(cudaMemcpyAsync(logits_host + r0 * V, lg, sizeof(float) * (size_t)(n * V), cudaMemcpyDeviceToHost,
                                       ctx->stream));
        ce_kernel<<<(unsigned)n, CE_THREADS, 0, ctx->stream>>>(lg, gh ? dl : NULL, targets + r0, V, scale, row_loss + r0);
        CUDA_LAUNCH_CHECK();
        if (gh) gemm_cuda(ctx, 0, 0, n, C, V, 1.0f, dl, V, W, C, 0.0f, NULL, gh + r0 * C, C, GEMM_F32);
    }
    if (logits_host) CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
}
