// wgmma_emu.h: the warpgroup products of cuda/wgmma.cuh as the CPU emulator runs them (tests/emu/cuda_emu.h).
// cuda/wgmma.cuh includes this file instead of its inline PTX when built with MOSFT_CUDA_EMU. A product
// runs at once when issued (fences, commits and waits do nothing): each thread computes its own
// accumulator elements, reading B (and a shared-memory A) through the descriptor as PTX lays out the
// 128-byte swizzle: K-major element (mn, k) at start + (mn / 8) SBO + (mn % 8) 128 + 2 k, MN-major (k, mn)
// at start + (mn / 64) LBO + 2 (mn % 64) + (k / 8) SBO + (k % 8) 128, and then bits 4-6 of the byte
// address XOR bits 7-9. Addresses are offsets from the block's dynamic shared memory.
#ifndef MOSFT_WGMMA_EMU_H
#define MOSFT_WGMMA_EMU_H

#include "tests/emu/cuda_emu.h"
#include "tests/emu/mma_emu.h"

static inline uint32_t smem_u32(const void *p) { return (uint32_t)((const char *)p - (const char *)emu_dyn_smem()); }

static inline uint64_t wg_desc(const void *p, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((smem_u32(p) & 0x3FFFF) >> 4) | (uint64_t)(lbo >> 4) << 16 | (uint64_t)(sbo >> 4) << 32 | 1ull << 62;
}

static inline void fence_proxy_async() {}
template <int N>
static inline void wg_pin(float *d) {}
template <int N>
static inline void wg_pin(uint32_t *a) {}
static inline void wg_fence() {}
static inline void wg_commit() {}
template <int N>
static inline void wg_wait() {}
// The bulk copy runs when issued (its source is complete then: the writers met at a barrier before).
static inline void bulk_s2g(void *g, const void *s, uint32_t bytes) { memcpy(g, s, bytes); }
static inline void bulk_commit() {}
static inline void bulk_wait_read() {}


// Element (mn, k) of a descriptor's matrix as a float.
static inline float emu_wg_elem(uint64_t desc, int mn, int k, bool mn_major) {
    uint32_t start = (uint32_t)(desc & 0x3FFF) << 4, lbo = (uint32_t)((desc >> 16) & 0x3FFF) << 4,
             sbo = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
    if (desc >> 62 != 1) emu_die("wgmma descriptor: only the 128-byte swizzle is emulated");
    uint32_t off = mn_major ? start + (mn / 64) * lbo + 2 * (mn % 64) + (k / 8) * sbo + (k % 8) * 128
                            : start + (mn / 8) * sbo + (mn % 8) * 128 + 2 * k;
    off ^= ((off >> 7) & 7) << 4;
    uint16_t h;
    memcpy(&h, (const char *)emu_dyn_smem() + off, 2);
    return __uint_as_float((uint32_t)h << 16);
}

// This thread's accumulator element i of m64nN: (row, column).
static inline void emu_wg_rc(int i, int *row, int *col) {
    int lane = emu_lane(), warp = (int)(threadIdx.x / 32) % 4;
    *row = 16 * warp + lane / 4 + ((i % 4) >= 2 ? 8 : 0);
    *col = (i / 4) * 8 + 2 * (lane % 4) + (i % 2);
}

// d[N/2] (+)= A[64][16] B[16][N], both in shared memory (ta, tb: MN-major, read transposed).
static inline void emu_wgmma_ss(float *d, int N, uint64_t da, bool ta, uint64_t db, bool tb, int scale_d) {
    for (int i = 0; i < N / 2; i++) {
        int row, col;
        emu_wg_rc(i, &row, &col);
        float s = scale_d ? d[i] : 0.0f;
        for (int k = 0; k < 16; k++) s += emu_wg_elem(da, row, k, ta) * emu_wg_elem(db, col, k, tb);
        d[i] = s;
    }
}
static inline void wgmma_m64n64_ss(float *d, uint64_t da, uint64_t db, int scale_d) {
    emu_wgmma_ss(d, 64, da, false, db, false, scale_d);
}
template <int TA, int TB>
static inline void wgmma_m64n128_ss(float *d, uint64_t da, uint64_t db, int scale_d) {
    emu_wgmma_ss(d, 128, da, TA, db, TB, scale_d);
}

static inline void wgmma_m64n128_rs_t(float *d, const uint32_t *a, uint64_t db, int scale_d) {
    uint64_t mine[4] = {a[0] | (uint64_t)a[1] << 32, a[2] | (uint64_t)a[3] << 32, 0, 0};
    const uint64_t(*all)[4] = emu_warp_exchange(mine);
    for (int i = 0; i < 64; i++) {
        int row, col;
        emu_wg_rc(i, &row, &col);
        int r = row % 16;  // the row within the warp's A fragment
        float s = scale_d ? d[i] : 0.0f;
        for (int k = 0; k < 16; k++) {
            int areg = (r >= 8) + 2 * (k >= 8);
            uint64_t aw = all[(r % 8) * 4 + (k % 8) / 2][areg / 2];
            float av = emu_bf16_half((uint32_t)(aw >> (32 * (areg % 2))), k % 2);
            s += av * emu_wg_elem(db, col, k, true);
        }
        d[i] = s;
    }
}

#endif
