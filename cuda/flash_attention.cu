// flash_attention.cu: causal GQA attention with key padding in the FlashAttention-2 manner: tiles of
// queries and keys in shared memory, scores and probabilities only in registers (bf16 tensor-core
// mma.sync m16n8k16 with fp32 accumulation, online softmax), so nothing of size S x S ever reaches
// device memory. Forward: same contract as attention_forward_cuda (the batched-GEMM version in
// attention.cu, kept for head sizes these kernels do not cover): q, k, v read token-major where the
// q|k|v projection left them (row stride ldqkv; q and k rotated in place before, rope_qk_cuda); the
// output token-major; lse per row (+inf for a row without any key).
//
// Backward is three kernels so that every gradient element has one writer (no atomics, deterministic):
//   delta = rowsum(dO * O), one pass;
//   dK, dV: a block per (sequence, kv head, 64 keys), looping over the group's query heads and the
//       query tiles at or after its keys; it recomputes P = exp(S - lse) and keeps dS = P (dP - delta)
//       (bf16, what the tensor cores take anyway) in a scratch of 64 x 64 tiles of the causal triangle;
//   dQ = dS K: a block per (sequence, query head, 128 queries), looping over the key tiles at or
//       before them; it reads the dS tiles instead of computing S and dP again (5 matrix products in
//       all instead of 7).
// They read dO token-major where the o_proj backward left it, and write the gradient of the fused
// q|k|v projection directly: bf16, token-major, with RoPE's inverse rotation applied in registers (what
// rope_merge_backward_cuda does after the GEMM path).
//
// The tiles the inner loops walk over stream into shared memory with cp.async in two stages: the
// copy of tile j + 1 is in flight while tile j is computed on.
//
// Fragment layouts: cuda/mma.cuh. Two adjacent C tiles (16 columns) are exactly an A fragment, which is
// how P feeds P V (FA-2).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda_util.cuh"
#include "cuda/mma.cuh"
#include "cuda/wgmma.cuh"

#define FA_TILE 64  // queries per block (forward)
#define FA_BN 64    // keys per step (forward)

// B fragments of X^T for two adjacent n-tiles (rows n0 .. n0+15 of a shared [rows][D+8] tile X, the
// k-chunk of 16 columns at c0): b[0], b[1] for rows n0..n0+7 and b[2], b[3] for rows n0+8..n0+15.
// (B[k][n] = X[n][k]: scores Q K^T take K this way.)
template <int D>
__device__ __forceinline__ void frag_bt(uint32_t *b, const bf16 *X, int n0, int c0) {
    int L = threadIdx.x & 31, i = L >> 3;
    ldsm4(b, X + (n0 + (i >> 1) * 8 + (L & 7)) * (D + 8) + c0 + (i & 1) * 8);
}
// B fragments of X for two adjacent n-tiles (columns d0 .. d0+15) over the k-chunk of 16 rows at k0:
// b[0], b[1] for columns d0..d0+7, b[2], b[3] for d0+8..d0+15. (B[k][n] = X[k][n]: P V takes V this way.)
template <int D>
__device__ __forceinline__ void frag_b(uint32_t *b, const bf16 *X, int k0, int d0) {
    int L = threadIdx.x & 31, i = L >> 3;
    ldsm4t(b, X + (k0 + (i & 1) * 8 + (L & 7)) * (D + 8) + d0 + (i >> 1) * 8);
}

// Rows [r0, r0 + n) of a matrix with row stride ld into shared [n][D + 8], zeros past row S; all threads
// take part. One commit group is the caller's business.
template <int D>
__device__ __forceinline__ void tile_async(bf16 *sh, const bf16 *src, int64_t ld, int r0, int n, int S) {
    constexpr int V = D / 8;  // 16-byte vectors per row
    for (int i = threadIdx.x; i < n * V; i += blockDim.x) {
        int r = i / V, c = (i % V) * 8;
        bool ok = r0 + r < S;
        cp_async16(sh + r * (D + 8) + c, ok ? src + (int64_t)(r0 + r) * ld + c : src, ok);
    }
}
// n floats / ints from src[r0 ..] into shared, zeros past S.
__device__ __forceinline__ void vec_async(void *sh, const void *src, int r0, int n, int S) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        bool ok = r0 + i < S;
        cp_async4((char *)sh + 4 * i, ok ? (const char *)src + 4 * (int64_t)(r0 + i) : (const char *)src, ok);
    }
}

// The A fragment of rows r0 .. r0+15, columns c0 .. c0+15 of a shared [rows][D + 8] tile.
template <int D>
__device__ __forceinline__ void frag_a(uint32_t *a, const bf16 *X, int r0, int c0) {
    int L = threadIdx.x & 31;
    ldsm4(a, X + (r0 + (L & 15)) * (D + 8) + c0 + (L >> 4) * 8);
}

// Rotary embedding backward on accumulator fragments: a thread holds columns c and c + D/2 of its rows
// in fragments dn and dn + D/16, so the inverse rotation needs no exchange. x[D/8][4] (scaled by `sc`)
// of rows (row_lo, row_hi) at positions (pos_lo, pos_hi) -> bf16 into dst_lo / dst_hi (nullptr: skip).
// rotate = 0 (v) writes the values as they are.
template <int D>
__device__ __forceinline__ void store_rows_unrope(bf16 *dst_lo, bf16 *dst_hi, const float (*x)[4], float sc,
                                                  const float2 *__restrict__ cs, int pos_lo, int pos_hi, int rotate) {
    int t = threadIdx.x & 3;
    constexpr int H = D / 2;
    if (!rotate) {
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) {
            int c = dn * 8 + 2 * t;
            if (dst_lo) *(uint32_t *)(dst_lo + c) = pack_bf16(x[dn][0] * sc, x[dn][1] * sc);
            if (dst_hi) *(uint32_t *)(dst_hi + c) = pack_bf16(x[dn][2] * sc, x[dn][3] * sc);
        }
        return;
    }
#pragma unroll
    for (int dn = 0; dn < D / 16; dn++) {
        int i = dn * 8 + 2 * t;  // this thread's columns i, i + 1 and their partners i + H, i + 1 + H
#pragma unroll
        for (int hl = 0; hl < 2; hl++) {
            bf16 *dst = hl ? dst_hi : dst_lo;
            if (!dst) continue;
            int pos = hl ? pos_hi : pos_lo;
            float4 c2 = *(const float4 *)(cs + (int64_t)pos * H + i);  // (cos, sin) of i and i + 1
            float a0 = x[dn][2 * hl] * sc, a1 = x[dn][2 * hl + 1] * sc;
            float b0 = x[dn + D / 16][2 * hl] * sc, b1 = x[dn + D / 16][2 * hl + 1] * sc;
            *(uint32_t *)(dst + i) = pack_bf16(a0 * c2.x + b0 * c2.y, a1 * c2.z + b1 * c2.w);
            *(uint32_t *)(dst + i + H) = pack_bf16(b0 * c2.x - a0 * c2.y, b1 * c2.z - a1 * c2.w);
        }
    }
}

// One key tile of the online softmax (FA-2, in the log2 domain) for a thread's two rows r_lo, r_hi, on
// accumulator fragments s[FA_BN / 8][4] (element e of n: key k0 + 8 n + 2 t + (e & 1), row e < 2 ? r_lo :
// r_hi): masks to -inf the padding keys and keys past S (mask entry Mt 0; `full`: the tile has none) and,
// on the tile that reaches the block's first query (`diag`), the keys after the row; updates the rows'
// maxima m (taken on the raw scores: scale > 0) and sums l, leaves P = exp2(s sl2 - m sl2) in s (one exp2
// of an FMA a probability) and returns in al_lo, al_hi the factors by which o must be rescaled before this
// tile's P V is added (softmax_tile applies them; the pipelined warpgroup forward once the previous tile's
// P V, still running when this is computed, has landed).
__device__ __forceinline__ void softmax_p(float (*s)[4], float &m_lo, float &m_hi, float &l_lo, float &l_hi, float &al_lo,
                                          float &al_hi, const int *Mt, bool full, bool diag, int k0, int r_lo, int r_hi,
                                          float sl2) {
    int t = threadIdx.x & 3;
    if (!full || diag) {
#pragma unroll
        for (int n = 0; n < FA_BN / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int kl = n * 8 + 2 * t + (e & 1), row = e < 2 ? r_lo : r_hi;
                if (!(Mt[kl] != 0 && (!diag || k0 + kl <= row))) s[n][e] = -INFINITY;
            }
    }
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int n = 0; n < FA_BN / 8; n++) {
        mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
        mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
    }
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
    float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
    // a row with no allowed key so far keeps m = -inf: with 0 in its place every exp2 is of -inf
    // (p = 0) and the rescale of its zero sums is exp2(-inf) = 0
    float ms_lo = mn_lo == -INFINITY ? 0.0f : mn_lo * sl2, ms_hi = mn_hi == -INFINITY ? 0.0f : mn_hi * sl2;
    al_lo = ex2_ftz(fmaf(m_lo, sl2, -ms_lo));
    al_hi = ex2_ftz(fmaf(m_hi, sl2, -ms_hi));
    m_lo = mn_lo;
    m_hi = mn_hi;
    l_lo *= al_lo;
    l_hi *= al_hi;
#pragma unroll
    for (int n = 0; n < FA_BN / 8; n++) {
        s[n][0] = ex2_ftz(fmaf(s[n][0], sl2, -ms_lo));
        s[n][1] = ex2_ftz(fmaf(s[n][1], sl2, -ms_lo));
        s[n][2] = ex2_ftz(fmaf(s[n][2], sl2, -ms_hi));
        s[n][3] = ex2_ftz(fmaf(s[n][3], sl2, -ms_hi));
        l_lo += s[n][0] + s[n][1];
        l_hi += s[n][2] + s[n][3];
    }
}
// o[D / 8][4] (rows r_lo, r_hi of a thread's accumulator fragments) *= al_lo, al_hi.
template <int D>
__device__ __forceinline__ void rescale_o(float (*o)[4], float al_lo, float al_hi) {
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        o[i][0] *= al_lo;
        o[i][1] *= al_lo;
        o[i][2] *= al_hi;
        o[i][3] *= al_hi;
    }
}
// softmax_p, then o rescaled at once.
template <int D>
__device__ __forceinline__ void softmax_tile(float (*s)[4], float (*o)[4], float &m_lo, float &m_hi, float &l_lo, float &l_hi,
                                             const int *Mt, bool full, bool diag, int k0, int r_lo, int r_hi, float sl2) {
    float al_lo, al_hi;
    softmax_p(s, m_lo, m_hi, l_lo, l_hi, al_lo, al_hi, Mt, full, diag, k0, r_lo, r_hi, sl2);
    rescale_o<D>(o, al_lo, al_hi);
}

// The forward's end for a thread's rows r_lo, r_hi: the row sums over the quad, O / l as bf16 into the
// rows dst_lo, dst_hi (head h's D columns of out, or a staged tile; nullptr: past S), and lse = m scale +
// log l into L (the head's lse row; +inf for a row without keys).
template <int D>
__device__ __forceinline__ void store_out_rows(bf16 *dst_lo, bf16 *dst_hi, float *L, const float (*o)[4], float m_lo,
                                               float m_hi, float l_lo, float l_hi, int S, int r_lo, int r_hi, float scale) {
    int t = threadIdx.x & 3;
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f, inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) {
        int c = dn * 8 + 2 * t;
        if (dst_lo) *(uint32_t *)(dst_lo + c) = pack_bf16(o[dn][0] * inv_lo, o[dn][1] * inv_lo);
        if (dst_hi) *(uint32_t *)(dst_hi + c) = pack_bf16(o[dn][2] * inv_hi, o[dn][3] * inv_hi);
    }
    if (t == 0) {
        if (r_lo < S) L[r_lo] = l_lo > 0.0f ? m_lo * scale + logf(l_lo) : INFINITY;
        if (r_hi < S) L[r_hi] = l_hi > 0.0f ? m_hi * scale + logf(l_hi) : INFINITY;
    }
}

// Results leave the kernels through shared memory: a thread's accumulator rows go into a staged
// [rows][D + 8] bf16 tile (a warp's 32-bit writes, 8 rows x 4 columns, hit distinct banks), then whole rows
// go out with 16-byte stores. Scattered 32-bit stores straight from the accumulators took 20-45 % of those
// kernels (ncu, H100, a 7B layer without them: forward 167 -> 132 us, dK/dV 349 -> 274, dQ 133 -> 75).
// Row r of a staged tile, or nullptr for a row past S (not staged: the row writers skip it, and the
// RoPE epilogue must not read cos/sin past S).
template <int D>
__device__ __forceinline__ bf16 *staged_row(bf16 *sh, int r, bool live) {
    return live ? sh + r * (D + 8) : nullptr;
}
// Rows r < ROWS of the staged tile (after a barrier) to dst + (r0 + r) ld, those at or past S skipped; dst
// and ld 16-byte aligned, NT threads.
template <int D, int ROWS = 64, int NT = 128>
__device__ __forceinline__ void staged_rows_out(bf16 *dst, int64_t ld, const bf16 *sh, int r0, int S) {
    constexpr int V = D / 8;  // 16-byte vectors a row
    static_assert(ROWS * V % NT == 0, "whole rounds of 16-byte stores");
#pragma unroll
    for (int j = 0; j < ROWS * V / NT; j++) {
        int i = threadIdx.x + NT * j, r = i / V, c = (i % V) * 8;
        if (r0 + r < S) *(uint4 *)(dst + (int64_t)(r0 + r) * ld + c) = *(const uint4 *)(sh + r * (D + 8) + c);
    }
}

// ---- forward ---------------------------------------------------------------------------------------

// grid (ceil(S/64), B*Hq), 128 threads: warp w owns queries q0 + 16w .. +16; key tiles of 64 stream
// through two shared-memory stages (K, V and the key mask). The heaviest query tiles (the last ones:
// causal) start first. Three blocks a multiprocessor (168 registers at D 128, a 32-byte spill) rather
// than two (201): 0.253 -> 0.242 ms a 7B layer, 0.195 -> 0.188 at 3B (bench_flash, H100).
template <int D>
__global__ void __launch_bounds__(128, 3) flash_fwd_kernel(bf16 *out, int64_t ld, float *lse, const bf16 *__restrict__ q,
                                                        const bf16 *__restrict__ k, const bf16 *__restrict__ v, int64_t lx,
                                                        const int32_t *__restrict__ mask, int S, int Hq, int Hkv,
                                                        float scale) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    constexpr int P = D + 8;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16 *Ks = (bf16 *)fa_smem, *Vs = Ks + 2 * FA_BN * P;  // [2][64][P] each
    int *Ms = (int *)(Vs + 2 * FA_BN * P);                  // [2][64]
    int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, kvh = h / (Hq / Hkv);
    int q0 = (gridDim.x - 1 - blockIdx.x) * FA_TILE, warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2,
        t = lane & 3;
    const bf16 *qb = q + (int64_t)b * S * lx + (int64_t)h * D, *kb = k + (int64_t)b * S * lx + (int64_t)kvh * D,
               *vb = v + (int64_t)b * S * lx + (int64_t)kvh * D;
    const int32_t *mb = mask + (int64_t)b * S;
    int kend = q0 + FA_TILE < S ? q0 + FA_TILE : S;  // causal: keys < the block's last query + 1
    int n_tiles = (kend + FA_BN - 1) / FA_BN;
    auto load = [&](int j) {
        int st = j & 1, k0 = j * FA_BN;
        tile_async<D>(Ks + st * FA_BN * P, kb, lx, k0, FA_BN, S);
        tile_async<D>(Vs + st * FA_BN * P, vb, lx, k0, FA_BN, S);
        vec_async(Ms + st * FA_BN, mb, k0, FA_BN, S);
        cp_commit();
    };
    load(0);
    int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;  // this thread's two rows
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        int c = kk * 16 + 2 * t;
        qa[kk][0] = r_lo < S ? ld32(qb + (int64_t)r_lo * lx + c) : 0;
        qa[kk][1] = r_hi < S ? ld32(qb + (int64_t)r_hi * lx + c) : 0;
        qa[kk][2] = r_lo < S ? ld32(qb + (int64_t)r_lo * lx + c + 8) : 0;
        qa[kk][3] = r_hi < S ? ld32(qb + (int64_t)r_hi * lx + c + 8) : 0;
    }
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;
    float sl2 = scale * LOG2E_F;
    for (int j = 0; j < n_tiles; j++) {
        stage_next(load, j, n_tiles);
        int st = j & 1, k0 = j * FA_BN;
        const bf16 *Kt = Ks + st * FA_BN * P, *Vt = Vs + st * FA_BN * P;
        const int *Mt = Ms + st * FA_BN;
        // the barrier, and whether every key of the tile is a token (each thread checks the entry its
        // own copy brought in)
        int full = __syncthreads_and(threadIdx.x >= FA_BN || Mt[threadIdx.x] != 0);
        float s[FA_BN / 8][4];
#pragma unroll
        for (int n = 0; n < FA_BN / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
            for (int n = 0; n < FA_BN / 8; n += 2) {
                uint32_t bb[4];
                frag_bt<D>(bb, Kt, n * 8, kk * 16);
                mma16816(s[n], qa[kk], bb[0], bb[1]);
                mma16816(s[n + 1], qa[kk], bb[2], bb[3]);
            }
        softmax_tile<D>(s, o, m_lo, m_hi, l_lo, l_hi, Mt, full, k0 + FA_BN - 1 > q0, k0, r_lo, r_hi, sl2);
        // O += P V: P's C tiles are A fragments; V is B with k = key, n = d
#pragma unroll
        for (int kc = 0; kc < FA_BN / 16; kc++) {
            uint32_t pa[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                              pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]), pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                uint32_t bb[4];
                frag_b<D>(bb, Vt, kc * 16, dn * 8);
                mma16816(o[dn], pa, bb[0], bb[1]);
                mma16816(o[dn + 1], pa, bb[2], bb[3]);
            }
        }
        __syncthreads();  // the next load overwrites this stage
    }
    int wr = r_lo - q0;  // the thread's rows in the staged tile (in K's stages)
    store_out_rows<D>(staged_row<D>(Ks, wr, r_lo < S), staged_row<D>(Ks, wr + 8, r_hi < S),
                      lse + ((int64_t)b * Hq + h) * S, (const float(*)[4])o, m_lo, m_hi, l_lo, l_hi, S, r_lo, r_hi, scale);
    __syncthreads();
    staged_rows_out<D>(out + (int64_t)b * S * ld + (int64_t)h * D, ld, Ks, q0, S);
}

// ---- forward on Hopper's warpgroup products (D 128) -----------------------------------------------

// Rows [r0, r0 + 64) of a matrix with row stride ld (128 columns) into a swizzled [64][128] tile (two
// chunks, cuda/wgmma.cuh), zeros past row S; all 128 threads take part, one commit group is the caller's.
__device__ __forceinline__ void tile_sw128_async(bf16 *sh, const bf16 *src, int64_t ld, int r0, int S) {
    if (r0 + 64 <= S) {  // every row there (the common case): no predicates, addresses a stride apart
        const bf16 *g = src + (int64_t)(r0 + (threadIdx.x >> 4)) * ld + (threadIdx.x & 15) * 8;
        int c = (threadIdx.x & 15) * 8;
        bf16 *d = sh + (c >> 6) * 4096 + sw128_off(threadIdx.x >> 4, c & 63);
#pragma unroll
        for (int j = 0; j < 8; j++) cp_async16(d + j * 8 * 64, g + j * 8 * ld, true);  // rows 8 j on
        return;
    }
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int i = threadIdx.x + 128 * j, r = i >> 4, c = (i & 15) * 8;  // 16-byte vector c / 8 of row r
        bool ok = r0 + r < S;
        cp_async16(sh + (c >> 6) * 4096 + sw128_off(r, c & 63), ok ? src + (int64_t)(r0 + r) * ld + c : src, ok);
    }
}

// The same contract and grid as flash_fwd_kernel<128>, one warpgroup a block of 64 queries: S = Q K^T with
// Q and K in shared memory, O += P V with P from registers (the accumulators packed to bf16) and V read
// transposed (cuda/wgmma.cuh). Pipelined in the FlashAttention-3 manner within the warpgroup: step j issues
// S_j = Q K_j^T and then O += P_{j-1} V_{j-1}, computes tile j's softmax while that product runs, and
// rescales O once it has landed. o sees the same operations in the same order as without the overlap
// (... *= alpha_{j-1}, += P_{j-1} V_{j-1}, *= alpha_j, += P_j V_j ...), so the results are the same bits.
// One K stage (66 KB of shared memory: three blocks a multiprocessor, the kernel being bound by latency):
// K_{j+1} and its key mask are copied as soon as S_j has landed (while tile j's softmax runs), V_j into
// one of two V stages as step j starts (V_{j-2}'s product ended in step j - 1).
__global__ void __launch_bounds__(128, 3) flash_fwd_wg_kernel(bf16 *out, int64_t ld, float *lse, const bf16 *__restrict__ q,
                                                            const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                                                            int64_t lx, const int32_t *__restrict__ mask, int S, int Hq,
                                                            int Hkv, float scale) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    constexpr int D = 128, T = 64 * D;
    extern __shared__ __align__(16) unsigned char fa_smem[];  // aligned to 1024 below
    bf16 *Qs = (bf16 *)smem_align1024(fa_smem);  // 1024-byte aligned
    bf16 *Ks = Qs + T, *Vs = Ks + T;                                                // K [64][128], V [2][64][128]
    int *Ms = (int *)(Vs + 2 * T);                                                  // [2][64]
    int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, kvh = h / (Hq / Hkv);
    int q0 = (gridDim.x - 1 - blockIdx.x) * 64, warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2;
    const bf16 *qb = q + (int64_t)b * S * lx + (int64_t)h * D, *kb = k + (int64_t)b * S * lx + (int64_t)kvh * D,
               *vb = v + (int64_t)b * S * lx + (int64_t)kvh * D;
    const int32_t *mb = mask + (int64_t)b * S;
    int kend = q0 + 64 < S ? q0 + 64 : S;  // causal: keys < the block's last query + 1
    int n_tiles = (kend + 63) / 64;
    auto load_k = [&](int j) {  // K_j and tile j's mask, one commit group
        tile_sw128_async(Ks, kb, lx, j * 64, S);
        vec_async(Ms + (j & 1) * 64, mb, j * 64, 64, S);
        cp_commit();
    };
    auto load_v = [&](int j) {  // V_j, one commit group
        tile_sw128_async(Vs + (j & 1) * T, vb, lx, j * 64, S);
        cp_commit();
    };
    tile_sw128_async(Qs, qb, lx, q0, S);
    load_k(0);  // one group with Q
    int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;  // this thread's two rows
    float o[64];  // [64 queries][128 d]: accumulator layout
#pragma unroll
    for (int i = 0; i < 64; i++) o[i] = 0.0f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;
    float sl2 = scale * LOG2E_F;
    uint32_t pa[16];  // P_{j-1} as bf16 A operands, 4 a k-chunk of 16 keys
    float s[32];
    // step j's start: every copy issued so far has landed (K_j and its mask, V_{j-1}) and every warp is past
    // step j - 1; then V_j's copy goes out. full: every key of tile j a token
    auto arrive = [&](int j) {
        cp_wait<0>();
        fence_proxy_async();
        int full = __syncthreads_and(j >= n_tiles || threadIdx.x >= 64 || Ms[(j & 1) * 64 + threadIdx.x] != 0);
        if (j < n_tiles) load_v(j);
        return full;
    };
    auto issue_s = [&]() {  // S_j = Q K_j^T
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) wgmma_m64n64_ss(s, wg_desc_kmajor(Qs, 64, kk), wg_desc_kmajor(Ks, 64, kk), 1);
        wg_commit();
    };
    auto issue_pv = [&](int j) {  // O += P_{j-1} V_{j-1}: k = key, n = d
#pragma unroll
        for (int kc = 0; kc < 4; kc++)
            wgmma_m64n128_rs_t(o, pa + 4 * kc, wg_desc_mnmajor(Vs + ((j - 1) & 1) * T, 64, kc), 1);
        wg_commit();
    };
    auto zero_s = [&]() {
#pragma unroll
        for (int i = 0; i < 32; i++) s[i] = 0.0f;
    };
    auto pack_p = [&]() {
#pragma unroll
        for (int i = 0; i < 32; i += 2) pa[i / 2] = pack_bf16(s[i], s[i + 1]);
    };
    auto next_k = [&](int j) {  // S_j has landed in every warp: K_{j+1}'s copy may overwrite K_j
        __syncthreads();
        if (j + 1 < n_tiles) load_k(j + 1);
    };
    float al_lo, al_hi;
    {  // step 0: S_0 and its softmax (o is still 0)
        int full = arrive(0);
        zero_s();
        wg_pin<32>(s);
        wg_fence();
        issue_s();
        wg_pin<32>(s);
        wg_wait<0>();
        wg_pin<32>(s);
        next_k(0);
        softmax_p((float(*)[4])s, m_lo, m_hi, l_lo, l_hi, al_lo, al_hi, Ms, full, 63 > q0, 0, r_lo, r_hi, sl2);
        rescale_o<D>((float(*)[4])o, al_lo, al_hi);
        pack_p();
    }
    for (int j = 1; j < n_tiles; j++) {
        int full = arrive(j);
        zero_s();
        wg_pin<32>(s), wg_pin<64>(o);
        wg_fence();
        issue_s();
        issue_pv(j);
        wg_pin<32>(s), wg_pin<64>(o), wg_pin<16>(pa);  // pa: read by the running P V until its wait
        wg_wait<1>();  // S_j (the older group) has landed; P_{j-1} V_{j-1} may still run
        wg_pin<32>(s);
        next_k(j);
        int k0 = j * 64;
        softmax_p((float(*)[4])s, m_lo, m_hi, l_lo, l_hi, al_lo, al_hi, Ms + (j & 1) * 64, full, k0 + 63 > q0, k0, r_lo, r_hi,
                  sl2);
        wg_wait<0>();
        wg_pin<64>(o), wg_pin<16>(pa);
        rescale_o<D>((float(*)[4])o, al_lo, al_hi);
        pack_p();
    }
    {  // the last tile's P V
        arrive(n_tiles);
        wg_pin<64>(o);
        wg_fence();
        issue_pv(n_tiles);
        wg_pin<64>(o), wg_pin<16>(pa);
        wg_wait<0>();
        wg_pin<64>(o);
    }
    __syncthreads();  // every warp's last product has read V's stages, where the output is staged
    int wr = warp * 16 + g;  // the thread's rows in the staged tile
    store_out_rows<D>(staged_row<D>(Vs, wr, r_lo < S), staged_row<D>(Vs, wr + 8, r_hi < S),
                      lse + ((int64_t)b * Hq + h) * S, (const float(*)[4])o, m_lo, m_hi, l_lo, l_hi, S, r_lo, r_hi, scale);
    __syncthreads();
    staged_rows_out<D>(out + (int64_t)b * S * ld + (int64_t)h * D, ld, Vs, q0, S);
}

// ---- backward: delta, then dK and dV (and dS into scratch), then dQ = dS K ----------------------------

// dS of one (sequence, query head) lives in scratch as 64 x 64 tiles of the causal lower triangle:
// tile (query tile i, key tile j <= i) at i (i + 1) / 2 + j, each [64 keys][64 queries] bf16: row-major
// between the mma.sync kernels, in the 128-byte swizzle of cuda/wgmma.cuh (sw128_off) between the warpgroup
// ones, which copy it whole between shared and global memory.
#define FA_DS_TILE 4096
__host__ __device__ __forceinline__ int64_t ds_tiles(int S) {
    int64_t T = (S + 63) / 64;
    return T * (T + 1) / 2;
}

// delta[b][h][s] = rowsum(dO * O): D/8 lanes per row, 16-byte loads.
template <int D>
__global__ void __launch_bounds__(256) flash_bwd_delta_kernel(float *delta, const bf16 *__restrict__ dO, int64_t ldd,
                                                              const bf16 *__restrict__ out, int64_t ldo, int S, int Hq,
                                                              int64_t rows) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    constexpr int V = D / 8;
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, row = i / V;  // row = token * Hq + h
    int c = (int)(i % V) * 8;
    float acc = 0.0f;
    if (row < rows) {
        int64_t tok = row / Hq;
        int h = (int)(row % Hq);
        uint4 a = *(const uint4 *)(dO + tok * ldd + (int64_t)h * D + c), y = *(const uint4 *)(out + tok * ldo + (int64_t)h * D + c);
        const __nv_bfloat162 *ap = (const __nv_bfloat162 *)&a, *yp = (const __nv_bfloat162 *)&y;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float2 af = __bfloat1622float2(ap[e]), yf = __bfloat1622float2(yp[e]);
            acc = fmaf(af.x, yf.x, acc);
            acc = fmaf(af.y, yf.y, acc);
        }
    }
#pragma unroll
    for (int o = V / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (row < rows && i % V == 0) {
        int64_t tok = row / Hq;
        int h = (int)(row % Hq), b = (int)(tok / S), s = (int)(tok % S);
        delta[((int64_t)b * Hq + h) * S + s] = acc;
    }
}

// grid (ceil(S/KB), B*Hkv), NW warps: warp w owns keys k0 + 16w .. +16 (KB = 16 NW keys a block). K, V
// of the block stay in shared memory; tiles of QS queries (Q, dO, lse, delta) of each query head of the
// group stream through STG stages, up to S rounded up to 64 (so that every dS tile is written whole).
// dK (rotated back) and dV go into gqkv as bf16; dS (unscaled, bf16) into the scratch tiles.
template <int D, int NW, int QS, int STG>
__global__ void __launch_bounds__(NW * 32) flash_bwd_dkdv_kernel(bf16 *gqkv, int64_t ldg, bf16 *dsg, const bf16 *__restrict__ q,
                                                                 const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                                                                 int64_t lx, const bf16 *__restrict__ dO, int64_t ldd,
                                                                 const float *__restrict__ lse, const float *__restrict__ delta,
                                                                 const int32_t *__restrict__ mask, const float2 *__restrict__ cs,
                                                                 int S, int Hq, int Hkv, float scale) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    constexpr int P = D + 8, KB = 16 * NW;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16 *Ks = (bf16 *)fa_smem, *Vs = Ks + KB * P;                  // [KB][P]
    bf16 *Qs = Vs + KB * P, *Ds = Qs + STG * QS * P;                // [STG][QS][P]
    float *Ls = (float *)(Ds + STG * QS * P), *Dl = Ls + STG * QS;  // [STG][QS]
    int bk = blockIdx.y, b = bk / Hkv, kvh = bk % Hkv, group = Hq / Hkv;
    int k0 = blockIdx.x * KB, warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16 *kb = k + (int64_t)b * S * lx + (int64_t)kvh * D, *vb = v + (int64_t)b * S * lx + (int64_t)kvh * D;
    int S64 = (S + 63) & ~63;
    int nq = (S64 - k0 + QS - 1) / QS;  // causal: query tiles from the block's first key on
    int n_it = group * nq;
    auto load = [&](int it) {
        int st = it % STG, hh = kvh * group + it / nq, q0 = k0 + (it % nq) * QS;
        tile_async<D>(Qs + st * QS * P, q + (int64_t)b * S * lx + (int64_t)hh * D, lx, q0, QS, S);
        tile_async<D>(Ds + st * QS * P, dO + (int64_t)b * S * ldd + (int64_t)hh * D, ldd, q0, QS, S);
        vec_async(Ls + st * QS, lse + ((int64_t)b * Hq + hh) * S, q0, QS, S);
        vec_async(Dl + st * QS, delta + ((int64_t)b * Hq + hh) * S, q0, QS, S);
        cp_commit();
    };
    tile_async<D>(Ks, kb, lx, k0, KB, S);
    tile_async<D>(Vs, vb, lx, k0, KB, S);
    load(0);  // one group with K and V
#pragma unroll
    for (int i = 1; i < STG - 1; i++)
        if (i < n_it)
            load(i);
        else
            cp_commit();  // empty groups keep the count of groups in flight fixed
    int wk0 = k0 + warp * 16, key_lo = wk0 + g, key_hi = key_lo + 8, jt = wk0 / 64;
    bool ok_lo = key_lo < S && mask[(int64_t)b * S + (key_lo < S ? key_lo : 0)] != 0;
    bool ok_hi = key_hi < S && mask[(int64_t)b * S + (key_hi < S ? key_hi : 0)] != 0;
    int64_t ntri = ds_tiles(S);
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0;
    float sl2 = scale * LOG2E_F;
    for (int it = 0; it < n_it; it++) {
        if (it + STG - 1 < n_it)
            load(it + STG - 1);
        else
            cp_commit();
        cp_wait<STG - 1>();
        __syncthreads();
        int st = it % STG, hh = kvh * group + it / nq, q0 = k0 + (it % nq) * QS;
        const bf16 *Qt = Qs + st * QS * P, *Dt = Ds + st * QS * P;
        const float *Lt = Ls + st * QS, *Dlt = Dl + st * QS;
        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x QS queries
        float sT[QS / 8][4], dpt[QS / 8][4];
#pragma unroll
        for (int n = 0; n < QS / 8; n++) {
            sT[n][0] = sT[n][1] = sT[n][2] = sT[n][3] = 0.0f;
            dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t ka[4], va[4];
            frag_a<D>(ka, Ks, warp * 16, kk * 16);
            frag_a<D>(va, Vs, warp * 16, kk * 16);
#pragma unroll
            for (int n = 0; n < QS / 8; n += 2) {
                uint32_t bq[4], bd[4];
                frag_bt<D>(bq, Qt, n * 8, kk * 16);
                frag_bt<D>(bd, Dt, n * 8, kk * 16);
                mma16816(sT[n], ka, bq[0], bq[1]);
                mma16816(sT[n + 1], ka, bq[2], bq[3]);
                mma16816(dpt[n], va, bd[0], bd[1]);
                mma16816(dpt[n + 1], va, bd[2], bd[3]);
            }
        }
        // P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - delta); past the block's last key and before S
        // every query sees every key: only the key mask remains
        bool plain = q0 >= k0 + KB - 1 && q0 + QS <= S;
#pragma unroll
        for (int n = 0; n < QS / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qi = n * 8 + 2 * t + (e & 1), qq = q0 + qi, key = e < 2 ? key_lo : key_hi;
                bool ok = (e < 2 ? ok_lo : ok_hi) && (plain || (key <= qq && qq < S));
                float p = ok ? ex2_ftz(fmaf(sT[n][e], sl2, -Lt[qi] * LOG2E_F)) : 0.0f;
                sT[n][e] = p;
                dpt[n][e] = p * (dpt[n][e] - Dlt[qi]);
            }
        // this warp's dS^T rows into their tile (key tile jt, query tile q0 / 64), unless the whole
        // tile is above the diagonal (the upper warps of a 128-key block on its first query tile)
        int qt = q0 / 64;
        bf16 *dst = dsg + (((int64_t)b * Hq + hh) * ntri + qt * (qt + 1) / 2 + jt) * FA_DS_TILE +
                    (int64_t)(wk0 % 64 + g) * 64 + (q0 % 64) + 2 * t;
        bool wr = qt >= jt;
        // dV += P^T dO;  dK += dS^T Q   (k = query, n = d)
#pragma unroll
        for (int kc = 0; kc < QS / 16; kc++) {
            uint32_t pa[4] = {pack_bf16(sT[2 * kc][0], sT[2 * kc][1]), pack_bf16(sT[2 * kc][2], sT[2 * kc][3]),
                              pack_bf16(sT[2 * kc + 1][0], sT[2 * kc + 1][1]),
                              pack_bf16(sT[2 * kc + 1][2], sT[2 * kc + 1][3])};
            uint32_t sa[4] = {pack_bf16(dpt[2 * kc][0], dpt[2 * kc][1]), pack_bf16(dpt[2 * kc][2], dpt[2 * kc][3]),
                              pack_bf16(dpt[2 * kc + 1][0], dpt[2 * kc + 1][1]),
                              pack_bf16(dpt[2 * kc + 1][2], dpt[2 * kc + 1][3])};
            if (wr) {
                *(uint32_t *)(dst + kc * 16) = sa[0];
                *(uint32_t *)(dst + 8 * 64 + kc * 16) = sa[1];
                *(uint32_t *)(dst + kc * 16 + 8) = sa[2];
                *(uint32_t *)(dst + 8 * 64 + kc * 16 + 8) = sa[3];
            }
#pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                uint32_t bd[4], bq[4];
                frag_b<D>(bd, Dt, kc * 16, dn * 8);
                frag_b<D>(bq, Qt, kc * 16, dn * 8);
                mma16816(dv[dn], pa, bd[0], bd[1]);
                mma16816(dv[dn + 1], pa, bd[2], bd[3]);
                mma16816(dk[dn], sa, bq[0], bq[1]);
                mma16816(dk[dn + 1], sa, bq[2], bq[3]);
            }
        }
        __syncthreads();
    }
    // dK, dV staged in the query-side stages (free after the loop's last barrier), then out
    static_assert(STG * QS >= KB, "a staged [KB][D + 8] tile in each of the Q and dO stages");
    bf16 *sk = Qs, *sv = Ds;
    int wr = key_lo - k0;
    store_rows_unrope<D>(staged_row<D>(sk, wr, key_lo < S), staged_row<D>(sk, wr + 8, key_hi < S), dk,
                         scale, cs, key_lo, key_hi, 1);
    store_rows_unrope<D>(staged_row<D>(sv, wr, key_lo < S), staged_row<D>(sv, wr + 8, key_hi < S), dv,
                         1.0f, cs, key_lo, key_hi, 0);
    __syncthreads();
    bf16 *gk = gqkv + (int64_t)b * S * ldg + (int64_t)(Hq + kvh) * D, *gv = gk + (int64_t)Hkv * D;
    staged_rows_out<D, KB, NW * 32>(gk, ldg, sk, k0, S);
    staged_rows_out<D, KB, NW * 32>(gv, ldg, sv, k0, S);
}

// ---- dK, dV on Hopper's warpgroup products (D 128) -----------------------------------------------------

// The same contract and grid as flash_bwd_dkdv_kernel<128, 4, 64, 2> (64 keys a block, 64 queries a step,
// two stages), one warpgroup: S^T = K Q^T and dP^T = V dO^T as 64 x 64 products with both operands in
// shared memory, then dV += P^T dO and dK += dS^T Q with P^T, dS^T from registers (the accumulators
// packed to bf16, as FA-2 feeds P V) and dO, Q read transposed from the same tiles. No ldmatrix, and the
// B operands are read once a warpgroup rather than once a warp. dS^T goes to scratch through a shared tile
// and one bulk copy (thread 0, after the step's closing barrier) instead of 32-bit stores from registers
// (those scattered sector writes took 18 % of the kernel: 385 -> 315 us a 7B layer without them).
__global__ void __launch_bounds__(128) flash_bwd_dkdv_wg_kernel(bf16 *gqkv, int64_t ldg, bf16 *dsg, const bf16 *__restrict__ q,
                                                              const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                                                              int64_t lx, const bf16 *__restrict__ dO, int64_t ldd,
                                                              const float *__restrict__ lse, const float *__restrict__ delta,
                                                              const int32_t *__restrict__ mask, const float2 *__restrict__ cs,
                                                              int S, int Hq, int Hkv, float scale) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    constexpr int D = 128, T = 64 * D;  // T: elements of a [64][128] tile
    extern __shared__ __align__(16) unsigned char fa_smem[];  // aligned to 1024 below
    bf16 *Ks = (bf16 *)smem_align1024(fa_smem);  // 1024-byte aligned
    bf16 *Vs = Ks + T, *Qs = Vs + T, *Os = Qs + 2 * T;                             // Q, dO: [2 stages]
    bf16 *Ds = Os + 2 * T;                                                          // dS^T [64][64], swizzled
    float2 *LD = (float2 *)(Ds + 64 * 64);  // [2][64]: (-lse log2(e), delta) of the step's queries
    int bk = blockIdx.y, b = bk / Hkv, kvh = bk % Hkv, group = Hq / Hkv;
    int k0 = blockIdx.x * 64, warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16 *kb = k + (int64_t)b * S * lx + (int64_t)kvh * D, *vb = v + (int64_t)b * S * lx + (int64_t)kvh * D;
    int S64 = (S + 63) & ~63;
    int nq = (S64 - k0) / 64;  // causal: query tiles from the block's first key on
    int n_it = group * nq;
    // the steps walk the group's query heads, and in each the query tiles from k0 on: the next step to
    // load (its head, first query) and the one computed advance by one each (no division in the loop)
    int ld_h = kvh * group, ld_q = k0, hh = ld_h, q0 = k0;
    auto load = [&](int it) {
        int st = it & 1;
        tile_sw128_async(Qs + st * T, q + (int64_t)b * S * lx + (int64_t)ld_h * D, lx, ld_q, S);
        tile_sw128_async(Os + st * T, dO + (int64_t)b * S * ldd + (int64_t)ld_h * D, ldd, ld_q, S);
        {  // lse (threads 0-63) into .x, delta (64-127) into .y of the query's pair
            int i = threadIdx.x & 63, qq = ld_q + i;
            const float *src = (threadIdx.x < 64 ? lse : delta) + ((int64_t)b * Hq + ld_h) * S;
            cp_async4((float *)(LD + st * 64 + i) + (threadIdx.x >> 6), qq < S ? src + qq : src, qq < S);
        }
        cp_commit();
        ld_q += 64;
        if (ld_q >= S64) ld_q = k0, ld_h++;
    };
    tile_sw128_async(Ks, kb, lx, k0, S);
    tile_sw128_async(Vs, vb, lx, k0, S);
    load(0);  // one group with K and V
    int wk = warp * 16 + g, key_lo = k0 + wk, key_hi = key_lo + 8;
    bool ok_lo = key_lo < S && mask[(int64_t)b * S + (key_lo < S ? key_lo : 0)] != 0;
    bool ok_hi = key_hi < S && mask[(int64_t)b * S + (key_hi < S ? key_hi : 0)] != 0;
    int64_t ntri = ds_tiles(S);
    int jt = k0 / 64;
    float dk[64], dv[64];  // [64 keys][128 d] of the warpgroup: accumulator layout (cuda/wgmma.cuh)
#pragma unroll
    for (int i = 0; i < 64; i++) dk[i] = dv[i] = 0.0f;
    float sl2 = scale * LOG2E_F;
    for (int it = 0; it < n_it; it++) {
        if (it + 1 < n_it)
            load(it + 1);
        else
            cp_commit();
        cp_wait<1>();
        int st = it & 1;
        const float2 *LDt = LD + st * 64;
        if (threadIdx.x < 64) {  // its own copy: -lse log2(e), the exponent's offset in the log2 domain
            float *x = (float *)(LD + st * 64 + threadIdx.x);
            *x = -*x * LOG2E_F;
        }
        fence_proxy_async();
        __syncthreads();
        const bf16 *Qt = Qs + st * T, *Ot = Os + st * T;
        // S^T = K Q^T, dP^T = V dO^T: [64 keys][64 queries], k = d
        float sT[32], dpt[32];
#pragma unroll
        for (int i = 0; i < 32; i++) sT[i] = dpt[i] = 0.0f;
        wg_pin<32>(sT), wg_pin<32>(dpt);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) wgmma_m64n64_ss(sT, wg_desc_kmajor(Ks, 64, kk), wg_desc_kmajor(Qt, 64, kk), 1);
        wg_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) wgmma_m64n64_ss(dpt, wg_desc_kmajor(Vs, 64, kk), wg_desc_kmajor(Ot, 64, kk), 1);
        wg_commit();
        wg_pin<32>(sT), wg_pin<32>(dpt);
        // P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - delta); past the block's last key and before S
        // every query sees every key: only the key mask remains
        // (the thread's two keys real and the tile wholly at or below the diagonal, within S: an FMA and an
        // exp2 an element, 464 -> ~100 instructions a step in SASS)
        bool plain = q0 >= k0 + 63 && q0 + 64 <= S;
        wg_wait<1>();
        wg_pin<32>(sT);
        if (plain && ok_lo && ok_hi) {
#pragma unroll
            for (int i = 0; i < 32; i++) sT[i] = ex2_ftz(fmaf(sT[i], sl2, LDt[(i >> 2) * 8 + 2 * t + (i & 1)].x));
        } else {
#pragma unroll
            for (int i = 0; i < 32; i++) {
                int qi = (i >> 2) * 8 + 2 * t + (i & 1), qq = q0 + qi, key = (i & 2) ? key_hi : key_lo;
                bool ok = ((i & 2) ? ok_hi : ok_lo) && (plain || (key <= qq && qq < S));
                sT[i] = ok ? ex2_ftz(fmaf(sT[i], sl2, LDt[qi].x)) : 0.0f;
            }
        }
        wg_wait<0>();
        wg_pin<32>(dpt);
        uint32_t pa[16], sa[16];  // P^T and dS^T as bf16 A operands, 4 a k-chunk of 16 queries
#pragma unroll
        for (int i = 0; i < 32; i += 2) {
            int qi = (i >> 2) * 8 + 2 * t;
            pa[i / 2] = pack_bf16(sT[i], sT[i + 1]);
            sa[i / 2] = pack_bf16(sT[i] * (dpt[i] - LDt[qi].y), sT[i + 1] * (dpt[i + 1] - LDt[qi + 1].y));
        }
        // dS^T (unscaled) into Ds, for its tile (key tile jt, query tile q0 / 64): [64 keys][64 queries], once
        // the last step's has left (its bulk copy, issued at the end of that step, had this step's products
        // and exponentials to read it out: waited for at the top of the step, it held every warp there)
        if (threadIdx.x == 0) bulk_wait_read();
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 8; j++) {
            *(uint32_t *)(Ds + sw128_off(wk, j * 8 + 2 * t)) = sa[2 * j];
            *(uint32_t *)(Ds + sw128_off(wk + 8, j * 8 + 2 * t)) = sa[2 * j + 1];
        }
        fence_proxy_async();
        // dV += P^T dO, dK += dS^T Q: k = query, n = d
        wg_pin<64>(dv), wg_pin<64>(dk);
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < 4; kc++) wgmma_m64n128_rs_t(dv, pa + 4 * kc, wg_desc_mnmajor(Ot, 64, kc), 1);
#pragma unroll
        for (int kc = 0; kc < 4; kc++) wgmma_m64n128_rs_t(dk, sa + 4 * kc, wg_desc_mnmajor(Qt, 64, kc), 1);
        wg_commit();
        wg_pin<64>(dv), wg_pin<64>(dk);
        wg_wait<0>();
        wg_pin<64>(dv), wg_pin<64>(dk);
        __syncthreads();
        if (threadIdx.x == 0) {
            int qt = q0 / 64;
            bulk_s2g(dsg + (((int64_t)b * Hq + hh) * ntri + qt * (qt + 1) / 2 + jt) * FA_DS_TILE, Ds, FA_DS_TILE * 2);
            bulk_commit();
        }
        q0 += 64;
        if (q0 >= S64) q0 = k0, hh++;
    }
    // dK, dV staged in Q's and dO's stages (free after the loop's last barrier), then out
    bf16 *sk = Qs, *sv = Qs + 64 * (D + 8);
    store_rows_unrope<D>(staged_row<D>(sk, wk, key_lo < S), staged_row<D>(sk, wk + 8, key_hi < S),
                         (const float(*)[4])dk, scale, cs, key_lo, key_hi, 1);
    store_rows_unrope<D>(staged_row<D>(sv, wk, key_lo < S), staged_row<D>(sv, wk + 8, key_hi < S),
                         (const float(*)[4])dv, 1.0f, cs, key_lo, key_hi, 0);
    if (threadIdx.x == 0) bulk_wait_read();
    __syncthreads();
    bf16 *gk = gqkv + (int64_t)b * S * ldg + (int64_t)(Hq + kvh) * D, *gv = gk + (int64_t)Hkv * D;
    staged_rows_out<D>(gk, ldg, sk, k0, S);
    staged_rows_out<D>(gv, ldg, sv, k0, S);
}

// dQ = scale dS K on warpgroup products (D 128): grid (ceil(S/64), B*Hq), one warpgroup a query tile (the
// heaviest, the last ones, first); the key tiles at or before it stream through two stages (K and the
// dS^T tile (already swizzled in scratch), both read transposed: A = dS [queries][keys] from the [keys][queries]
// tile, B = K).
__global__ void __launch_bounds__(128) flash_bwd_dq_wg_kernel(bf16 *gqkv, int64_t ldg, const bf16 *__restrict__ dsg,
                                                            const bf16 *__restrict__ k, int64_t lx,
                                                            const float2 *__restrict__ cs, int S, int Hq, int Hkv,
                                                            float scale) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    constexpr int D = 128, T = 64 * D;
    extern __shared__ __align__(16) unsigned char fa_smem[];  // aligned to 1024 below
    bf16 *Ks = (bf16 *)smem_align1024(fa_smem);  // K [2][64][128], 1024-byte aligned
    bf16 *Ts = Ks + 2 * T;                                                         // dS^T [2][64][64]
    int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, kvh = h / (Hq / Hkv);
    int qt = gridDim.x - 1 - blockIdx.x, q0 = qt * 64, warp = threadIdx.x / 32, g = (threadIdx.x & 31) >> 2;
    const bf16 *kb = k + (int64_t)b * S * lx + (int64_t)kvh * D;
    const bf16 *tb = dsg + ((int64_t)bh * ds_tiles(S) + (int64_t)qt * (qt + 1) / 2) * FA_DS_TILE;
    auto load = [&](int j) {
        int st = j & 1;
        tile_sw128_async(Ks + st * T, kb, lx, j * 64, S);
        const bf16 *src = tb + (int64_t)j * FA_DS_TILE;
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int i = (threadIdx.x + 128 * u) * 8;
            cp_async16(Ts + st * 4096 + i, src + i, true);
        }
        cp_commit();
    };
    load(0);
    float dq[64];
#pragma unroll
    for (int i = 0; i < 64; i++) dq[i] = 0.0f;
    for (int j = 0; j <= qt; j++) {
        stage_next(load, j, qt + 1);
        fence_proxy_async();
        __syncthreads();
        int st = j & 1;
        wg_pin<64>(dq);
        wg_fence();
#pragma unroll
        for (int kc = 0; kc < 4; kc++)
            wgmma_m64n128_ss<1, 1>(dq, wg_desc_mnmajor(Ts + st * 4096, 64, kc), wg_desc_mnmajor(Ks + st * T, 64, kc), 1);
        wg_commit();
        wg_pin<64>(dq);
        wg_wait<0>();
        wg_pin<64>(dq);
        __syncthreads();
    }
    int wr = warp * 16 + g, r_lo = q0 + wr, r_hi = r_lo + 8;  // staged in K's stages, then out
    store_rows_unrope<D>(staged_row<D>(Ks, wr, r_lo < S), staged_row<D>(Ks, wr + 8, r_hi < S),
                         (const float(*)[4])dq, scale, cs, r_lo, r_hi, 1);
    __syncthreads();
    staged_rows_out<D>(gqkv + (int64_t)b * S * ldg + (int64_t)h * D, ldg, Ks, q0, S);
}

// grid (ceil(S/(64 MT)), B*Hq), 128 threads: warp w owns the 16 MT queries q0 + 16 MT w ..; dQ = scale dS K
// over the key tiles at or before the block's queries (dS tiles and K stream through two stages), rotated
// back and written as bf16 into gqkv. The heaviest query tiles (the last ones) start first.
template <int D, int MT, int NWQ>
__global__ void __launch_bounds__(NWQ * 32) flash_bwd_dq_kernel(bf16 *gqkv, int64_t ldg, const bf16 *__restrict__ dsg,
                                                           const bf16 *__restrict__ k, int64_t lx,
                                                           const float2 *__restrict__ cs, int S, int Hq, int Hkv,
                                                           float scale) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    constexpr int P = D + 8, PT = 64 + 8, QB = 16 * MT * NWQ, QT = QB / 64;  // queries, query tiles a block
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16 *Ks = (bf16 *)fa_smem, *Ts = Ks + 2 * 64 * P;  // K [2][64][P], dS^T [2][MT][64][PT]
    int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, kvh = h / (Hq / Hkv);
    int T = (S + 63) / 64, qb = gridDim.x - 1 - blockIdx.x, q0 = qb * QB, warp = threadIdx.x / 32, lane = threadIdx.x & 31,
        g = lane >> 2;
    int wq = q0 + warp * 16 * MT, wt = wq / 64;  // this warp's first query, its tile
    const bf16 *kb = k + (int64_t)b * S * lx + (int64_t)kvh * D;
    const bf16 *tb = dsg + (int64_t)bh * ds_tiles(S) * FA_DS_TILE;
    int last = q0 / 64 + QT - 1 < T - 1 ? q0 / 64 + QT - 1 : T - 1;  // the block's last query tile
    int n_tiles = last + 1;
    auto load = [&](int j) {
        int st = j & 1;
        tile_async<D>(Ks + st * 64 * P, kb, lx, j * 64, 64, S);
#pragma unroll
        for (int m = 0; m < QT; m++) {
            int qt = q0 / 64 + m;
            if (qt < j || qt > last) continue;  // above the diagonal, or past S
            const bf16 *src = tb + ((int64_t)qt * (qt + 1) / 2 + j) * FA_DS_TILE;
            bf16 *dstt = Ts + (st * QT + m) * 64 * PT;
            for (int i = threadIdx.x; i < 64 * 8; i += blockDim.x)
                cp_async16(dstt + (i >> 3) * PT + (i & 7) * 8, src + i * 8, true);
        }
        cp_commit();
    };
    load(0);
    float dq[MT][D / 8][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int i = 0; i < D / 8; i++) dq[m][i][0] = dq[m][i][1] = dq[m][i][2] = dq[m][i][3] = 0.0f;
    for (int j = 0; j < n_tiles; j++) {
        stage_next(load, j, n_tiles);
        __syncthreads();
        int st = j & 1;
        if (wt >= j && wt <= last) {
            const bf16 *Kt = Ks + st * 64 * P, *Tt = Ts + (st * QT + wt - q0 / 64) * 64 * PT + wq % 64;
#pragma unroll
            for (int kc = 0; kc < 4; kc++) {
                uint32_t sa[MT][4];
                int i = lane >> 3;
#pragma unroll
                for (int m = 0; m < MT; m++) ldsm4t(sa[m], Tt + (kc * 16 + (i >> 1) * 8 + (lane & 7)) * PT + m * 16 + (i & 1) * 8);
#pragma unroll
                for (int dn = 0; dn < D / 8; dn += 2) {
                    uint32_t bk[4];
                    frag_b<D>(bk, Kt, kc * 16, dn * 8);
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        mma16816(dq[m][dn], sa[m], bk[0], bk[1]);
                        mma16816(dq[m][dn + 1], sa[m], bk[2], bk[3]);
                    }
                }
            }
        }
        __syncthreads();
    }
    // staged in K's stages ([2][64][P] = [QB][P] rows), then out
    static_assert(QB <= 128, "the staged tile fits K's stages");
#pragma unroll
    for (int m = 0; m < MT; m++) {
        int r_lo = wq + 16 * m + g, r_hi = r_lo + 8;
        store_rows_unrope<D>(staged_row<D>(Ks, r_lo - q0, r_lo < S), staged_row<D>(Ks, r_hi - q0, r_hi < S),
                             dq[m], scale, cs, r_lo, r_hi, 1);
    }
    __syncthreads();
    staged_rows_out<D, QB, NWQ * 32>(gqkv + (int64_t)b * S * ldg + (int64_t)h * D, ldg, Ks, q0, S);
}

// ---- kernel launchers ---------------------------------------------------------------------------------

extern "C" int flash_attention_supported(int D) { return D == 16 || D == 32 || D == 64 || D == 128; }

// Dynamic shared memory above 48 KB needs a per-kernel opt-in, once per kernel.
template <typename K>
static void smem_optin(K kernel, size_t bytes, int *done) {
    if (*done || bytes <= 48 * 1024) return;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    *done = 1;
}

// The warpgroup kernels (forward, dK/dV, dQ) at D 128 on Hopper unless flash_attention_use_wgmma(0) or MOSFT_FLASH_WGMMA=0.
static int g_wgmma = -1;  // -1: from the environment (default on)
extern "C" void flash_attention_use_wgmma(int on) { g_wgmma = on ? 1 : 0; }
extern "C" int flash_attention_uses_wgmma(const cuda_ctx *ctx, int D) {
    if (g_wgmma < 0) {
        const char *e = getenv("MOSFT_FLASH_WGMMA");
        g_wgmma = !(e && !strcmp(e, "0"));
    }
    return g_wgmma && D == 128 && ctx->cc_major == 9;
}

template <int D>
static void fwd_launch(cuda_ctx *ctx, bf16 *out, int64_t ldo, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                       int64_t lx, const int32_t *mask, int B, int S, int Hq, int Hkv, float scale) {
    size_t smem = (size_t)4 * FA_BN * (D + 8) * 2 + 2 * FA_BN * sizeof(int);
    static int done = 0, done_w = 0;  // per template instance
    dim3 grid((unsigned)((S + FA_TILE - 1) / FA_TILE), (unsigned)(B * Hq));
    MOSFT_ASSERT(ldo % 8 == 0);  // the output's rows leave with 16-byte stores
    if (flash_attention_uses_wgmma(ctx, D)) {
        size_t smem_w = WG_SMEM_ALIGN + (size_t)4 * 64 * 128 * sizeof(bf16) + 2 * 64 * sizeof(int);  // align, Q, K, 2 V, mask
        smem_optin(flash_fwd_wg_kernel, smem_w, &done_w);
        launch_pdl(flash_fwd_wg_kernel, grid, dim3(128), smem_w, ctx->stream, out, ldo, lse, q, k, v, lx, mask, S, Hq,
                   Hkv, scale);
    } else {
        smem_optin(flash_fwd_kernel<D>, smem, &done);
        launch_pdl(flash_fwd_kernel<D>, grid, dim3(128), smem, ctx->stream, out, ldo, lse, q, k, v, lx, mask, S, Hq,
                   Hkv, scale);
    }
    CUDA_LAUNCH_CHECK();
}

extern "C" void flash_attention_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, float *lse, const bf16 *qkv,
                                             int64_t ldqkv, const int32_t *mask, int B, int S, int Hq, int Hkv, int D) {
    MOSFT_ASSERT(Hkv > 0 && Hq % Hkv == 0 && flash_attention_supported(D));
    MOSFT_ASSERT(ldqkv % 8 == 0 && (uintptr_t)qkv % 16 == 0);  // 16-byte rows for cp.async
    float scale = (float)(1.0 / sqrt((double)D));
    const bf16 *q = qkv, *k = qkv + (int64_t)Hq * D, *v = k + (int64_t)Hkv * D;
    switch (D) {
    case 16: fwd_launch<16>(ctx, out, ldo, lse, q, k, v, ldqkv, mask, B, S, Hq, Hkv, scale); break;
    case 32: fwd_launch<32>(ctx, out, ldo, lse, q, k, v, ldqkv, mask, B, S, Hq, Hkv, scale); break;
    case 64: fwd_launch<64>(ctx, out, ldo, lse, q, k, v, ldqkv, mask, B, S, Hq, Hkv, scale); break;
    default: fwd_launch<128>(ctx, out, ldo, lse, q, k, v, ldqkv, mask, B, S, Hq, Hkv, scale); break;
    }
}

// Sequences whose dS tiles fit: scratch bytes for chunks of bc sequences.
extern "C" size_t flash_attention_scratch_bytes(int bc, int S, int Hq) {
    return (size_t)bc * Hq * ds_tiles(S) * FA_DS_TILE * sizeof(bf16);
}

template <int D, int NW, int QS, int STG, int MT, int NWQ>
static void bwd_launch(cuda_ctx *ctx, bf16 *gqkv, int64_t ldg, float *delta, const bf16 *dO, int64_t ldd,
                       const bf16 *out, int64_t ldo, const float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                       int64_t lx, const int32_t *mask, const float *cs, int B, int S, int Hq, int Hkv, float scale,
                       void *scratch, int bc) {
    constexpr int KB = 16 * NW;
    constexpr int QB = 16 * MT * NWQ;
    size_t smem_k = (size_t)(2 * KB + 2 * STG * QS) * (D + 8) * 2 + 2 * STG * QS * sizeof(float);
    size_t smem_q = (size_t)2 * 64 * (D + 8) * 2 + (size_t)2 * (QB / 64) * 64 * 72 * 2;
    static int done_q = 0, done_k = 0, done_w = 0;
    smem_optin(flash_bwd_dq_kernel<D, MT, NWQ>, smem_q, &done_q);
    smem_optin(flash_bwd_dkdv_kernel<D, NW, QS, STG>, smem_k, &done_k);
    int wg = flash_attention_uses_wgmma(ctx, D);
    size_t smem_w = WG_SMEM_ALIGN + (size_t)(6 * 64 * 128 + 64 * 64) * sizeof(bf16) + 4 * 64 * sizeof(float);  // align, K V 2Q 2dO dS, lse delta
    size_t smem_wq = WG_SMEM_ALIGN + (size_t)2 * (64 * 128 + 64 * 64) * sizeof(bf16);  // align, K and dS^T in two stages
    static int done_wq = 0;
    if (wg) smem_optin(flash_bwd_dkdv_wg_kernel, smem_w, &done_w), smem_optin(flash_bwd_dq_wg_kernel, smem_wq, &done_wq);
    int64_t rows = (int64_t)B * S * Hq;
    launch_pdl(flash_bwd_delta_kernel<D>, dim3(ceil_div_i(rows * (D / 8), 256)), dim3(256), 0, ctx->stream, delta, dO,
               ldd, out, ldo, S, Hq, rows);
    CUDA_LAUNCH_CHECK();
    bf16 *dsg = (bf16 *)scratch;
    for (int b0 = 0; b0 < B; b0 += bc) {
        int n = B - b0 < bc ? B - b0 : bc;
        int64_t tq = (int64_t)b0 * S;  // first token of the chunk
        bf16 *gq = gqkv + tq * ldg;
        const bf16 *qc = q + tq * lx, *kc = k + tq * lx, *vc = v + tq * lx, *dc = dO + tq * ldd;
        const float *lc = lse + tq * Hq, *dlc = delta + tq * Hq;
        dim3 g1((unsigned)((S + KB - 1) / KB), (unsigned)(n * Hkv));
        if (wg)
            launch_pdl(flash_bwd_dkdv_wg_kernel, dim3((unsigned)((S + 63) / 64), (unsigned)(n * Hkv)), dim3(128),
                       smem_w, ctx->stream, gq, ldg, dsg, qc, kc, vc, lx, dc, ldd, lc, dlc, mask + tq,
                       (const float2 *)cs, S, Hq, Hkv, scale);
        else
            launch_pdl(flash_bwd_dkdv_kernel<D, NW, QS, STG>, g1, dim3(NW * 32), smem_k, ctx->stream, gq, ldg, dsg, qc,
                       kc, vc, lx, dc, ldd, lc, dlc, mask + tq, (const float2 *)cs, S, Hq, Hkv, scale);
        CUDA_LAUNCH_CHECK();
        dim3 g2((unsigned)((S + QB - 1) / QB), (unsigned)(n * Hq));
        if (wg)
            launch_pdl(flash_bwd_dq_wg_kernel, dim3((unsigned)((S + 63) / 64), (unsigned)(n * Hq)), dim3(128), smem_wq,
                       ctx->stream, gq, ldg, dsg, kc, lx, (const float2 *)cs, S, Hq, Hkv, scale);
        else
            launch_pdl(flash_bwd_dq_kernel<D, MT, NWQ>, g2, dim3(NWQ * 32), smem_q, ctx->stream, gq, ldg, dsg, kc, lx,
                       (const float2 *)cs, S, Hq, Hkv, scale);
        CUDA_LAUNCH_CHECK();
    }
}

// The configuration measured best on an H100 at B 16, S 512, D 128 (7B and 3B shapes): dK/dV with 4 warps
// (64 keys a block) and 64 queries a step in two stages (32 queries: 3% slower; 8 warps and 128 keys:
// 8% slower; three stages: no better); dQ with 32 queries a warp, 4 warps (16 queries a warp: 3% slower
// overall, 8 warps: slower).
template <int D>
static void bwd_run(cuda_ctx *ctx, bf16 *gqkv, int64_t ldg, float *delta, const bf16 *dO, int64_t ldd, const bf16 *out,
                    int64_t ldo, const float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int64_t lx,
                    const int32_t *mask, const float *cs, int B, int S, int Hq, int Hkv, float scale, void *scratch, int bc) {
    bwd_launch<D, 4, 64, 2, 2, 4>(ctx, gqkv, ldg, delta, dO, ldd, out, ldo, lse, q, k, v, lx, mask, cs, B, S, Hq, Hkv, scale,
                                  scratch, bc);
}

extern "C" void flash_attention_backward_cuda(cuda_ctx *ctx, bf16 *gqkv, int64_t ldg, float *delta, const bf16 *dO,
                                              int64_t ldd, const bf16 *out, int64_t ldo, const float *lse, const bf16 *qkv,
                                              int64_t ldqkv, const int32_t *mask, const float *cs, int B, int S, int Hq,
                                              int Hkv, int D, void *scratch, int bc) {
    MOSFT_ASSERT(Hkv > 0 && Hq % Hkv == 0 && flash_attention_supported(D));
    MOSFT_ASSERT(ldg % 8 == 0 && ldd % 8 == 0 && ldo % 8 == 0);  // 16-byte rows for cp.async and the delta loads
    MOSFT_ASSERT(ldqkv % 8 == 0 && (uintptr_t)qkv % 16 == 0);
    MOSFT_ASSERT(scratch && bc >= 1);
    float scale = (float)(1.0 / sqrt((double)D));
    const bf16 *q = qkv, *k = qkv + (int64_t)Hq * D, *v = k + (int64_t)Hkv * D;
    int64_t lx = ldqkv;
    switch (D) {
    case 16: bwd_run<16>(ctx, gqkv, ldg, delta, dO, ldd, out, ldo, lse, q, k, v, lx, mask, cs, B, S, Hq, Hkv, scale, scratch, bc); break;
    case 32: bwd_run<32>(ctx, gqkv, ldg, delta, dO, ldd, out, ldo, lse, q, k, v, lx, mask, cs, B, S, Hq, Hkv, scale, scratch, bc); break;
    case 64: bwd_run<64>(ctx, gqkv, ldg, delta, dO, ldd, out, ldo, lse, q, k, v, lx, mask, cs, B, S, Hq, Hkv, scale, scratch, bc); break;
    default: bwd_run<128>(ctx, gqkv, ldg, delta, dO, ldd, out, ldo, lse, q, k, v, lx, mask, cs, B, S, Hq, Hkv, scale, scratch, bc); break;
    }
}
