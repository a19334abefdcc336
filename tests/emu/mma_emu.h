// mma_emu.h: the PTX primitives of cuda/mma.cuh as the CPU emulator runs them (tests/emu/cuda_emu.h).
// cuda/mma.cuh includes this file instead of its inline PTX when built with MOSFT_CUDA_EMU. Each
// collective exchanges the lanes' operands through the warp and computes what PTX specifies for the
// lane: mma.sync.m16n8k16 row.col bf16 -> fp32 with the fragment layouts written at the top of mma.cuh,
// ldmatrix.x4 (plain and .trans), cp.async deferred to its wait_group, ex2.approx.ftz (exp2f, flushed) and
// rcp.approx.ftz (1 / x, flushed).
#ifndef MOSFT_MMA_EMU_H
#define MOSFT_MMA_EMU_H

#include "tests/emu/cuda_emu.h"

void emu_cp_async(void *dst, const void *src, int bytes, bool ok);
void emu_cp_commit(void);
void emu_cp_wait(int newest_left);
void emu_check_aligned(const void *p, int bytes, const char *what);

static inline float emu_bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
static inline float emu_bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }
static inline float emu_bf16_half(uint32_t v, int k) { return k ? emu_bf16_hi(v) : emu_bf16_lo(v); }

// ex2.approx.ftz: exp2f, results below 2^-126 flushed to zero.
static inline float ex2_ftz(float x) {
    float y = exp2f(x);
    return y < 1.17549435e-38f ? 0.0f : y;
}
// rcp.approx.ftz: 1/x, denormal inputs and results flushed to zero (an input flushed gives +-inf).
static inline float rcp_ftz(float x) {
    if (fabsf(x) < 1.17549435e-38f) x = copysignf(0.0f, x);
    float y = 1.0f / x;
    return fabsf(y) < 1.17549435e-38f ? copysignf(0.0f, y) : y;
}

// c[4] += A[16][16] B[16][8] over the warp (g = lane / 4, t = lane % 4):
//   A: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); B: b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g);
//   C: c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1).
static inline void mma16816(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    uint64_t mine[4] = {a[0] | (uint64_t)a[1] << 32, a[2] | (uint64_t)a[3] << 32, b0 | (uint64_t)b1 << 32, 0};
    const uint64_t(*all)[4] = emu_warp_exchange(mine);
    int lane = emu_lane(), g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; j++) {
        int row = g + (j >= 2 ? 8 : 0), col = 2 * t + (j & 1);
        float s = c[j];
        for (int k = 0; k < 16; k++) {
            // A's element (row, k): lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8)
            int areg = (row >= 8) + 2 * (k >= 8);
            uint64_t aw = all[(row % 8) * 4 + (k % 8) / 2][areg / 2];
            float av = emu_bf16_half((uint32_t)(aw >> (32 * (areg % 2))), k % 2);
            // B's element (k, col): lane col * 4 + (k % 8) / 2, register b0 (k < 8) or b1
            uint64_t bw = all[col * 4 + (k % 8) / 2][2];
            float bv = emu_bf16_half((uint32_t)(bw >> (k >= 8 ? 32 : 0)), k % 2);
            s += av * bv;
        }
        c[j] = s;
    }
}

static inline uint32_t emu_bf16_bits(const void *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return h;
}

// ldmatrix x4: lane L gives the address of row L % 8 of matrix L / 8 (8 bf16, 16-byte aligned).
// Plain: r[i] = (M_i[g][2t], M_i[g][2t+1]); .trans: r[i] = (M_i[2t][g], M_i[2t+1][g]).
static inline void emu_ldsm4(uint32_t *r, const void *p, bool trans) {
    emu_check_aligned(p, 16, "ldmatrix row address");
    uint64_t mine[4] = {(uint64_t)(uintptr_t)p, 0, 0, 0};
    const uint64_t(*all)[4] = emu_warp_exchange(mine);
    int lane = emu_lane(), g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; i++) {
        const uint16_t *lo, *hi;
        if (!trans) {
            const uint16_t *row = (const uint16_t *)(uintptr_t)all[8 * i + g][0];
            lo = row + 2 * t;
            hi = row + 2 * t + 1;
        } else {
            lo = (const uint16_t *)(uintptr_t)all[8 * i + 2 * t][0] + g;
            hi = (const uint16_t *)(uintptr_t)all[8 * i + 2 * t + 1][0] + g;
        }
        r[i] = emu_bf16_bits(lo) | emu_bf16_bits(hi) << 16;
    }
}
static inline void ldsm4(uint32_t *r, const bf16 *p) { emu_ldsm4(r, p, false); }
static inline void ldsm4t(uint32_t *r, const bf16 *p) { emu_ldsm4(r, p, true); }

static inline void cp_async16(void *sm, const void *g, bool ok) { emu_cp_async(sm, g, 16, ok); }
static inline void cp_async4(void *sm, const void *g, bool ok) { emu_cp_async(sm, g, 4, ok); }
static inline void cp_commit() { emu_cp_commit(); }
template <int N>
static inline void cp_wait() { emu_cp_wait(N); }

#endif
