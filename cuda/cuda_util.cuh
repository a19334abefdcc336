// cuda_util.cuh: what every CUDA file of mosft shares: check macros that never compile out (file:line,
// the failing call and a hint), the cuda_ctx layout, and small device helpers.
#ifndef MOSFT_CUDA_UTIL_CUH
#define MOSFT_CUDA_UTIL_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <type_traits>
#include <utility>

#include "core/common.h"
#include "cuda/ops_cuda.h"

static inline const char *cuda_hint(cudaError_t e) {
    if (e == cudaErrorMemoryAllocation) return "out of GPU memory: train.recompute=full or a smaller train.micro_batch_size";
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) return "no usable GPU: use device \"cpu\"";
    return "a CUDA failure: rerun with CUDA_LAUNCH_BLOCKING=1 to find the failing kernel";
}

#define CUDA_CHECK(call)                                                                              \
    do {                                                                                              \
        cudaError_t e_ = (call);                                                                      \
        if (e_ != cudaSuccess) mosft_die(__FILE__, __LINE__, cuda_hint(e_), "%s: %s", #call, cudaGetErrorString(e_)); \
    } while (0)
#define CUDA_LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())
#define CUBLAS_CHECK(call)                                                                            \
    do {                                                                                              \
        cublasStatus_t s_ = (call);                                                                   \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                              \
            mosft_die(__FILE__, __LINE__, "cuBLAS refused a matrix product: check the shapes",       \
                      "%s: cuBLAS status %d", #call, (int)s_);                                       \
    } while (0)

#define GEMM_CACHE_MAX 512
#define GEMM_TUNE_CANDIDATES 8

typedef struct {
    int ta, tb, cd, batch, same_cd;
    int64_t M, N, K, lda, ldb, ldd, sa, sb, sd;
    int align;  // min alignment (bytes) of the pointers, capped at 256
    int beta_zero;
    int32_t sms;  // the multiprocessor target (0: all)
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;    // the one that runs: cands[0], or the fastest bit-identical one once tuned
    cublasLtMatmulAlgo_t cands[GEMM_TUNE_CANDIDATES];  // the heuristic's candidates, its first choice first
    int n_cands;
    int uses;                     // runs so far (a plan is timed at its second run: it recurs)
    int tuned;                    // chosen by measurement (or found not worth it): see gemm_tune in context.cu
} gemm_plan;

struct cuda_ctx {
    cudaStream_t stream;
    cublasLtHandle_t lt;
    void *workspace;
    size_t workspace_bytes;
    gemm_plan plans[GEMM_CACHE_MAX];
    int n_plans;
    int gemm_sms;  // > 0: large products target this many multiprocessors (cuda_ctx_set_gemm_sms)
    int sm_count;  // the device's multiprocessors (for kernels that size their grid to one wave)
    int cc_major;  // compute capability (9: Hopper, whose warpgroup products cuda/wgmma.cuh uses)
    float *host_scratch;  // pinned, for small downloads
    size_t host_scratch_bytes;
};

static inline int ceil_div_i(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

// ---- programmatic dependent launch (Hopper) --------------------------------------------------------
// A kernel launched by launch_pdl may be scheduled before the kernel ahead of it on its stream has
// finished: as soon as that kernel's blocks have all exited (or, for a kernel that signals it, such as
// cuBLASLt's, earlier), not after its writes are flushed and the launch is processed. So every thread of
// such a kernel calls pdl_wait() first, before it reads or writes global memory: it returns once the
// kernel ahead has finished and its writes are visible (at once after a plain launch). Our kernels do not
// signal early themselves: blocks that wait on a multiprocessor take it from the weight and side streams,
// and that made a 3B step ~1 ms slower (docs/BENCHMARKS.md, twenty-third session). MOSFT_PDL=0 launches
// plainly, with the same results. The kernel emulator checks that every thread of such a kernel waits.
int cuda_pdl_enabled(void);  // context.cu: MOSFT_PDL (default 1) on a device of compute capability >= 9
#ifndef MOSFT_CUDA_EMU_H
__device__ __forceinline__ void pdl_wait(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// kernel<<<grid, block, smem, stream>>>(args...), with the launch attribute that allows the overlap. As with
// <<<>>>, a failed launch is left to the caller's CUDA_LAUNCH_CHECK(), which names the call site.
template <class... P, class... A>
static inline void launch_pdl(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                              A &&...args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = cuda_pdl_enabled() ? 1 : 0;
    (void)cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}
#endif

// N consecutive bf16 (N = 4: 8-byte aligned, N = 8: 16-byte aligned) to and from fp32, in one vector
// access.
template <int N>
struct bf16_vec {
    typedef typename std::conditional<N == 8, uint4, uint2>::type type;
    static_assert(N == 4 || N == 8, "4 or 8 bf16");
};
template <int N>
__device__ __forceinline__ void load_bf16(const bf16 *p, float *f) {
    typename bf16_vec<N>::type u = *(const typename bf16_vec<N>::type *)p;
    const bf16 *h = (const bf16 *)&u;
#pragma unroll
    for (int k = 0; k < N; k++) f[k] = __bfloat162float(h[k]);
}
template <int N>
__device__ __forceinline__ void store_bf16(bf16 *p, const float *f) {
    __align__(2 * N) bf16 h[N];
#pragma unroll
    for (int k = 0; k < N; k++) h[k] = __float2bfloat16_rn(f[k]);
    *(typename bf16_vec<N>::type *)p = *(const typename bf16_vec<N>::type *)h;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Block-wide sum / max for blockDim.x a multiple of 32 (<= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v) {
    __shared__ float shm[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shm[w] = v;
    __syncthreads();
    v = lane < nw ? shm[lane] : -INFINITY;
    return warp_max(v);
}

#endif
