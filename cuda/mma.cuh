// mma.cuh: the tensor-core primitives the hand-written kernels share (flash attention, the adapter's
// masked low-rank input gradient): mma.sync m16n8k16 (bf16 in, fp32 accumulate), ldmatrix, bf16 pairs,
// cp.async copies into shared memory (sm_80+), and the one-instruction exp2 of the attention and loss
// kernels (ex2_ftz) and reciprocal of the SwiGLU kernels' sigmoid (rcp_ftz).
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16 row-major: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 "col": b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C 16x8: c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
#ifndef MOSFT_MMA_CUH
#define MOSFT_MMA_CUH

#include "cuda/cuda_util.cuh"

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&v;
}
__device__ __forceinline__ uint32_t ld32(const bf16 *p) { return *(const uint32_t *)p; }
#define LOG2E_F 1.4426950408889634f  // log2(e): exp(x) = ex2_ftz(x LOG2E_F)

#ifdef MOSFT_CUDA_EMU
#include "tests/emu/mma_emu.h"  // the same primitives on the CPU kernel emulator (tests only)
#else
// 2^x in one MUFU.EX2 (ex2.approx, as exp2f, ~2 ulp), results below 2^-126 flushed to zero: exp2f adds
// four instructions around it for those (a compare, a scaling before and after), which the attention
// kernels' probabilities (32 or more a thread a step, bf16 products afterwards) do not need.
__device__ __forceinline__ float ex2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
// 1/x in one MUFU.RCP (rcp.approx, ~1 ulp), denormal inputs and results flushed to zero; __fdividef(1, x)
// (div.approx) adds instructions around it for the range that ftz flushes.
__device__ __forceinline__ float rcp_ftz(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ void mma16816(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}


// ldmatrix x4 from shared memory: lane L gives the address of row L % 8 of matrix L / 8 (8 contiguous
// bf16, 16-byte aligned). Plain: r[i] = (M_i[g][2t], M_i[g][2t+1]); .trans: r[i] = (M_i[2t][g], M_i[2t+1][g]).
__device__ __forceinline__ void ldsm4(uint32_t *r, const bf16 *p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm4t(uint32_t *r, const bf16 *p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// 16 bytes global -> shared; !ok fills zeros (src-size 0: nothing is read from g, whatever it points at).
__device__ __forceinline__ void cp_async16(void *sm, const void *g, bool ok) {
    unsigned s = (unsigned)__cvta_generic_to_shared(sm);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(g), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void *sm, const void *g, bool ok) {
    unsigned s = (unsigned)__cvta_generic_to_shared(sm);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(g), "r"(ok ? 4 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// Two-stage pipeline step over tiles 0 .. n-1: start the copy of tile j + 1 (load(j + 1) commits one
// group), then wait until tile j's group has landed (all groups on the last tile).
template <typename L>
__device__ __forceinline__ void stage_next(L &load, int j, int n) {
    if (j + 1 < n) {
        load(j + 1);
        cp_wait<1>();
    } else {
        cp_wait<0>();
    }
}

#endif
