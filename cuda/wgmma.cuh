// wgmma.cuh: Hopper's warpgroup tensor-core products (wgmma.mma_async, sm_90a) for the hand-written
// kernels: a warpgroup (4 consecutive warps, 128 threads) multiplies a 64-row A by a B read straight from
// shared memory through a matrix descriptor, asynchronously; fp32 accumulators in registers.
//
// Shared tiles are bf16 [rows][64] chunks of 128-byte rows in the 128-byte swizzle: the 16-byte vector
// v of row r sits at vector v ^ (r % 8) of its row (sw128_off), chunks 1024-byte aligned. A [rows][128]
// matrix (a head of 128) is two such chunks, 64 columns each, `rows * 64` elements apart. One tile serves
// both ways a product can read it:
//   K-major (the product's k runs along the row, e.g. B = Q for S = K Q^T, k = d): wg_desc_kmajor;
//   MN-major (k runs down the rows, e.g. B = dO for dV = P^T dO, k = query, n = d): wg_desc_mnmajor,
//   read with the transpose bit.
// Accumulator layout of m64nNk16 (N/2 floats a thread; warp w = warp % 4 of the group, g = lane / 4,
// t = lane % 4): d[4j + e] is row 16w + g + 8 (e >= 2), column 8j + 2t + (e & 1): per warp exactly the
// mma.sync C fragments of cuda/mma.cuh side by side. An A operand from registers (wgmma_rs) is, per
// warp, the mma.sync A fragment of its 16 rows: two adjacent 8-column accumulator blocks are one.
//
// Order of use: cp.async the tiles, cp_wait, fence_proxy_async (the copies become visible to the
// tensor cores' async proxy), __syncthreads; wg_fence before the products when their accumulator or A
// registers were written since; wg_commit closes a group, wg_wait<N> waits until N groups are left.
#ifndef MOSFT_WGMMA_CUH
#define MOSFT_WGMMA_CUH

#include "cuda/cuda_util.cuh"

// Element offset of (r, c) in a swizzled [rows][64] chunk (c < 64).
__host__ __device__ __forceinline__ int sw128_off(int r, int c) { return r * 64 + (((c >> 3) ^ (r & 7)) << 3) + (c & 7); }

#ifdef MOSFT_CUDA_EMU
#include "tests/emu/wgmma_emu.h"  // the same primitives on the CPU kernel emulator (tests only)
#else
__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

// Descriptor: start address, leading and stride byte offsets (all >> 4), swizzle 128 B (1 << 62).
__device__ __forceinline__ uint64_t wg_desc(const void *p, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((smem_u32(p) & 0x3FFFF) >> 4) | (uint64_t)(lbo >> 4) << 16 | (uint64_t)(sbo >> 4) << 32 | 1ull << 62;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)
#define WG_OK 1
#else
#define WG_OK 0  // compiled for a device without wgmma: never launched there (flash_attention_wgmma)
#endif
#if WG_OK
#define WG_ASM(ins) asm volatile(ins ::: "memory")  // an operand-free instruction
#else
#define WG_ASM(ins)
#endif

__device__ __forceinline__ void fence_proxy_async() { WG_ASM("fence.proxy.async.shared::cta;\n"); }
__device__ __forceinline__ void wg_fence() { WG_ASM("wgmma.fence.sync.aligned;\n"); }
__device__ __forceinline__ void wg_commit() { WG_ASM("wgmma.commit_group.sync.aligned;\n"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
#if WG_OK
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Pins accumulator registers in place around the asynchronous products (no copies of them the products
// would not see: the compiler would then wait for the products where it copies). Not enough at a loop's
// exit: with products still in flight there, ptxas (CUDA 13.0) scheduled the epilogue's reads of the
// accumulators above the final wg_wait<0> (wrong bits, no warning; tests/gpu/bench_nf4_gemm.cu's rs2
// kernel). Let the last iteration wait for its own products inside the loop body, or peel it.
template <int N>
__device__ __forceinline__ void wg_pin(float *d) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for A operands in registers that a running product still reads.
template <int N>
__device__ __forceinline__ void wg_pin(uint32_t *a) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(a[i])::"memory");
}

// A bulk copy (the async proxy) of `bytes` (a multiple of 16; both addresses 16-byte aligned) from shared
// to global memory, issued by one thread. The threads that wrote the source fence_proxy_async() and meet
// at a barrier first; the issuer bulk_commit()s and, before the source is written again (and before the
// block ends), bulk_wait_read() lets it go once the copy has read it.
__device__ __forceinline__ void bulk_s2g(void *g, const void *s, uint32_t bytes) {
#if WG_OK
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(g), "r"(smem_u32(s)), "r"(bytes)
                 : "memory");
#endif
}
__device__ __forceinline__ void bulk_commit() { WG_ASM("cp.async.bulk.commit_group;\n"); }
__device__ __forceinline__ void bulk_wait_read() { WG_ASM("cp.async.bulk.wait_group.read 0;\n"); }

#define WG_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])

// d[32] (+)= A[64][16] B[16][64], both K-major in shared memory (scale_d = 0: d = A B).
__device__ __forceinline__ void wgmma_m64n64_ss(float *d, uint64_t da, uint64_t db, int scale_d) {
#if WG_OK
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : WG_ACC8(0), WG_ACC8(8), WG_ACC8(16), WG_ACC8(24)
        : "l"(da), "l"(db), "r"(scale_d));
#else
    __trap();
#endif
}

// d[64] (+)= A[64][16] B[16][128]: A from registers (a[4], the mma.sync A fragment of the warp's 16 rows),
// B MN-major in shared memory (transposed read).
__device__ __forceinline__ void wgmma_m64n128_rs_t(float *d, const uint32_t *a, uint64_t db, int scale_d) {
#if WG_OK
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : WG_ACC8(0), WG_ACC8(8), WG_ACC8(16), WG_ACC8(24), WG_ACC8(32), WG_ACC8(40), WG_ACC8(48), WG_ACC8(56)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
#else
    __trap();
#endif
}
// d[64] (+)= A[64][16] B[16][128], both in shared memory; TA, TB: MN-major, read transposed (1), or
// K-major (0).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n128_ss(float *d, uint64_t da, uint64_t db, int scale_d) {
#if WG_OK
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : WG_ACC8(0), WG_ACC8(8), WG_ACC8(16), WG_ACC8(24), WG_ACC8(32), WG_ACC8(40), WG_ACC8(48), WG_ACC8(56)
        : "l"(da), "l"(db), "r"(scale_d), "n"(TA), "n"(TB));
#else
    __trap();
#endif
}
#undef WG_ACC8
#endif

// The swizzle repeats every 1024 bytes of the shared address: tiles start at such a boundary. A kernel
// asks for WG_SMEM_ALIGN bytes of dynamic shared memory more and starts its tiles at smem_align1024.
#define WG_SMEM_ALIGN 1024
__device__ __forceinline__ unsigned char *smem_align1024(unsigned char *p) {
    return p + ((WG_SMEM_ALIGN - (smem_u32(p) & (WG_SMEM_ALIGN - 1))) & (WG_SMEM_ALIGN - 1));
}

// Descriptors of a [rows][128] tile X of two swizzled chunks (X 1024-byte aligned, rows % 8 == 0). The
// k-chunk's start is added to the tile's descriptor in the start field's own unit (16 bytes; shared
// addresses stay below 2^18, so nothing carries out of the field): one add a product, where encoding each
// address anew took ~10 instructions (SASS of the dK/dV kernel).
// K-major, k columns 16 kk .. 16 kk + 15 (8 rows of 128 bytes a stride);
__device__ __forceinline__ uint64_t wg_desc_kmajor(const bf16 *X, int rows, int kk) {
    return wg_desc(X, 16, 1024) + (uint32_t)(((kk >> 2) * rows * 64 + (kk & 3) * 16) * 2 / 16);
}
// MN-major, k rows 16 kc .. 16 kc + 15, n the 128 columns (the second chunk `rows * 128` bytes on).
__device__ __forceinline__ uint64_t wg_desc_mnmajor(const bf16 *X, int rows, int kc) {
    return wg_desc(X, (uint32_t)rows * 128, 1024) + (uint32_t)(kc * 16 * 64 * 2 / 16);
}

#endif
