// lowrank_split.cuh: what the fused low-rank kernels (cuda/adapter.cu's dropout kernels,
// cuda/swiglu_lowrank.cu) share: how many blocks a multiprocessor holds, how many splits of the reduced
// dimension one wave of resident blocks holds, and the store of an accumulator tile's rows into a split's
// fp32 partials (or, with no split, straight into the bf16 result). The partials are summed in a fixed
// order by splitk_sum_cuda.
#ifndef MOSFT_LOWRANK_SPLIT_CUH
#define MOSFT_LOWRANK_SPLIT_CUH

#include "cuda/cuda_util.cuh"

// One accumulator tile's columns j, j + 1 of rows t and t + 8 (< T) of a [T][W] result: into split s of
// the fp32 partials part [splits][T][W], or (part NULL: no split) bf16 into h (row stride ldh).
__device__ __forceinline__ void store_acc_rows(const float *c, float *part, int s, int W, bf16 *h, int64_t ldh,
                                               int64_t t, int64_t T, int j) {
#pragma unroll
    for (int hl = 0; hl < 2; hl++, t += 8) {
        if (t >= T) continue;
        if (part)
            *(float2 *)(part + ((int64_t)s * T + t) * W + j) = make_float2(c[2 * hl], c[2 * hl + 1]);
        else
            *(__nv_bfloat162 *)(h + t * ldh + j) = __floats2bfloat162_rn(c[2 * hl], c[2 * hl + 1]);
    }
}

// Blocks of `threads` threads with smem bytes of dynamic shared memory resident on a multiprocessor
// (at least 1), the kernel's limit raised to smem_max the first time it is asked for (above the 48 KiB
// default).
template <class K>
static int resident_blocks(K kernel, int threads, size_t smem, size_t smem_max) {
    static const void *attr_set[8];  // the kernels whose limit is raised
    int k = 0;
    while (k < 8 && attr_set[k] && attr_set[k] != (const void *)kernel) k++;
    MOSFT_ASSERT(k < 8);
    if (!attr_set[k]) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_max));
        attr_set[k] = (const void *)kernel;
    }
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    return per_sm > 0 ? per_sm : 1;
}

// Splits of the reduced dimension for a grid of `tiles` x splits blocks of `threads` threads with smem bytes
// of shared memory (the kernel's limit raised to smem_max once): as many as one wave of resident blocks
// holds (the fused dropout and SwiGLU kernels are latency-bound, so every resident slot counts, and a second,
// partial wave would only add a tail), at most n_chunks and 16, and while more than one, each split's
// split_floats of fp32 partials within part's part_floats.
template <class K>
static int wave_splits(const cuda_ctx *ctx, K kernel, size_t smem_max, size_t smem, int tiles, int n_chunks,
                       size_t split_floats, const float *part, size_t part_floats, int threads = 128) {
    int splits = resident_blocks(kernel, threads, smem, smem_max) * ctx->sm_count / tiles;
    if (splits > n_chunks) splits = n_chunks;
    if (splits > 16) splits = 16;
    while (splits > 1 && (!part || (size_t)splits * split_floats > part_floats)) splits--;
    return splits < 1 ? 1 : splits;
}

#endif
