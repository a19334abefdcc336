// flash_attention.cu: causal GQA attention with key padding in the FlashAttention-2 manner: tiles of
// queries and keys in shared memory, scores and probabilities only in registers (bf16 tensor-core
// mma.sync m16n8k16 with fp32 accumulation, online softmax), so nothing of size S x S ever reaches
// device memory. Same contract as attention_forward_cuda / attention_backward_cuda (the batched-GEMM
// version in attention.cu, kept for head sizes these kernels do not cover): head-major q, k, v; the
// output token-major; lse per row (+inf for a row without any key).
//
// Backward is two kernels so that every gradient element has one writer (no atomics, deterministic):
//   dK, dV: a block per (sequence, kv head, 64 keys), looping over the group's query heads and the
//           query tiles at or after its keys;  dQ: a block per (sequence, query head, 64 queries),
//           looping over the key tiles at or before them. Both recompute P = exp(S - lse).
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16 row-major: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 "col": b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C 16x8: c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// Two adjacent C tiles (16 columns) are exactly an A fragment, which is how P feeds P V (FA-2).
#include <math.h>

#include "cuda/cuda_util.cuh"

#define FA_TILE 64   // queries per block (forward, dQ); keys per block (dK/dV)
#define FA_INNER 32  // keys per step (forward, dQ); queries per step (dK/dV)
#define FA_LOG2E 1.4426950408889634f

__device__ __forceinline__ void mma16816(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&v;
}
__device__ __forceinline__ uint32_t ld32(const bf16 *p) { return *(const uint32_t *)p; }

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

// rows [r0, r0 + n) of a [S][D] matrix into shared [n][D + 8], zeros past S; all threads take part.
template <int D>
__device__ __forceinline__ void tile_load(bf16 *sh, const bf16 *src, int r0, int n, int S) {
    constexpr int V = D / 8;  // 16-byte vectors per row
    for (int i = threadIdx.x; i < n * V; i += blockDim.x) {
        int r = i / V, c = (i % V) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < S) v = *(const uint4 *)(src + (int64_t)(r0 + r) * D + c);
        *(uint4 *)(sh + r * (D + 8) + c) = v;
    }
}

// ---- forward ---------------------------------------------------------------------------------------

// grid (ceil(S/64), B*Hq), 128 threads: warp w owns queries q0 + 16w .. +16.
template <int D>
__global__ void __launch_bounds__(128) flash_fwd_kernel(bf16 *out, int64_t ld, float *lse, const bf16 *__restrict__ q,
                                                        const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                                                        const int32_t *__restrict__ mask, int S, int Hq, int Hkv,
                                                        float scale) {
    __shared__ __align__(16) bf16 Ks[FA_INNER * (D + 8)];
    __shared__ __align__(16) bf16 Vs[FA_INNER * (D + 8)];
    __shared__ int Ms[FA_INNER];
    int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, kvh = h / (Hq / Hkv);
    int q0 = blockIdx.x * FA_TILE, warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16 *qb = q + ((int64_t)b * Hq + h) * S * D, *kb = k + ((int64_t)b * Hkv + kvh) * S * D,
               *vb = v + ((int64_t)b * Hkv + kvh) * S * D;
    int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;  // this thread's two rows
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        int c = kk * 16 + 2 * t;
        qa[kk][0] = r_lo < S ? ld32(qb + (int64_t)r_lo * D + c) : 0;
        qa[kk][1] = r_hi < S ? ld32(qb + (int64_t)r_hi * D + c) : 0;
        qa[kk][2] = r_lo < S ? ld32(qb + (int64_t)r_lo * D + c + 8) : 0;
        qa[kk][3] = r_hi < S ? ld32(qb + (int64_t)r_hi * D + c + 8) : 0;
    }
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;
    float sl2 = scale * FA_LOG2E;
    int kend = q0 + FA_TILE < S ? q0 + FA_TILE : S;  // causal: keys < the block's last query + 1
    for (int k0 = 0; k0 < kend; k0 += FA_INNER) {
        __syncthreads();
        tile_load<D>(Ks, kb, k0, FA_INNER, S);
        tile_load<D>(Vs, vb, k0, FA_INNER, S);
        if (threadIdx.x < FA_INNER) Ms[threadIdx.x] = k0 + threadIdx.x < S ? mask[(int64_t)b * S + k0 + threadIdx.x] : 0;
        __syncthreads();
        float s[FA_INNER / 8][4];
#pragma unroll
        for (int n = 0; n < FA_INNER / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int n = 0; n < FA_INNER / 8; n += 2)
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t bb[4];
                frag_bt<D>(bb, Ks, n * 8, kk * 16);
                mma16816(s[n], qa[kk], bb[0], bb[1]);
                mma16816(s[n + 1], qa[kk], bb[2], bb[3]);
            }
        // scale into the log2 domain, mask, and the online softmax update
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int n = 0; n < FA_INNER / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + n * 8 + 2 * t + (e & 1), row = e < 2 ? r_lo : r_hi;
                bool ok = key <= row && key < S && Ms[key - k0] != 0;
                s[n][e] = ok ? s[n][e] * sl2 : -INFINITY;
                if (e < 2)
                    mx_lo = fmaxf(mx_lo, s[n][e]);
                else
                    mx_hi = fmaxf(mx_hi, s[n][e]);
            }
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        // a row with no allowed key so far keeps m = -inf: its probabilities are 0, nothing rescales
        float al_lo = mn_lo == -INFINITY ? 1.0f : exp2f(m_lo - mn_lo);
        float al_hi = mn_hi == -INFINITY ? 1.0f : exp2f(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        l_lo *= al_lo;
        l_hi *= al_hi;
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            o[i][0] *= al_lo;
            o[i][1] *= al_lo;
            o[i][2] *= al_hi;
            o[i][3] *= al_hi;
        }
#pragma unroll
        for (int n = 0; n < FA_INNER / 8; n++) {
            s[n][0] = m_lo == -INFINITY ? 0.0f : exp2f(s[n][0] - m_lo);
            s[n][1] = m_lo == -INFINITY ? 0.0f : exp2f(s[n][1] - m_lo);
            s[n][2] = m_hi == -INFINITY ? 0.0f : exp2f(s[n][2] - m_hi);
            s[n][3] = m_hi == -INFINITY ? 0.0f : exp2f(s[n][3] - m_hi);
            l_lo += s[n][0] + s[n][1];
            l_hi += s[n][2] + s[n][3];
        }
        // O += P V: P's C tiles are A fragments; V is B with k = key, n = d
#pragma unroll
        for (int kc = 0; kc < FA_INNER / 16; kc++) {
            uint32_t pa[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                              pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]), pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                uint32_t bb[4];
                frag_b<D>(bb, Vs, kc * 16, dn * 8);
                mma16816(o[dn], pa, bb[0], bb[1]);
                mma16816(o[dn + 1], pa, bb[2], bb[3]);
            }
        }
    }
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f, inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) {
        int c = h * D + dn * 8 + 2 * t;
        if (r_lo < S) *(uint32_t *)(out + ((int64_t)b * S + r_lo) * ld + c) = pack_bf16(o[dn][0] * inv_lo, o[dn][1] * inv_lo);
        if (r_hi < S) *(uint32_t *)(out + ((int64_t)b * S + r_hi) * ld + c) = pack_bf16(o[dn][2] * inv_hi, o[dn][3] * inv_hi);
    }
    if (t == 0) {
        float *L = lse + ((int64_t)b * Hq + h) * S;
        if (r_lo < S) L[r_lo] = l_lo > 0.0f ? m_lo / FA_LOG2E + logf(l_lo) : INFINITY;
        if (r_hi < S) L[r_hi] = l_hi > 0.0f ? m_hi / FA_LOG2E + logf(l_hi) : INFINITY;
    }
}

// ---- backward: dK, dV --------------------------------------------------------------------------------

// grid (ceil(S/64), B*Hkv), 128 threads: warp w owns keys k0 + 16w .. +16. Shared: K, V tiles of the
// block's 64 keys, and per query step Q, dO tiles of 32 queries (dynamic: more than 48 KB for D = 128).
template <int D>
__global__ void __launch_bounds__(128) flash_bwd_dkdv_kernel(float *gk, float *gv, const bf16 *__restrict__ q,
                                                             const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                                                             const bf16 *__restrict__ dO, const float *__restrict__ lse,
                                                             const float *__restrict__ delta,
                                                             const int32_t *__restrict__ mask, int S, int Hq, int Hkv,
                                                             float scale) {
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16 *Ks = (bf16 *)fa_smem, *Vs = Ks + FA_TILE * (D + 8), *Qs = Vs + FA_TILE * (D + 8), *Ds = Qs + FA_INNER * (D + 8);
    float *Ls = (float *)(Ds + FA_INNER * (D + 8)), *Dl = Ls + FA_INNER;
    int bk = blockIdx.y, b = bk / Hkv, kvh = bk % Hkv, group = Hq / Hkv;
    int k0 = blockIdx.x * FA_TILE, warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16 *kb = k + ((int64_t)b * Hkv + kvh) * S * D, *vb = v + ((int64_t)b * Hkv + kvh) * S * D;
    tile_load<D>(Ks, kb, k0, FA_TILE, S);
    tile_load<D>(Vs, vb, k0, FA_TILE, S);
    int key_lo = k0 + warp * 16 + g, key_hi = key_lo + 8;
    bool ok_lo = key_lo < S && mask[(int64_t)b * S + (key_lo < S ? key_lo : 0)] != 0;
    bool ok_hi = key_hi < S && mask[(int64_t)b * S + (key_hi < S ? key_hi : 0)] != 0;
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0;
    float sl2 = scale * FA_LOG2E;
    const bf16 *Kw = Ks + warp * 16 * (D + 8), *Vw = Vs + warp * 16 * (D + 8);
    for (int hh = kvh * group; hh < (kvh + 1) * group; hh++) {
        const bf16 *qb = q + ((int64_t)b * Hq + hh) * S * D, *ob = dO + ((int64_t)b * Hq + hh) * S * D;
        const float *lb = lse + ((int64_t)b * Hq + hh) * S, *db = delta + ((int64_t)b * Hq + hh) * S;
        for (int q0 = k0 - k0 % FA_INNER; q0 < S; q0 += FA_INNER) {  // causal: queries >= the block's keys
            __syncthreads();
            tile_load<D>(Qs, qb, q0, FA_INNER, S);
            tile_load<D>(Ds, ob, q0, FA_INNER, S);
            if (threadIdx.x < FA_INNER) {
                int qq = q0 + threadIdx.x;
                Ls[threadIdx.x] = qq < S ? lb[qq] * FA_LOG2E : INFINITY;
                Dl[threadIdx.x] = qq < S ? db[qq] : 0.0f;
            }
            __syncthreads();
            // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 32 queries
            float st[FA_INNER / 8][4], dpt[FA_INNER / 8][4];
#pragma unroll
            for (int n = 0; n < FA_INNER / 8; n++) {
                st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.0f;
                dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                int c = kk * 16 + 2 * t;
                uint32_t ka[4] = {ld32(Kw + g * (D + 8) + c), ld32(Kw + (g + 8) * (D + 8) + c), ld32(Kw + g * (D + 8) + c + 8),
                                  ld32(Kw + (g + 8) * (D + 8) + c + 8)};
                uint32_t va[4] = {ld32(Vw + g * (D + 8) + c), ld32(Vw + (g + 8) * (D + 8) + c), ld32(Vw + g * (D + 8) + c + 8),
                                  ld32(Vw + (g + 8) * (D + 8) + c + 8)};
#pragma unroll
                for (int n = 0; n < FA_INNER / 8; n += 2) {
                    uint32_t bq[4], bd[4];
                    frag_bt<D>(bq, Qs, n * 8, kk * 16);
                    frag_bt<D>(bd, Ds, n * 8, kk * 16);
                    mma16816(st[n], ka, bq[0], bq[1]);
                    mma16816(st[n + 1], ka, bq[2], bq[3]);
                    mma16816(dpt[n], va, bd[0], bd[1]);
                    mma16816(dpt[n + 1], va, bd[2], bd[3]);
                }
            }
            // P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - delta)
#pragma unroll
            for (int n = 0; n < FA_INNER / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int qi = n * 8 + 2 * t + (e & 1), qq = q0 + qi, key = e < 2 ? key_lo : key_hi;
                    bool ok = (e < 2 ? ok_lo : ok_hi) && key <= qq && qq < S;
                    float p = ok ? exp2f(st[n][e] * sl2 - Ls[qi]) : 0.0f;
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - Dl[qi]);
                }
            // dV += P^T dO;  dK += dS^T Q   (k = query, n = d)
#pragma unroll
            for (int kc = 0; kc < FA_INNER / 16; kc++) {
                uint32_t pa[4] = {pack_bf16(st[2 * kc][0], st[2 * kc][1]), pack_bf16(st[2 * kc][2], st[2 * kc][3]),
                                  pack_bf16(st[2 * kc + 1][0], st[2 * kc + 1][1]),
                                  pack_bf16(st[2 * kc + 1][2], st[2 * kc + 1][3])};
                uint32_t sa[4] = {pack_bf16(dpt[2 * kc][0], dpt[2 * kc][1]), pack_bf16(dpt[2 * kc][2], dpt[2 * kc][3]),
                                  pack_bf16(dpt[2 * kc + 1][0], dpt[2 * kc + 1][1]),
                                  pack_bf16(dpt[2 * kc + 1][2], dpt[2 * kc + 1][3])};
#pragma unroll
                for (int dn = 0; dn < D / 8; dn += 2) {
                    uint32_t bd[4], bq[4];
                    frag_b<D>(bd, Ds, kc * 16, dn * 8);
                    frag_b<D>(bq, Qs, kc * 16, dn * 8);
                    mma16816(dv[dn], pa, bd[0], bd[1]);
                    mma16816(dv[dn + 1], pa, bd[2], bd[3]);
                    mma16816(dk[dn], sa, bq[0], bq[1]);
                    mma16816(dk[dn + 1], sa, bq[2], bq[3]);
                }
            }
        }
    }
    float *gkb = gk + ((int64_t)b * Hkv + kvh) * S * D, *gvb = gv + ((int64_t)b * Hkv + kvh) * S * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) {
        int c = dn * 8 + 2 * t;
        if (key_lo < S) {
            *(float2 *)(gkb + (int64_t)key_lo * D + c) = make_float2(dk[dn][0] * scale, dk[dn][1] * scale);
            *(float2 *)(gvb + (int64_t)key_lo * D + c) = make_float2(dv[dn][0], dv[dn][1]);
        }
        if (key_hi < S) {
            *(float2 *)(gkb + (int64_t)key_hi * D + c) = make_float2(dk[dn][2] * scale, dk[dn][3] * scale);
            *(float2 *)(gvb + (int64_t)key_hi * D + c) = make_float2(dv[dn][2], dv[dn][3]);
        }
    }
}

// ---- backward: dQ ------------------------------------------------------------------------------------

// grid (ceil(S/64), B*Hq), 128 threads: warp w owns queries q0 + 16w .. +16.
template <int D>
__global__ void __launch_bounds__(128) flash_bwd_dq_kernel(float *gq, const bf16 *__restrict__ q,
                                                           const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                                                           const bf16 *__restrict__ dO, const float *__restrict__ lse,
                                                           const float *__restrict__ delta,
                                                           const int32_t *__restrict__ mask, int S, int Hq, int Hkv,
                                                           float scale) {
    __shared__ __align__(16) bf16 Ks[FA_INNER * (D + 8)];
    __shared__ __align__(16) bf16 Vs[FA_INNER * (D + 8)];
    __shared__ int Ms[FA_INNER];
    int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, kvh = h / (Hq / Hkv);
    int q0 = blockIdx.x * FA_TILE, warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16 *qb = q + ((int64_t)b * Hq + h) * S * D, *ob = dO + ((int64_t)b * Hq + h) * S * D;
    const bf16 *kb = k + ((int64_t)b * Hkv + kvh) * S * D, *vb = v + ((int64_t)b * Hkv + kvh) * S * D;
    int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;
    const float *lb = lse + ((int64_t)b * Hq + h) * S, *db = delta + ((int64_t)b * Hq + h) * S;
    float L_lo = r_lo < S ? lb[r_lo] * FA_LOG2E : INFINITY, L_hi = r_hi < S ? lb[r_hi] * FA_LOG2E : INFINITY;
    float D_lo = r_lo < S ? db[r_lo] : 0.0f, D_hi = r_hi < S ? db[r_hi] : 0.0f;
    uint32_t qa[D / 16][4], oa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        int c = kk * 16 + 2 * t;
        qa[kk][0] = r_lo < S ? ld32(qb + (int64_t)r_lo * D + c) : 0;
        qa[kk][1] = r_hi < S ? ld32(qb + (int64_t)r_hi * D + c) : 0;
        qa[kk][2] = r_lo < S ? ld32(qb + (int64_t)r_lo * D + c + 8) : 0;
        qa[kk][3] = r_hi < S ? ld32(qb + (int64_t)r_hi * D + c + 8) : 0;
        oa[kk][0] = r_lo < S ? ld32(ob + (int64_t)r_lo * D + c) : 0;
        oa[kk][1] = r_hi < S ? ld32(ob + (int64_t)r_hi * D + c) : 0;
        oa[kk][2] = r_lo < S ? ld32(ob + (int64_t)r_lo * D + c + 8) : 0;
        oa[kk][3] = r_hi < S ? ld32(ob + (int64_t)r_hi * D + c + 8) : 0;
    }
    float dq[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;
    float sl2 = scale * FA_LOG2E;
    int kend = q0 + FA_TILE < S ? q0 + FA_TILE : S;
    for (int k0 = 0; k0 < kend; k0 += FA_INNER) {
        __syncthreads();
        tile_load<D>(Ks, kb, k0, FA_INNER, S);
        tile_load<D>(Vs, vb, k0, FA_INNER, S);
        if (threadIdx.x < FA_INNER) Ms[threadIdx.x] = k0 + threadIdx.x < S ? mask[(int64_t)b * S + k0 + threadIdx.x] : 0;
        __syncthreads();
        float s[FA_INNER / 8][4], dp[FA_INNER / 8][4];
#pragma unroll
        for (int n = 0; n < FA_INNER / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
        }
#pragma unroll
        for (int n = 0; n < FA_INNER / 8; n += 2)
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t bk[4], bv[4];
                frag_bt<D>(bk, Ks, n * 8, kk * 16);
                frag_bt<D>(bv, Vs, n * 8, kk * 16);
                mma16816(s[n], qa[kk], bk[0], bk[1]);
                mma16816(s[n + 1], qa[kk], bk[2], bk[3]);
                mma16816(dp[n], oa[kk], bv[0], bv[1]);
                mma16816(dp[n + 1], oa[kk], bv[2], bv[3]);
            }
#pragma unroll
        for (int n = 0; n < FA_INNER / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + n * 8 + 2 * t + (e & 1), row = e < 2 ? r_lo : r_hi;
                bool ok = key <= row && key < S && Ms[key - k0] != 0 && row < S;
                float p = ok ? exp2f(s[n][e] * sl2 - (e < 2 ? L_lo : L_hi)) : 0.0f;
                s[n][e] = p * (dp[n][e] - (e < 2 ? D_lo : D_hi));  // dS
            }
        // dQ += dS K   (k = key, n = d)
#pragma unroll
        for (int kc = 0; kc < FA_INNER / 16; kc++) {
            uint32_t sa[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                              pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]), pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                uint32_t bk[4];
                frag_b<D>(bk, Ks, kc * 16, dn * 8);
                mma16816(dq[dn], sa, bk[0], bk[1]);
                mma16816(dq[dn + 1], sa, bk[2], bk[3]);
            }
        }
    }
    float *gqb = gq + ((int64_t)b * Hq + h) * S * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) {
        int c = dn * 8 + 2 * t;
        if (r_lo < S) *(float2 *)(gqb + (int64_t)r_lo * D + c) = make_float2(dq[dn][0] * scale, dq[dn][1] * scale);
        if (r_hi < S) *(float2 *)(gqb + (int64_t)r_hi * D + c) = make_float2(dq[dn][2] * scale, dq[dn][3] * scale);
    }
}

// ---- kernel launchers ---------------------------------------------------------------------------------

extern "C" int flash_attention_supported(int D) { return D == 16 || D == 32 || D == 64 || D == 128; }

template <int D>
static void fwd_launch(cuda_ctx *ctx, bf16 *out, int64_t ldo, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                       const int32_t *mask, int B, int S, int Hq, int Hkv, float scale) {
    dim3 grid((unsigned)((S + FA_TILE - 1) / FA_TILE), (unsigned)(B * Hq));
    flash_fwd_kernel<D><<<grid, 128, 0, ctx->stream>>>(out, ldo, lse, q, k, v, mask, S, Hq, Hkv, scale);
    CUDA_LAUNCH_CHECK();
}

template <int D>
static void bwd_launch(cuda_ctx *ctx, float *gq, float *gk, float *gv, const bf16 *q, const bf16 *k, const bf16 *v,
                       const bf16 *dO, const float *lse, const float *delta, const int32_t *mask, int B, int S, int Hq,
                       int Hkv, float scale) {
    size_t smem = (size_t)(2 * FA_TILE + 2 * FA_INNER) * (D + 8) * 2 + 2 * FA_INNER * sizeof(float);
    static int attr_set = 0;  // per template instance
    if (!attr_set) {
        CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_dkdv_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        attr_set = 1;
    }
    dim3 g1((unsigned)((S + FA_TILE - 1) / FA_TILE), (unsigned)(B * Hkv));
    flash_bwd_dkdv_kernel<D><<<g1, 128, smem, ctx->stream>>>(gk, gv, q, k, v, dO, lse, delta, mask, S, Hq, Hkv, scale);
    CUDA_LAUNCH_CHECK();
    dim3 g2((unsigned)((S + FA_TILE - 1) / FA_TILE), (unsigned)(B * Hq));
    flash_bwd_dq_kernel<D><<<g2, 128, 0, ctx->stream>>>(gq, q, k, v, dO, lse, delta, mask, S, Hq, Hkv, scale);
    CUDA_LAUNCH_CHECK();
}

extern "C" void flash_attention_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, float *lse, const bf16 *q, const bf16 *k,
                                             const bf16 *v, const int32_t *mask, int B, int S, int Hq, int Hkv, int D) {
    MOSFT_ASSERT(Hkv > 0 && Hq % Hkv == 0 && flash_attention_supported(D));
    float scale = (float)(1.0 / sqrt((double)D));
    switch (D) {
    case 16: fwd_launch<16>(ctx, out, ldo, lse, q, k, v, mask, B, S, Hq, Hkv, scale); break;
    case 32: fwd_launch<32>(ctx, out, ldo, lse, q, k, v, mask, B, S, Hq, Hkv, scale); break;
    case 64: fwd_launch<64>(ctx, out, ldo, lse, q, k, v, mask, B, S, Hq, Hkv, scale); break;
    default: fwd_launch<128>(ctx, out, ldo, lse, q, k, v, mask, B, S, Hq, Hkv, scale); break;
    }
}

extern "C" void flash_attention_backward_cuda(cuda_ctx *ctx, float *gq, float *gk, float *gv, const bf16 *dO_heads,
                                              const float *lse, const float *delta, const bf16 *q, const bf16 *k,
                                              const bf16 *v, const int32_t *mask, int B, int S, int Hq, int Hkv, int D) {
    MOSFT_ASSERT(Hkv > 0 && Hq % Hkv == 0 && flash_attention_supported(D));
    float scale = (float)(1.0 / sqrt((double)D));
    switch (D) {
    case 16: bwd_launch<16>(ctx, gq, gk, gv, q, k, v, dO_heads, lse, delta, mask, B, S, Hq, Hkv, scale); break;
    case 32: bwd_launch<32>(ctx, gq, gk, gv, q, k, v, dO_heads, lse, delta, mask, B, S, Hq, Hkv, scale); break;
    case 64: bwd_launch<64>(ctx, gq, gk, gv, q, k, v, dO_heads, lse, delta, mask, B, S, Hq, Hkv, scale); break;
    default: bwd_launch<128>(ctx, gq, gk, gv, q, k, v, dO_heads, lse, delta, mask, B, S, Hq, Hkv, scale); break;
    }
}
