// cuda_emu.h: runs the CUDA kernels of cuda/ on the CPU, so that their logic (indexing, masks, tensor-core
// fragment layouts, shared-memory staging, barriers) is tested on machines without a GPU (CI). It is
// force-included (-include) into each cuda/*.cu after tests/emu/emu_cu.py has rewritten its launches
// (`k<<<grid, block, smem, stream>>>(args)` -> `emu_launch(k, emu_cfg(grid, block, smem, stream), args)`)
// and its dynamic shared memory (`extern __shared__ T name[]` -> `T *name = (T *)emu_dyn_smem()`).
//
// The model: a block runs as blockDim cooperative fibers on one CPU thread (blocks of a grid spread over
// OpenMP threads). A fiber runs until it waits: at __syncthreads (all live threads of the block) or at a
// warp collective (shuffles, ldmatrix, mma.sync: the live lanes of its warp), so a thread that reads shared
// memory another thread has not written yet, because a barrier is missing, reads stale or poisoned bytes
// and the test comparing with the CPU twin fails. cp.async copies are deferred to the cp.async.wait_group
// that covers them (a read before the wait sees the old bytes). Dynamic shared memory is poisoned with
// 0xff (NaN) at each block start and is limited to 48 KiB unless cudaFuncSetAttribute raised it.
//
// What it does not show: speed, the memory model between streams (launches run at once, in order),
// accumulation order inside mma.sync (fp32 sums here, error well inside the tests' tolerances), and
// out-of-bounds global accesses (use compute-sanitizer on the GPU). cuBLASLt and the runtime API are
// replaced by plain CPU code in tests/emu/cuda_emu.cpp.
#ifndef MOSFT_CUDA_EMU_H
#define MOSFT_CUDA_EMU_H

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <tuple>
#include <utility>

// ---- keywords ------------------------------------------------------------------------------------
#undef __shared__
#define __shared__ static thread_local  // one block runs at a time on each CPU thread
#define __launch_bounds__(...)

// ---- fibers: the threads of one block -----------------------------------------------------------
struct emu_thread;
extern thread_local const uint3 *emu_cur_tid;  // the running fiber's threadIdx
extern thread_local uint3 emu_block_idx;
extern thread_local dim3 emu_block_dim, emu_grid_dim;
#define threadIdx (*emu_cur_tid)
#define blockIdx (emu_block_idx)
#define blockDim (emu_block_dim)
#define gridDim (emu_grid_dim)

void emu_syncthreads(void);
int emu_syncthreads_and(int pred);
void emu_syncwarp(void);
// Exchanges 32 bytes per lane across the running fiber's warp: writes `mine`, waits for the warp, returns
// every lane's (lane-indexed; valid until the lane's next warp collective).
const uint64_t (*emu_warp_exchange(const uint64_t mine[4]))[4];
void *emu_dyn_smem(void);
void emu_die(const char *fmt, ...);  // the message on stderr, then abort
int emu_lane(void);

// the grid runner (tests/emu/cuda_emu.cpp)
struct emu_cfg {
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    const char *name;  // the kernel, as the launch wrote it (for the emulator's messages)
    emu_cfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = 0) : grid(g), block(b), smem(s), stream(st), name("?") {}
    emu_cfg &named(const char *n) { name = n; return *this; }
};
void emu_run_grid(const void *kernel, const emu_cfg &cfg, const std::function<void()> &body);

template <class... P, class... A>
void emu_launch(void (*kernel)(P...), const emu_cfg &cfg, A &&...args) {
    std::tuple<typename std::decay<P>::type...> params(std::forward<A>(args)...);  // converted as by a call
    emu_run_grid((const void *)kernel, cfg, [&] { std::apply(kernel, params); });
}

// Programmatic dependent launch (cuda/cuda_util.cuh): launches run in order here, so launch_pdl is a
// plain launch, named by its call site for the emulator's messages, that also checks that every thread
// of the grid called pdl_wait().
extern std::atomic<long> emu_pdl_waits;
static inline void pdl_wait(void) { emu_pdl_waits++; }
const char *emu_site_name(const char *file, int line);  // "file:line", kept for the program's life
template <class... P, class... A>
void emu_launch_pdl(const char *file, int line, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                    cudaStream_t stream, A &&...args) {
    long before = emu_pdl_waits;
    emu_launch(kernel, emu_cfg(grid, block, smem, stream).named(emu_site_name(file, line)), std::forward<A>(args)...);
    long threads = (long)grid.x * grid.y * grid.z * block.x * block.y * block.z;
    if (emu_pdl_waits - before != threads && cudaPeekAtLastError() == cudaSuccess)
        emu_die("%s:%d: a kernel launched by launch_pdl: %ld of its %ld threads called pdl_wait() (every thread "
                "must, first)", file, line, emu_pdl_waits - before, threads);
}
#define launch_pdl(...) emu_launch_pdl(__FILE__, __LINE__, __VA_ARGS__)

template <class T>
static inline cudaError_t cudaFuncSetAttribute(T *kernel, enum cudaFuncAttribute a, int v) {
    return cudaFuncSetAttribute((const void *)kernel, a, v);
}
template <class T>
static inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *n, T *kernel, int threads, size_t smem) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, (const void *)kernel, threads, smem);
}

// ---- device intrinsics --------------------------------------------------------------------------
#define __syncthreads() emu_syncthreads()
#define __syncthreads_and(p) emu_syncthreads_and(p)
#define __syncwarp(...) emu_syncwarp()

template <class T>
static inline T emu_shfl(T v, int src_of_lane_xor, int mode) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    uint64_t mine[4] = {0, 0, 0, 0};
    memcpy(mine, &v, sizeof v);
    const uint64_t(*all)[4] = emu_warp_exchange(mine);
    int lane = emu_lane();
    int src = mode == 0 ? (lane ^ src_of_lane_xor) : src_of_lane_xor;  // xor / absolute lane
    T r;
    memcpy(&r, all[src & 31], sizeof r);
    return r;
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu_shfl(v, lane_mask, 0);
}
template <class T>
static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu_shfl(v, src, 1);
}

template <class T>
static inline T __ldg(const T *p) { return *p; }
static inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fdividef(float a, float b) { return a / b; }
#define __expf(a) expf(a)  // the device's is ex2.approx (a few ulp); glibc declares its own __expf
static inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
static inline float __saturatef(float a) { return a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }
static inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
static inline int __float_as_int(float v) { int i; memcpy(&i, &v, 4); return i; }
static inline float __uint_as_float(unsigned v) { float f; memcpy(&f, &v, 4); return f; }
static inline unsigned __float_as_uint(float v) { unsigned i; memcpy(&i, &v, 4); return i; }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static inline int __clz(int v) { return v ? __builtin_clz((unsigned)v) : 32; }
static inline float cospif(float a) { return (float)cos(3.14159265358979323846 * (double)a); }
static inline float sinpif(float a) { return (float)sin(3.14159265358979323846 * (double)a); }
using std::max;
using std::min;

#endif
