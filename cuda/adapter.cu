// adapter.cu: the adapter's kernels: gathering a layer's effective factors A^i, B^i (bf16) from the
// fp32 parameter buffer (MoS pools, LoRA matrices), scattering the factors' gradients back, and the
// adapter-input dropout (the mask regenerated from the Philox key, as adapter_dropout_mask does on the
// CPU, so forward, recomputation and backward see the same mask without storing it).
//
// The low-rank products themselves are GEMMs issued by the backend (cuda/backend_cuda.cu).
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "cuda/cuda_util.cuh"
#include "cuda/mma.cuh"

// ---- CUDA kernels ----------------------------------------------------------------------------------

// grid (ceil(n_max / 256), n jobs): job blockIdx.y; thread e makes element e of its A (e < r d_in) and
// of its B (e < d_out r).
__global__ void gather_kernel(const lowrank_gather_job *__restrict__ jobs, const float *__restrict__ params) {
    const lowrank_gather_job *jb = jobs + blockIdx.y;
    lowrank_map mp = jb->mp;
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < (int64_t)mp.r * mp.d_in) {
        int k = (int)(e / mp.d_in), col = (int)(e % mp.d_in), sa = mp.d_in / mp.l;
        int j = col / sa, c = col % sa;
        float v = params[mp.offA[k * mp.l + j] + c];
        if (mp.scaleA) v = __fmul_rn(mp.scaleA[k], v);
        jb->A[e] = __float2bfloat16_rn(v);
    }
    if (e < (int64_t)mp.d_out * mp.r) {
        int d = (int)(e / mp.r), k = (int)(e % mp.r), sb = mp.d_out / mp.l;
        int j = d / sb, c = d % sb;
        jb->B[(int64_t)d * mp.ldB + k] =
            __float2bfloat16_rn(__fmul_rn(mp.scaleB, params[mp.offB[k * mp.l + j] + (int64_t)c * mp.strideB]));
    }
}

// The scatters of up to 3 modules of one layer in one launch: grid (blocks, n modules, 2), z = 0 for
// dL/dA, 1 for dL/dB. Every target is written by exactly one thread (distinct indices within a layer,
// and the modules of a group have pools of their own): no atomics.
typedef struct {
    lowrank_map mp[3];
    const float *gA[3], *gB[3];
} scatter_args;

__global__ void scatter_kernel(scatter_args a, float *grad) {
    const lowrank_map &mp = a.mp[blockIdx.y];
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (blockIdx.z == 0) {
        if (e >= (int64_t)mp.r * mp.d_in) return;
        int k = (int)(e / mp.d_in), col = (int)(e % mp.d_in), sa = mp.d_in / mp.l;
        int j = col / sa, c = col % sa;
        float g = a.gA[blockIdx.y][e];
        if (mp.scaleA) g = __fmul_rn(mp.scaleA[k], g);
        float *dst = grad + mp.offA[k * mp.l + j] + c;
        *dst = __fadd_rn(*dst, g);
    } else {
        if (e >= (int64_t)mp.d_out * mp.r) return;
        int d = (int)(e / mp.r), k = (int)(e % mp.r), sb = mp.d_out / mp.l;
        int j = d / sb, c = d % sb;
        float *dst = grad + mp.offB[k * mp.l + j] + (int64_t)c * mp.strideB;
        *dst = __fadd_rn(*dst, a.gB[blockIdx.y][(int64_t)d * mp.ldB + k]);
    }
}

// Dropout kernels: the masks are rng_keep16's (16 bits a decision, eight elements a Philox block).
// dropout_apply: a thread takes four elements (4j .. 4j+3 of the module's T x d_in stream, one row since
// d_in % 4 == 0), half of Philox block j / 2.
__device__ __forceinline__ void keep4(uint64_t key, int64_t j, uint32_t thr, float keep, float m[4]) {
    uint32_t o[4];
    rng_philox4(key, (uint64_t)(j >> 1), o);
    uint32_t w0 = j & 1 ? o[2] : o[0], w1 = j & 1 ? o[3] : o[1];  // elements 4j .. 4j+3: two words' halves
    uint32_t u[4] = {w0 & 0xffffu, w0 >> 16, w1 & 0xffffu, w1 >> 16};
#pragma unroll
    for (int i = 0; i < 4; i++) m[i] = u[i] >= thr ? keep : 0.0f;
}

// The keep bits of n (<= 32) consecutive elements e0 .. e0+n-1 of a mask stream (bit k: element e0 + k):
// four Philox blocks when e0 % 8 == 0, five otherwise.
__device__ __forceinline__ uint32_t keep_bits32(uint64_t key, uint64_t e0, int n, uint32_t thr) {
    uint32_t w = 0;
    for (uint64_t j = e0 >> 3; j <= (e0 + (uint64_t)n - 1) >> 3; j++) {
        uint32_t o[4];
        rng_philox4(key, j, o);
        int base = (int)((int64_t)(j * 8) - (int64_t)e0);  // the bit of the block's element 0 (may be < 0)
#pragma unroll
        for (int k = 0; k < 8; k++) {
            int b = base + k;
            if (b >= 0 && b < n && rng_half16(o, k) >= thr) w |= 1u << b;
        }
    }
    return w;
}

// keep_bits32 of 32 elements from e0 % 8 == 0: four whole Philox blocks, bits 8 j + 2 i and 8 j + 2 i + 1
// from the low and high halves of word i of block j (the high half is >= thr exactly when the word is
// >= thr << 16), without keep_bits32's per-bit range checks.
__device__ __forceinline__ uint32_t keep_bits32_aligned(uint64_t key, uint64_t e0, uint32_t thr) {
    uint32_t w = 0, thr_hi = thr << 16;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        uint32_t o[4];
        rng_philox4(key, (e0 >> 3) + j, o);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w |= (uint32_t)((o[i] & 0xffffu) >= thr) << (8 * j + 2 * i);
            w |= (uint32_t)(o[i] >= thr_hi) << (8 * j + 2 * i + 1);
        }
    }
    return w;
}

// The keep bits of columns c .. c+31 of row t of a T x d_in mask stream (bit k: column c + k; 0 past
// d_in), from the generator (keep_bits32).
__device__ __forceinline__ uint32_t keep_word(uint64_t key, int64_t t, int c, int d_in, uint32_t thr) {
    uint64_t e0 = (uint64_t)(t * d_in + c);
    if ((e0 & 7) == 0 && d_in - c >= 32) return keep_bits32_aligned(key, e0, thr);
    return keep_bits32(key, e0, d_in - c < 32 ? d_in - c : 32, thr);
}

// The masked copies of a group's modules share bf16(x * keep): made once for 32 bf16 of shared memory
// (xk: pairs of columns, 16-byte loads), then each module's copy selects from it (mask_store32).
__device__ __forceinline__ void scale32(uint32_t xk[16], const bf16 *src, float keep) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
        uint4 raw = *(const uint4 *)(src + 8 * e);
        const __nv_bfloat162 *v = (const __nv_bfloat162 *)&raw;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = __bfloat1622float2(v[k]);
            __nv_bfloat162 o = __floats2bfloat162_rn(f.x * keep, f.y * keep);
            xk[4 * e + k] = *(const uint32_t *)&o;
        }
    }
}
// dst[k] = bit k of w ? element k of xk : 0 for 32 bf16 of shared memory (16-byte stores): each bit
// of a pair of columns spread over its half by a shift and an arithmetic shift back.
__device__ __forceinline__ void mask_store32(bf16 *dst, const uint32_t xk[16], uint32_t w) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
        uint32_t o[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int b = 8 * e + 2 * k;
            uint32_t lo = (uint32_t)((int32_t)(w << (31 - b)) >> 31), hi = (uint32_t)((int32_t)(w << (30 - b)) >> 31);
            o[k] = xk[4 * e + k] & ((lo & 0xffffu) | (hi & 0xffff0000u));
        }
        *(uint4 *)(dst + 8 * e) = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

// The four elements of block j are bits 4 (j % 8) .. +3 of mask word j / 8: the eight lanes of a word
// OR their nibbles together and the first writes it (every lane takes part in the shuffles).
__global__ void dropout_apply_kernel(bf16 *xd, const bf16 *__restrict__ x, int64_t ldx, int64_t T, int d_in,
                                     uint64_t key, uint32_t thr, float keep, uint32_t *bits) {
    int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, e = 4 * j;
    uint32_t nib = 0;
    if (e < T * d_in) {
        int64_t t = e / d_in;
        int c = (int)(e % d_in);
        float m[4], v[4];
        keep4(key, j, thr, keep, m);
        load_bf16<4>(x + t * ldx + c, v);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[k] *= m[k];
            nib |= (m[k] != 0.0f ? 1u : 0u) << k;
        }
        store_bf16<4>(xd + e, v);
    }
    if (!bits) return;  // uniform
    uint32_t w = nib << (4 * (threadIdx.x & 7));
    w |= __shfl_xor_sync(0xffffffffu, w, 1);
    w |= __shfl_xor_sync(0xffffffffu, w, 2);
    w |= __shfl_xor_sync(0xffffffffu, w, 4);
    if ((threadIdx.x & 7) == 0 && e < T * d_in) bits[j / 8] = w;
}

// With dropout, a group's input gradient gx += sum_i mask_i * (gh_i A_i) in one pass over gx (instead
// of a GEMM into an fp32 scratch and a masked add per module). Block: 64 rows x 128 columns of gx, 8
// warps in 2 (rows) x 4 (columns), each warp 32 x 32 (2 x 4 mma tiles, cuda/mma.cuh). The rank of each
// module is walked in chunks of 32 (zeros past r) that stream through two shared-memory stages
// (cp.async), and the block's gx tile is fetched into shared memory at the start, so that its read
// overlaps the products instead of following them. Each module's product accumulates in registers on
// the tensor cores (bf16 in, fp32 sums: the same inputs as the fp32 twin), is masked there and added to
// the block's sum, which is added to gx at the end.
// The mask: a lane holds columns c, c+1 of its rows g and g+8; the lane pair (tq even, tq odd) holds
// columns c4 .. c4+3 (c4 = c & ~3), which are two words of one Philox block in each row (eight elements
// a block, d_in % 4 == 0). The even lane evaluates row g's block, the odd lane row g+8's, and each
// sends its partner the word of the partner's columns: one evaluation a lane, as before.
// When the forward kept the module's mask as bits (recompute none), the lane reads them instead: the
// warp's 32 columns of a row are one word.
#define DX_ROWS 64
#define DX_COLS 128
#define DX_KC 32
#define DX_GS (DX_ROWS * (DX_KC + 8))  // bf16 per gh stage
#define DX_AS (DX_KC * (DX_COLS + 8))  // bf16 per A stage
typedef struct {
    uint64_t key[3];
    const uint32_t *bits[3];  // the masks the forward kept (1 bit an element, d_in % 32 == 0), or NULL
} dx_keys;

static size_t dx_smem_bytes(int gx_f32) {
    return 2 * sizeof(bf16) * (DX_GS + DX_AS) + (size_t)DX_ROWS * (DX_COLS * (gx_f32 ? 4 : 2) + 16);
}

// vec: gh and A allow 16-byte copies (r, ldgh, d_in multiples of 8, aligned bases); gvec: gx does.
__global__ void __launch_bounds__(256, 2) lowrank_dropout_dx_kernel(void *gx, int gx_f32, int64_t ldgx, const bf16 *__restrict__ gh,
                                                                 int64_t ldgh, const bf16 *__restrict__ A, int n, int r,
                                                                 int64_t T, int d_in, dx_keys keys, uint32_t thr, float keep,
                                                                 int vec, int gvec) {
    extern __shared__ __align__(16) unsigned char dx_smem[];
    bf16 *Gs = (bf16 *)dx_smem, *As = Gs + 2 * DX_GS;  // [2][64][40], [2][32][136]
    unsigned char *Xs = (unsigned char *)(As + 2 * DX_AS);  // the gx tile: [64][128 * es + 16] bytes
    const int es = gx_f32 ? 4 : 2, xrow = DX_COLS * es + 16;
    const bf16 zero = __float2bfloat16_rn(0.0f);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3, odd = tq & 1;
    int wr = (warp >> 2) * 32, wc = (warp & 3) * 32;
    int64_t r0 = (int64_t)blockIdx.y * DX_ROWS;
    int c0 = blockIdx.x * DX_COLS;
    if (gvec) {  // the gx tile, first: 16-byte pieces (4 fp32 or 8 bf16, never straddling d_in)
        const int per_row = DX_COLS * es / 16;
        for (int v = threadIdx.x; v < DX_ROWS * per_row; v += blockDim.x) {
            int row = v / per_row, cb = (v % per_row) * 16;
            int64_t t = r0 + row;
            bool ok = t < T && c0 + cb / es < d_in;
            cp_async16(Xs + row * xrow + cb, ok ? (const unsigned char *)gx + (t * ldgx + c0) * es + cb : (const unsigned char *)gx,
                       ok);
        }
        cp_commit();
    }
    const int nk = (r + DX_KC - 1) / DX_KC, nq = n * nk;
    auto load = [&](int q) {  // chunk q: module q / nk, ranks k0 .. k0 + 31
        int i = q / nk, k0 = (q % nk) * DX_KC, kc = r - k0 < DX_KC ? r - k0 : DX_KC;
        bf16 *gs = Gs + (q & 1) * DX_GS, *as = As + (q & 1) * DX_AS;
        {  // gh: 64 rows x 32 ranks, one piece of 8 per thread
            int row = threadIdx.x >> 2, kq = (threadIdx.x & 3) * 8;
            int64_t t = r0 + row;
            bf16 *dst = gs + row * (DX_KC + 8) + kq;
            const bf16 *src = gh + t * ldgh + (int64_t)i * r + k0 + kq;
            if (vec)
                cp_async16(dst, t < T && kq < kc ? src : gh, t < T && kq < kc);
            else
                for (int e = 0; e < 8; e++) dst[e] = t < T && kq + e < kc ? src[e] : zero;
        }
        for (int v = threadIdx.x; v < DX_KC * DX_COLS / 8; v += blockDim.x) {  // A: 32 ranks x 128 columns
            int kk = v / (DX_COLS / 8), cq = (v % (DX_COLS / 8)) * 8;
            bf16 *dst = as + kk * (DX_COLS + 8) + cq;
            const bf16 *src = A + ((int64_t)i * r + k0 + kk) * d_in + c0 + cq;
            bool ok = kk < kc && c0 + cq < d_in;
            if (vec)
                cp_async16(dst, ok ? src : A, ok);
            else
                for (int e = 0; e < 8; e++) dst[e] = kk < kc && c0 + cq + e < d_in ? src[e] : zero;
        }
        cp_commit();
    };
    // Kept bits (rows g, g + 8 of each m-tile: the warp's 32 columns are one word) are read one module
    // ahead into registers, so that their latency hides behind the module's products.
    uint32_t wb[2][2] = {};
    auto fetch_bits = [&](int i) {
        const uint32_t *bits = i == 0 ? keys.bits[0] : i == 1 ? keys.bits[1] : keys.bits[2];
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int hl = 0; hl < 2; hl++) {
                int64_t t = r0 + wr + mt * 16 + g + 8 * hl;
                wb[mt][hl] = bits && t < T && c0 + wc < d_in ? bits[(t * d_in + c0 + wc) >> 5] : 0u;
            }
    };
    float out[2][4][4] = {}, acc[2][4][4] = {};
    fetch_bits(0);
    load(0);
    for (int q = 0; q < nq; q++) {
        stage_next(load, q, nq);
        __syncthreads();
        int i = q / nk, kc = r - (q % nk) * DX_KC < DX_KC ? r - (q % nk) * DX_KC : DX_KC;
        const bf16 *gs = Gs + (q & 1) * DX_GS, *as = As + (q & 1) * DX_AS;
        for (int kk = 0; kk < kc; kk += 16) {
            uint32_t a[2][4], b[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) ldsm4(a[mt], gs + (wr + mt * 16 + (lane & 15)) * (DX_KC + 8) + kk + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < 2; np++) {
                int m = lane >> 3;
                ldsm4t(b[np], as + (kk + (m & 1) * 8 + (lane & 7)) * (DX_COLS + 8) + wc + np * 16 + (m >> 1) * 8);
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int np = 0; np < 2; np++) {
                    mma16816(acc[mt][2 * np], a[mt], b[np][0], b[np][1]);
                    mma16816(acc[mt][2 * np + 1], a[mt], b[np][2], b[np][3]);
                }
        }
        __syncthreads();  // the stage is free for chunk q + 2
        if (q % nk != nk - 1) continue;
        const uint32_t *bits = i == 0 ? keys.bits[0] : i == 1 ? keys.bits[1] : keys.bits[2];
        if (bits) {
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                uint32_t w[2] = {wb[mt][0], wb[mt][1]};  // rows g, g + 8: the keep bits of the warp's 32 columns
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    int sh = nt * 8 + 2 * tq;
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        uint32_t kb = (w[e >> 1] >> (sh + (e & 1))) & 1u;
                        out[mt][nt][e] += acc[mt][nt][e] * (kb ? keep : 0.0f);
                        acc[mt][nt][e] = 0.0f;
                    }
                }
            }
            if (i + 1 < n) fetch_bits(i + 1);
            continue;
        }
        uint64_t key = i == 0 ? keys.key[0] : i == 1 ? keys.key[1] : keys.key[2];  // no local copy of keys
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                int c4 = (c0 + wc + nt * 8 + 2 * tq) & ~3;
                int64_t t = r0 + wr + mt * 16 + g + (odd ? 8 : 0);  // the row whose block this lane evaluates
                uint64_t e4 = (uint64_t)(t * d_in + c4);              // the pair's first element in that row
                uint32_t o[4];
                rng_philox4(key, e4 >> 3, o);
                int sub = (int)(e4 & 4) >> 1;  // the pair's words: sub (even lane's columns), sub + 1 (odd's)
                uint32_t w_even = sub ? o[2] : o[0], w_odd = sub ? o[3] : o[1];
                uint32_t x = __shfl_xor_sync(0xffffffffu, odd ? w_even : w_odd, 1);
                uint32_t wg = odd ? x : w_even, wg8 = odd ? w_odd : x;  // this lane's columns in rows g, g + 8
                uint32_t u[4] = {wg & 0xffffu, wg >> 16, wg8 & 0xffffu, wg8 >> 16};
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    out[mt][nt][e] += acc[mt][nt][e] * (u[e] >= thr ? keep : 0.0f);
                    acc[mt][nt][e] = 0.0f;
                }
            }
    }
    if (gvec) {
        cp_wait<0>();
        __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            int cl = wc + nt * 8 + 2 * tq, c = c0 + cl;  // columns c, c + 1 (d_in % 4 == 0: both or neither)
            if (c >= d_in) continue;
#pragma unroll
            for (int hl = 0; hl < 2; hl++) {
                int rl = wr + mt * 16 + g + 8 * hl;
                int64_t t = r0 + rl;
                if (t >= T) continue;
                float a0 = out[mt][nt][2 * hl], a1 = out[mt][nt][2 * hl + 1];
                if (gx_f32) {
                    float2 *p = (float2 *)((float *)gx + t * ldgx + c);
                    float2 v = gvec ? *(const float2 *)(Xs + rl * xrow + cl * 4) : *p;
                    *p = make_float2(v.x + a0, v.y + a1);
                } else {
                    __nv_bfloat162 *p = (__nv_bfloat162 *)((bf16 *)gx + t * ldgx + c);
                    float2 v = __bfloat1622float2(gvec ? *(const __nv_bfloat162 *)(Xs + rl * xrow + cl * 2) : *p);
                    *p = __floats2bfloat162_rn(v.x + a0, v.y + a1);
                }
            }
        }
}

// dL/dA of a group's n modules with dropout in one pass over x (instead of a masked copy of x and a
// split-K GEMM per module): gA[i r + j][c] = sum_t gh[t][i r + j] * bf16(x[t][c] * mask_i[t][c]).
// Block: 64 columns of x (of gA) and a range of 64-token chunks (the splits of T: fp32 partials summed
// in a fixed order afterwards); 4 warps, warp w owns columns 16w .. 16w+15 of every output row (up to 6
// m-tiles of 16: n r <= 96, r % 16 == 0 so that a tile belongs to one module). Per chunk the gh and x
// tiles stream in through two cp.async stages; each module's masked copy of the x tile is made in
// shared memory (a thread takes 32 columns of one row: one mask word from the forward's kept bits, or 4
// Philox blocks; bf16(x * keep) made once for all modules), then the products run on the tensor cores (gh^T and the masked tile both through
// ldmatrix.trans).
#define DA_T 64                  // tokens per chunk
#define DA_C 64                  // columns per block
#define DA_NR 96                 // at most n r
#define DA_XLD (DA_C + 8)        // x and masked tile row stride
typedef struct {
    uint64_t key[3];
    const uint32_t *bits[3];  // kept masks (NULL: the generator)
} da_masks;

// Shared memory by the group's shape, so that groups of one or two modules fit more blocks per
// multiprocessor (the kernel is latency-bound: ncu showed 3 warps a scheduler at the fixed 72.7 KB).
// The gh tile's row stride n r + 8 keeps ldmatrix free of bank conflicts for n r % 16 == 0.
static size_t da_smem_bytes(int n, int NR) {
    return sizeof(bf16) * (size_t)(2 * DA_T * (NR + 8) + (2 + n) * DA_T * DA_XLD);
}

__global__ void __launch_bounds__(128, 4) lowrank_dropout_da_kernel(float *out, int64_t split_stride, const bf16 *__restrict__ gh,
                                                                 int64_t ldgh, const bf16 *__restrict__ x, int64_t ldx, int n,
                                                                 int r, int64_t T, int d_in, da_masks mk, uint32_t thr,
                                                                 float keep, int n_chunks, int splits, int vec) {
    extern __shared__ __align__(16) unsigned char da_smem[];
    const int NR = n * r, n_mt = NR / 16, gper = n_mt * 2;  // m-tiles; 16-byte pieces per gh row
    const int gld = NR + 8;                                  // gh tile row stride (bf16)
    bf16 *Gs = (bf16 *)da_smem;          // [2][64][gld]
    bf16 *Xs = Gs + 2 * DA_T * gld;      // [2][64][DA_XLD]
    bf16 *Ds = Xs + 2 * DA_T * DA_XLD;   // [n][64][DA_XLD]: the masked copies
    const bf16 zero = __float2bfloat16_rn(0.0f);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    int c0 = blockIdx.x * DA_C, s = blockIdx.y;
    int q0 = (int)((int64_t)s * n_chunks / splits), q1 = (int)((int64_t)(s + 1) * n_chunks / splits);
    auto load = [&](int q) {
        int st = (q - q0) & 1;
        int64_t t0 = (int64_t)q * DA_T;
        bf16 *gs = Gs + st * DA_T * gld, *xs = Xs + st * DA_T * DA_XLD;
        for (int v = threadIdx.x; v < DA_T * gper; v += blockDim.x) {  // gh: 64 tokens x n r
            int row = v / gper, cq = (v % gper) * 8;
            int64_t t = t0 + row;
            bf16 *dst = gs + row * gld + cq;
            const bf16 *src = gh + t * ldgh + cq;
            if (vec)
                cp_async16(dst, t < T ? src : gh, t < T);
            else
                for (int e = 0; e < 8; e++) dst[e] = t < T ? src[e] : zero;
        }
        for (int v = threadIdx.x; v < DA_T * DA_C / 8; v += blockDim.x) {  // x: 64 tokens x 64 columns
            int row = v / (DA_C / 8), cq = (v % (DA_C / 8)) * 8;
            int64_t t = t0 + row;
            bf16 *dst = xs + row * DA_XLD + cq;
            const bf16 *src = x + t * ldx + c0 + cq;
            bool ok = t < T && c0 + cq < d_in;
            if (vec)
                cp_async16(dst, ok ? src : x, ok);
            else
                for (int e = 0; e < 8; e++) dst[e] = t < T && c0 + cq + e < d_in ? src[e] : zero;
        }
        cp_commit();
    };
    // The masked copies: a thread takes row tid / 2, columns 32 (tid % 2) .. +31 of the chunk, every
    // module. Kept bits (d_in % 32 == 0, the host's condition: one word a module) are read one chunk
    // ahead into registers, so that their latency hides behind the chunk's products.
    const int mrow = threadIdx.x >> 1, mcb = (threadIdx.x & 1) * 32;
    uint32_t wnext[3] = {0u, 0u, 0u};
    auto fetch_bits = [&](int q) {
        int64_t t = (int64_t)q * DA_T + mrow;
        bool ok = t < T && c0 + mcb < d_in;
#pragma unroll
        for (int i = 0; i < 3; i++) {
            const uint32_t *bits = i == 0 ? mk.bits[0] : i == 1 ? mk.bits[1] : mk.bits[2];
            wnext[i] = i < n && bits && ok ? bits[(t * d_in + c0 + mcb) >> 5] : 0u;
        }
    };
    float acc[6][2][4] = {};
    if (q0 < q1) {
        load(q0);
        fetch_bits(q0);
    }
    for (int q = q0; q < q1; q++) {
        stage_next(load, q, q1);
        __syncthreads();
        int st = (q - q0) & 1;
        const bf16 *gs = Gs + st * DA_T * gld, *xs = Xs + st * DA_T * DA_XLD;
        {
            int64_t t = (int64_t)q * DA_T + mrow;
            uint32_t wcur[3] = {wnext[0], wnext[1], wnext[2]};
            if (q + 1 < q1) fetch_bits(q + 1);
            uint32_t xk[16];
            scale32(xk, xs + mrow * DA_XLD + mcb, keep);
#pragma unroll
            for (int i = 0; i < 3; i++) {
                if (i >= n) break;
                const uint32_t *bits = i == 0 ? mk.bits[0] : i == 1 ? mk.bits[1] : mk.bits[2];
                uint32_t w = wcur[i];  // keep bits of the 32 columns
                if (!bits && t < T && c0 + mcb < d_in) {
                    uint64_t key = i == 0 ? mk.key[0] : i == 1 ? mk.key[1] : mk.key[2];
                    w = keep_word(key, t, c0 + mcb, d_in, thr);
                }
                mask_store32(Ds + i * DA_T * DA_XLD + mrow * DA_XLD + mcb, xk, w);
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < DA_T; kk += 16) {
            uint32_t b[3][4];
            int m = lane >> 3;
#pragma unroll
            for (int i = 0; i < 3; i++)
                if (i < n)
                    ldsm4t(b[i], Ds + i * DA_T * DA_XLD + (kk + (m & 1) * 8 + (lane & 7)) * DA_XLD + warp * 16 + (m >> 1) * 8);
#pragma unroll
            for (int mt = 0; mt < 6; mt++) {
                if (mt >= n_mt) break;
                int i = mt * 16 / r;
                uint32_t a[4], bb[4];
                ldsm4t(a, gs + (kk + (m >> 1) * 8 + (lane & 7)) * gld + mt * 16 + (m & 1) * 8);
#pragma unroll
                for (int k = 0; k < 4; k++) bb[k] = i == 0 ? b[0][k] : i == 1 ? b[1][k] : b[2][k];
                mma16816(acc[mt][0], a, bb[0], bb[1]);
                mma16816(acc[mt][1], a, bb[2], bb[3]);
            }
        }
        __syncthreads();  // the stage and the masked copies are free for the next chunk
    }
    float *o = out + (int64_t)s * split_stride;
#pragma unroll
    for (int mt = 0; mt < 6; mt++) {
        if (mt >= n_mt) break;
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            int c = c0 + warp * 16 + nt * 8 + 2 * tq;  // columns c, c + 1 (d_in % 4 == 0: both or neither)
            if (c >= d_in) continue;
#pragma unroll
            for (int hl = 0; hl < 2; hl++) {
                int j = mt * 16 + g + 8 * hl;
                *(float2 *)(o + (int64_t)j * d_in + c) = make_float2(acc[mt][nt][2 * hl], acc[mt][nt][2 * hl + 1]);
            }
        }
    }
}

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

// h of a group's n modules with dropout in one pass over x (instead of a masked copy of x and a GEMM
// per module): h[t][i r + j] = bf16(sum_c bf16(x[t][c] * mask_i[t][c]) * A_i[j][c]). Block: 64 tokens
// and a range of 64-column chunks of x (the splits of d_in: fp32 partials summed in a fixed order
// afterwards); 4 warps, warp w owns tokens 16w .. 16w+15 and every output column (up to 12 n-tiles).
// Per chunk the x tile and the factors' columns stream in through two cp.async stages; each module's
// masked copy of the x tile is made in shared memory (a thread takes 32 columns of one token: 4 Philox
// blocks, one mask word, which it also writes out as the kept bits when asked; bf16(x * keep) made once
// for all modules), then the products run on the tensor cores.
#define DH_T 64                  // tokens per block
#define DH_K 64                  // columns of x per chunk
#define DH_LD (DH_K + 8)         // row stride of the x tile, the factors' chunk and the masked copies

// Shared memory by the group's shape, as da_smem_bytes.
static size_t dh_smem_bytes(int n, int NR) { return sizeof(bf16) * (size_t)((2 * DH_T + 2 * NR + n * DH_T) * DH_LD); }

__global__ void __launch_bounds__(128, 4) lowrank_dropout_h_kernel(float *part, bf16 *h, int64_t ldh, const bf16 *__restrict__ x,
                                                                int64_t ldx, const bf16 *__restrict__ A, int n, int r,
                                                                int64_t T, int d_in, da_masks mk, uint32_t *bits0,
                                                                uint32_t *bits1, uint32_t *bits2, uint32_t thr, float keep,
                                                                int n_chunks, int splits, int vec) {
    extern __shared__ __align__(16) unsigned char dh_smem[];
    const int NR = n * r, n_np = NR / 16;  // pairs of n-tiles
    bf16 *Xs = (bf16 *)dh_smem;          // [2][64][DH_LD]
    bf16 *As = Xs + 2 * DH_T * DH_LD;    // [2][NR][DH_LD]: A_i's rows, columns of the chunk
    bf16 *Ds = As + 2 * NR * DH_LD;      // [n][64][DH_LD]: the masked copies
    const bf16 zero = __float2bfloat16_rn(0.0f);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    int64_t t0 = (int64_t)blockIdx.x * DH_T;
    int s = blockIdx.y;
    int q0 = (int)((int64_t)s * n_chunks / splits), q1 = (int)((int64_t)(s + 1) * n_chunks / splits);
    auto load = [&](int q) {
        int st = (q - q0) & 1, k0 = q * DH_K;
        bf16 *xs = Xs + st * DH_T * DH_LD, *as = As + st * NR * DH_LD;
        for (int v = threadIdx.x; v < DH_T * DH_K / 8; v += blockDim.x) {  // x: 64 tokens x 64 columns
            int row = v / (DH_K / 8), cq = (v % (DH_K / 8)) * 8;
            int64_t t = t0 + row;
            bf16 *dst = xs + row * DH_LD + cq;
            const bf16 *src = x + t * ldx + k0 + cq;
            bool ok = t < T && k0 + cq < d_in;
            if (vec)
                cp_async16(dst, ok ? src : x, ok);
            else
                for (int e = 0; e < 8; e++) dst[e] = t < T && k0 + cq + e < d_in ? src[e] : zero;
        }
        for (int v = threadIdx.x; v < NR * DH_K / 8; v += blockDim.x) {  // A: n r rows x 64 columns
            int row = v / (DH_K / 8), cq = (v % (DH_K / 8)) * 8;
            bf16 *dst = as + row * DH_LD + cq;
            const bf16 *src = A + (int64_t)row * d_in + k0 + cq;
            bool ok = k0 + cq < d_in;
            if (vec)
                cp_async16(dst, ok ? src : A, ok);
            else
                for (int e = 0; e < 8; e++) dst[e] = k0 + cq + e < d_in ? src[e] : zero;
        }
        cp_commit();
    };
    float acc[12][4] = {};
    if (q0 < q1) load(q0);
    for (int q = q0; q < q1; q++) {
        stage_next(load, q, q1);
        __syncthreads();
        int st = (q - q0) & 1;
        const bf16 *xs = Xs + st * DH_T * DH_LD, *as = As + st * NR * DH_LD;
        {  // the masked copies: token tid / 2, columns 32 (tid % 2) .. +31 of the chunk, every module
            int row = threadIdx.x >> 1, cb = (threadIdx.x & 1) * 32;
            int64_t t = t0 + row;
            int kc = q * DH_K + cb;
            uint32_t xk[16];
            scale32(xk, xs + row * DH_LD + cb, keep);
            for (int i = 0; i < n; i++) {
                uint64_t key = i == 0 ? mk.key[0] : i == 1 ? mk.key[1] : mk.key[2];
                uint32_t *bits = i == 0 ? bits0 : i == 1 ? bits1 : bits2;
                uint32_t w = 0;  // keep bits of the 32 columns
                if (t < T && kc < d_in) {
                    w = keep_word(key, t, kc, d_in, thr);
                    if (bits) bits[(t * d_in + kc) >> 5] = w;  // d_in % 32 == 0 (the host's condition)
                }
                mask_store32(Ds + i * DH_T * DH_LD + row * DH_LD + cb, xk, w);
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < DH_K; kk += 16) {
            uint32_t a[3][4];
#pragma unroll
            for (int i = 0; i < 3; i++)
                if (i < n) ldsm4(a[i], Ds + i * DH_T * DH_LD + (warp * 16 + (lane & 15)) * DH_LD + kk + (lane >> 4) * 8);
            int m = lane >> 3;
#pragma unroll
            for (int np = 0; np < 6; np++) {
                if (np >= n_np) break;
                int i = np * 16 / r;
                uint32_t b[4], aa[4];
                ldsm4(b, as + (np * 16 + (m >> 1) * 8 + (lane & 7)) * DH_LD + kk + (m & 1) * 8);
#pragma unroll
                for (int k = 0; k < 4; k++) aa[k] = i == 0 ? a[0][k] : i == 1 ? a[1][k] : a[2][k];
                mma16816(acc[2 * np], aa, b[0], b[1]);
                mma16816(acc[2 * np + 1], aa, b[2], b[3]);
            }
        }
        __syncthreads();  // the stage and the masked copies are free for the next chunk
    }
#pragma unroll
    for (int nt = 0; nt < 12; nt++) {
        if (nt >= 2 * n_np) break;
        int j = nt * 8 + 2 * tq;  // output columns j, j + 1
        store_acc_rows(acc[nt], part, s, NR, h, ldh, t0 + warp * 16 + g, T, j);
    }
}

// SwiGLU with the adapter product that reads its result, in one pass (instead of the elementwise kernel
// and a skinny GEMM that reads its T x I output again):
//   forward  (the down group, no dropout): a = silu(gate) * up, h = a A^T           A [R][I]
//   backward (the gate|up group):          dgate | dup (in place over gate | up),
//                                          gh = dgate sB_gate + dup sB_up            sB [2I][R]
// where the gate|up group's sB is block-structured: the gate module's r columns (from c_gate) on the
// gate rows, the up module's (from c_up) on the up rows, zeros elsewhere; only those blocks are
// multiplied (with dropout the backward can also add the down module's masked input gradient to the
// output-gradient tile first: swiglu_dx, see its block in the kernel). Block: 64 tokens and a range of
// 64-column chunks of I (the splits: fp32 partials summed in a fixed order afterwards); 8 warps. Per chunk the gate, up (and output-gradient) tiles and the
// factor's chunk stream in through two cp.async stages; each thread makes the elementwise results of 8
// columns at a time (one __expf and one approximate reciprocal an element: with a quarter of the
// elementwise kernel's threads a multiprocessor, exact expf and division made this the bottleneck),
// writes them out and back into the gate / up tiles (bf16: the values a GEMM would read), then the
// products run on the tensor cores: warp w owns tokens 16 (w % 4) .. +15 and, backward, the gate module
// (w < 4) or the up module, forward every other pair of n-tiles.
// ncu (one 7B layer): backward 0.38 ms, forward 0.22 ms (2.4 TB/s; the elementwise kernels alone run at
// ~3.1), 57 % of the issue slots busy at 50 % theoretical occupancy (registers, shared memory):
// latency-bound. Tiles of 32 tokens x 128 columns (256-byte row runs) were no faster (branch
// exp/swiglu-tiles: backward 0.39, forward 0.23). The copy and elementwise loops run a fixed number of
// rounds (SW_NT threads, unrolled): the backward fits 80 registers (103 before) and 3 blocks a
// multiprocessor instead of 2, the forward 64 (4 blocks); ncu, a 3B layer: backward 294 -> 289 us, DRAM
// at 67 % either way (the forward 177 us, unchanged). The kernel moves the bytes of the plain elementwise
// kernels (ncu) at 67 % of DRAM bandwidth against their 89 % (a 3B layer: forward 176 against 130 us,
// backward 288 against 218), and none of these changed that (docs/BENCHMARKS.md, fourteenth session):
// 27 % fewer instructions (each thread's tile rows and columns fixed over the chunks: the same time, so
// not issue-bound), three copy stages instead of two, 4 to 16 splits, an L2 prefetch of 256 bytes a copy
// or of each row's next 8 chunks, splits taking every splits-th chunk (a token block's splits reading
// neighbouring runs together). A probe of the plain kernel walking like this one (64 rows x 64 columns a
// chunk, blocks looping over chunks) lands at 73 % too: the walk itself, many rows open at once, is the cost.
// In the step (CUPTI, a 3B layer): forward 180 us against the elementwise kernel's 133, backward 316
// against 221 (tests/gpu/bench_stream: this walk 162 us, one short pass 135, bands of whole rows 148, on
// random data; zero buffers run slower and mislead). The forward now streams rows where it fits
// (swiglu_rows_forward_kernel, below).
#define SW_T 64           // tokens per block
#define SW_K 64           // columns of I per chunk
#define SW_LD (SW_K + 8)  // row stride of the tiles
#define SW_R 64           // at most R (forward) and r (backward)
#define SW_NT 256         // threads a block

static size_t sw_smem_bytes(int bwd, int R, int r, int dx) {
    size_t tiles = (size_t)(bwd ? 3 : 2) * SW_T * SW_LD;
    size_t fac = bwd ? (size_t)2 * SW_K * (r + 8) : (size_t)R * SW_LD;
    size_t dxb = dx ? (size_t)SW_T * (r + 8) + (size_t)2 * r * SW_LD : 0;  // the gh tile, two stages of A's chunk
    return sizeof(bf16) * (2 * (tiles + fac) + dxb);
}

template <bool BWD>
__global__ void __launch_bounds__(SW_NT, BWD ? 3 : 4) swiglu_lowrank_kernel(float *part, bf16 *gu, int64_t ldgu,
                                                             const bf16 *__restrict__ gout, bf16 *out, int64_t ldo,
                                                             bf16 *h, int64_t ldh, const bf16 *__restrict__ M, int R,
                                                             int r, int c_gate, int c_up, int64_t T, int I,
                                                             int n_chunks, int splits, swiglu_dx dx) {
    extern __shared__ __align__(16) unsigned char sw_smem[];
    constexpr int NX = BWD ? 3 : 2;  // tiles a stage: gate, up (, the output gradient)
    const int FLD = BWD ? r + 8 : SW_LD;            // row stride of the factor's chunk
    const int FN = BWD ? 2 * SW_K * FLD : R * FLD;  // its elements a stage
    bf16 *Xs = (bf16 *)sw_smem;                     // [2][NX][64][SW_LD]
    bf16 *Fs = Xs + 2 * NX * SW_T * SW_LD;          // [2][FN]: A's rows (forward), sB's gate, up blocks (backward)
    const bool DX = BWD && dx.gh != nullptr;        // the down module's masked input gradient rides along
    bf16 *Hd = Fs + 2 * FN;                         // [64][r + 8]: its gh rows of the block's tokens
    bf16 *Ad = Hd + SW_T * (r + 8);                 // [2][r][SW_LD]: its A, the chunk's columns
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    int half = warp >> 2, wr = warp & 3;  // module (backward) or n-tile pairs (forward); the warp's 16 tokens
    int64_t t0 = (int64_t)blockIdx.x * SW_T;
    int s = blockIdx.y;
    int q0 = (int)((int64_t)s * n_chunks / splits), q1 = (int)((int64_t)(s + 1) * n_chunks / splits);
    if (DX && q0 < q1)  // gh of the block's tokens, once (in the first chunk's copy group)
        for (int v = threadIdx.x; v < SW_T * (r / 8); v += blockDim.x) {
            int row = v / (r / 8), cq = (v % (r / 8)) * 8;
            int64_t t = t0 + row;
            cp_async16(Hd + row * (r + 8) + cq, t < T ? dx.gh + t * dx.ldgh + cq : dx.gh, t < T);
        }
    auto load = [&](int q) {
        int st = (q - q0) & 1, k0 = q * SW_K;
        bf16 *xs = Xs + st * NX * SW_T * SW_LD, *fs = Fs + st * FN;
#pragma unroll
        for (int v = threadIdx.x; v < NX * SW_T * (SW_K / 8); v += SW_NT) {  // 64 tokens x 64 columns each
            int x = v / (SW_T * SW_K / 8), row = (v / (SW_K / 8)) % SW_T, cq = (v % (SW_K / 8)) * 8;
            int64_t t = t0 + row;
            bool ok = t < T && k0 + cq < I;
            const bf16 *src = x == 2 ? gout + t * I + k0 + cq : gu + t * ldgu + (x ? I : 0) + k0 + cq;
            cp_async16(xs + (x * SW_T + row) * SW_LD + cq, ok ? src : gu, ok);
        }
        if (BWD) {  // sB rows k0 .. k0+63 of the gate and of the up half, the module's r columns
            int vr = r / 8;
            for (int v = threadIdx.x; v < 2 * SW_K * vr; v += blockDim.x) {
                int m = v / (SW_K * vr), kr = (v / vr) % SW_K, cq = (v % vr) * 8;
                int c = m ? c_up : c_gate;
                bool ok = c >= 0 && k0 + kr < I;
                const bf16 *src = M + ((int64_t)m * I + k0 + kr) * R + c + cq;
                cp_async16(fs + (m * SW_K + kr) * FLD + cq, ok ? src : M, ok);
            }
            if (DX)  // the down module's A, rows 0 .. r-1, columns k0 .. k0+63
                for (int v = threadIdx.x; v < r * (SW_K / 8); v += blockDim.x) {
                    int row = v / (SW_K / 8), cq = (v % (SW_K / 8)) * 8;
                    bool ok = k0 + cq < I;
                    cp_async16(Ad + (st * r + row) * SW_LD + cq, ok ? dx.A + (int64_t)row * I + k0 + cq : dx.A, ok);
                }
        } else {  // A's R rows, columns k0 .. k0+63
            for (int v = threadIdx.x; v < R * (SW_K / 8); v += blockDim.x) {
                int row = v / (SW_K / 8), cq = (v % (SW_K / 8)) * 8;
                bool ok = k0 + cq < I;
                cp_async16(fs + row * FLD + cq, ok ? M + (int64_t)row * I + k0 + cq : M, ok);
            }
        }
        cp_commit();
    };
    float acc[SW_R / 8][4] = {};  // backward: the module's r / 8 n-tiles; forward: 2 of every 4
    if (q0 < q1) load(q0);
    for (int q = q0; q < q1; q++) {
        stage_next(load, q, q1);
        __syncthreads();
        int st = (q - q0) & 1, k0 = q * SW_K;
        bf16 *xs = Xs + st * NX * SW_T * SW_LD;
        const bf16 *fs = Fs + st * FN;
        if (DX) {  // gout += mask * keep * (gh A) on the tile, as lowrank_dropout_dx_kernel (one module, kept bits)
            // warp: tokens 16 wr .., columns 32 half .. of the chunk (one mask word a row), 2 x 2 n-tiles
            int cw = k0 + half * 32;
            uint32_t wb[2];
#pragma unroll
            for (int hl = 0; hl < 2; hl++) {
                int64_t t = t0 + wr * 16 + g + 8 * hl;
                wb[hl] = t < T && cw < I ? dx.bits[(t * I + cw) >> 5] : 0u;
            }
            float ta[4][4] = {};
            const bf16 *ad = Ad + st * r * SW_LD;
            int L = lane, i4 = L >> 3;
            for (int kk = 0; kk < r; kk += 16) {
                uint32_t a[4];
                ldsm4(a, Hd + (wr * 16 + (L & 15)) * (r + 8) + kk + (L >> 4) * 8);
#pragma unroll
                for (int np = 0; np < 2; np++) {
                    uint32_t b[4];  // B[k][n] = A[k][column]: .trans
                    ldsm4t(b, ad + (kk + (i4 & 1) * 8 + (L & 7)) * SW_LD + half * 32 + np * 16 + (i4 >> 1) * 8);
                    mma16816(ta[2 * np], a, b[0], b[1]);
                    mma16816(ta[2 * np + 1], a, b[2], b[3]);
                }
            }
            bf16 *gos = xs + 2 * SW_T * SW_LD;  // the output-gradient tile
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int hl = 0; hl < 2; hl++) {
                    int sh = nt * 8 + 2 * tq;
                    float m0 = (wb[hl] >> sh) & 1u ? dx.keep : 0.0f, m1 = (wb[hl] >> (sh + 1)) & 1u ? dx.keep : 0.0f;
                    __nv_bfloat162 *p = (__nv_bfloat162 *)(gos + (wr * 16 + g + 8 * hl) * SW_LD + half * 32 + sh);
                    float2 v = __bfloat1622float2(*p);  // the same two roundings as the dx kernel's sum
                    *p = __floats2bfloat162_rn(__fadd_rn(v.x, __fmul_rn(ta[nt][2 * hl], m0)),
                                               __fadd_rn(v.y, __fmul_rn(ta[nt][2 * hl + 1], m1)));
                }
            __syncthreads();
        }
#pragma unroll
        for (int v = threadIdx.x; v < SW_T * (SW_K / 8); v += SW_NT) {  // the elementwise part
            int row = v / (SW_K / 8), cq = (v % (SW_K / 8)) * 8;
            int64_t t = t0 + row;
            bf16 *gs = xs + row * SW_LD + cq, *us = gs + SW_T * SW_LD;
            float gf[8], uf[8];
            load_bf16<8>(gs, gf);
            load_bf16<8>(us, uf);
            bool ok = t < T && k0 + cq < I;
            if (BWD) {
                float go[8], dg[8], du[8];
                load_bf16<8>(us + SW_T * SW_LD, go);
#pragma unroll
                for (int k = 0; k < 8; k++) {  // as swiglu_backward_kernel
                    float sg = __fdividef(1.0f, 1.0f + __expf(-gf[k]));
                    dg[k] = go[k] * uf[k] * (sg * (1.0f + gf[k] * (1.0f - sg)));
                    du[k] = go[k] * (gf[k] * sg);
                }
                store_bf16<8>(gs, dg);
                store_bf16<8>(us, du);
                if (ok) {
                    *(uint4 *)(gu + t * ldgu + k0 + cq) = *(const uint4 *)gs;
                    *(uint4 *)(gu + t * ldgu + I + k0 + cq) = *(const uint4 *)us;
                }
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++) gf[k] = gf[k] * __fdividef(1.0f, 1.0f + __expf(-gf[k])) * uf[k];
                store_bf16<8>(gs, gf);
                if (ok) *(uint4 *)(out + t * ldo + k0 + cq) = *(const uint4 *)gs;
            }
        }
        __syncthreads();
        int L = lane, i4 = L >> 3;
#pragma unroll
        for (int kk = 0; kk < SW_K; kk += 16) {
            if (BWD) {
                if ((half ? c_up : c_gate) >= 0) {
                    uint32_t a[4];
                    ldsm4(a, xs + (half * SW_T + wr * 16 + (L & 15)) * SW_LD + kk + (L >> 4) * 8);
                    const bf16 *fm = fs + half * SW_K * FLD;
#pragma unroll
                    for (int np = 0; np < SW_R / 16; np++) {
                        if (np >= r / 16) break;
                        uint32_t b[4];  // B[k][n] = sB chunk [k][n]: .trans
                        ldsm4t(b, fm + (kk + (i4 & 1) * 8 + (L & 7)) * FLD + np * 16 + (i4 >> 1) * 8);
                        mma16816(acc[2 * np], a, b[0], b[1]);
                        mma16816(acc[2 * np + 1], a, b[2], b[3]);
                    }
                }
            } else {
                uint32_t a[4];
                ldsm4(a, xs + (wr * 16 + (L & 15)) * SW_LD + kk + (L >> 4) * 8);
#pragma unroll
                for (int lp = 0; lp < SW_R / 32; lp++) {
                    int np = 2 * lp + half;
                    if (np >= R / 16) break;
                    uint32_t b[4];  // B[k][n] = A[n][k]
                    ldsm4(b, fs + (np * 16 + (i4 >> 1) * 8 + (L & 7)) * FLD + kk + (i4 & 1) * 8);
                    mma16816(acc[2 * lp], a, b[0], b[1]);
                    mma16816(acc[2 * lp + 1], a, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // the stage is free for the chunk after next
    }
#pragma unroll
    for (int nt = 0; nt < SW_R / 8; nt++) {
        int j;  // output column j, j + 1
        if (BWD) {
            int c = half ? c_up : c_gate;
            if (c < 0 || nt >= r / 8) continue;
            j = c + nt * 8 + 2 * tq;
        } else {
            int np = 2 * (nt / 2) + half;  // acc[nt]: pair nt / 2 of this half, n-tile nt % 2 of it
            if (nt >= 4 || np >= R / 16) continue;
            j = np * 16 + (nt % 2) * 8 + 2 * tq;
        }
        store_acc_rows(acc[nt], part, s, R, h, ldh, t0 + wr * 16 + g, T, j);
    }
}

// ---- the forward, streaming whole rows (the default where it fits) -------------------------------------
// swiglu_lowrank_kernel reads 64 tokens x 64 columns a chunk, every token block at once: the GPU keeps
// every row of gu open, 128 bytes of each at a time (tests/gpu/bench_stream: 162 us for what one short
// pass over consecutive rows moves in 135). Here a block owns a slice of SR_W columns of I for the whole
// kernel, with A's rows for them in shared memory, and walks bands of 16 tokens: band gi, gi + G, gi + 2G,
// ... Blocks are numbered slice fastest, so the slices of a band run side by side and the resident
// blocks read a window of G bands of whole rows (bench_stream's bands: 148 us). A band: warp w loads
// columns [32 w, 32 w + 32) of the slice for the 16 rows into registers (the next band's copies are issued
// first, so they are in flight through the rest), makes a = silu(gate) up, writes it out and into a
// shared [16][SR_W] tile (two, alternating by band: one barrier a band), then warp w < R/8 multiplies the
// tile by A's n-tile w over the whole slice (its own output columns: no sum across warps) and writes its
// fp32 partial [slice][t][R]; splitk_sum_cuda adds the slices in order afterwards (deterministic). ncu, a
// 3B layer in the step: 152 us at 80 % of DRAM bandwidth, against swiglu_lowrank_kernel's 169 at 70 %.
// The backward the same way (three inputs, sB's gate and up blocks transposed in shared memory: 66 KB)
// was slower than the tiles in every arrangement tried, ncu 314-323 against 279 us: the 16-32 warps that
// fit a multiprocessor cannot hide its loads, exponentials and shared-memory traffic (docs/BENCHMARKS.md,
// seventeenth session).
#define SR_W 512           // columns of I a block's slice
#define SR_NT 512          // 16 warps, 32 columns of the slice each
#define SR_R 64            // at most R
#define SR_LD (SR_W + 8)   // row stride of A's rows and of the tiles (ldmatrix and 4-byte loads without bank conflicts)

static size_t sr_smem_bytes(int R) { return sizeof(bf16) * SR_LD * ((size_t)R + 2 * 16); }

__global__ void __launch_bounds__(SR_NT, 2) swiglu_rows_forward_kernel(float *part, const bf16 *__restrict__ gu,
                                                                       int64_t ldgu, bf16 *out, int64_t ldo, bf16 *h,
                                                                       int64_t ldh, const bf16 *__restrict__ A, int R,
                                                                       int64_t T, int I, int S, int G) {
    extern __shared__ __align__(16) unsigned char sw_smem[];
    bf16 *Fs = (bf16 *)sw_smem;  // [R][SR_LD]: A's row n, the slice's columns
    bf16 *As = Fs + R * SR_LD;   // [2 bands][16][SR_LD]: a
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    int s = blockIdx.x % S, gi = blockIdx.x / S, f0 = s * SR_W;
    for (int v = threadIdx.x; v < R * (SR_W / 8); v += SR_NT) {
        int n = v / (SR_W / 8), fl = (v % (SR_W / 8)) * 8, f = f0 + fl;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (f < I) x = *(const uint4 *)(A + (int64_t)n * I + f);  // I % 8 == 0: a vector is in or out whole
        *(uint4 *)(Fs + n * SR_LD + fl) = x;
    }
    const int64_t nb = (T + 15) / 16;
    const int fl = warp * 32 + 8 * c, f = f0 + fl;  // the lane's 8 columns (in the slice, in I)
    uint4 x[2][2], xn[2][2];  // [gate, up][row g, g + 8] of this band and of the next, zero outside T x I
    auto load = [&](uint4 (&y)[2][2], int64_t band) {
#pragma unroll
        for (int hl = 0; hl < 2; hl++) {
            int64_t t = band * 16 + g + 8 * hl;
            bool ok = band < nb && t < T && f < I;
            const bf16 *p = gu + t * ldgu + f;
            y[0][hl] = ok ? *(const uint4 *)p : make_uint4(0, 0, 0, 0);
            y[1][hl] = ok ? *(const uint4 *)(p + I) : make_uint4(0, 0, 0, 0);
        }
    };
    load(x, gi);
    int buf = 0;
    for (int64_t band = gi; band < nb; band += G, buf ^= 1) {
        int64_t t0 = band * 16;
        load(xn, band + G);  // in flight through this band's work
        bf16 *at = As + buf * 16 * SR_LD;
#pragma unroll
        for (int hl = 0; hl < 2; hl++) {  // as swiglu_lowrank_kernel's (the same expressions: the same bits)
            int64_t t = t0 + g + 8 * hl;
            float gf[8], uf[8];
            load_bf16<8>((const bf16 *)&x[0][hl], gf);
            load_bf16<8>((const bf16 *)&x[1][hl], uf);
#pragma unroll
            for (int k = 0; k < 8; k++) gf[k] = gf[k] * __fdividef(1.0f, 1.0f + __expf(-gf[k])) * uf[k];
            bf16 *ar = at + (g + 8 * hl) * SR_LD + fl;
            store_bf16<8>(ar, gf);  // zeros outside T x I, which the product then adds
            if (t < T && f < I) *(uint4 *)(out + t * ldo + f) = *(const uint4 *)ar;
        }
        __syncthreads();  // the band's tile is whole, and the one of two bands ago free (every warp is past it)
        if (warp < R / 8) {  // output columns 8 warp .. of the band's 16 rows, over the slice
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const bf16 *fr = Fs + (warp * 8 + g) * SR_LD + 2 * c;
            int kmax = I - f0 < SR_W ? (I - f0 + 15) / 16 * 16 : SR_W;  // a short last slice
            for (int kk = 0; kk < kmax; kk += 16) {
                uint32_t a[4];
                ldsm4(a, at + (lane & 15) * SR_LD + kk + (lane >> 4) * 8);
                mma16816(acc, a, ld32(fr + kk), ld32(fr + kk + 8));
            }
            int oc = warp * 8 + 2 * c;
#pragma unroll
            for (int hl = 0; hl < 2; hl++) {
                int64_t t = t0 + g + 8 * hl;
                if (t >= T) continue;
                if (part)
                    *(float2 *)(part + ((int64_t)s * T + t) * R + oc) = make_float2(acc[2 * hl], acc[2 * hl + 1]);
                else
                    *(__nv_bfloat162 *)(h + t * ldh + oc) = __floats2bfloat162_rn(acc[2 * hl], acc[2 * hl + 1]);
            }
        }
#pragma unroll
        for (int i = 0; i < 2; i++) x[i][0] = xn[i][0], x[i][1] = xn[i][1];
    }
}

// ---- the maps, on the host ------------------------------------------------------------------------

extern "C" int lowrank_map_shards(const adapter *ad) { return !strcmp(ad->spec.method, "mos") ? ad->spec.shards : 1; }

extern "C" int lowrank_map_host(const adapter *ad, int layer, int module, int64_t *offA, int64_t *offB, float *scale,
                                int *has_scale, int *l_out, int *strideB) {
    int r = ad->rank, di, dout;
    llama_module_dims(&ad->model, module, &di, &dout);
    char name[ADAPTER_NAME_MAX];
    const char *mn = k_module_names[module];
    *has_scale = 0;
    if (!strcmp(ad->spec.method, "mos")) {
        int l = ad->spec.shards, sa = di / l, sb = dout / l;
        snprintf(name, sizeof name, "mos.%s.pool_A", mn);
        const adapter_tensor *pa = adapter_find_tensor(ad, name);
        snprintf(name, sizeof name, "mos.%s.pool_B", mn);
        const adapter_tensor *pb = adapter_find_tensor(ad, name);
        snprintf(name, sizeof name, "mos.%s.index_A", mn);
        const adapter_buffer *ia = adapter_find_buffer(ad, name);
        snprintf(name, sizeof name, "mos.%s.index_B", mn);
        const adapter_buffer *ib = adapter_find_buffer(ad, name);
        snprintf(name, sizeof name, "mos.%s.scale", mn);
        const adapter_buffer *sc = adapter_find_buffer(ad, name);
        MOSFT_ASSERT(pa && pb && ia && ib);
        const int32_t *ta = (const int32_t *)ia->data + (size_t)layer * r * l;
        const int32_t *tb = (const int32_t *)ib->data + (size_t)layer * r * l;
        for (int e = 0; e < r * l; e++) {
            offA[e] = (int64_t)pa->offset + (int64_t)ta[e] * sa;
            offB[e] = (int64_t)pb->offset + (int64_t)tb[e] * sb;
        }
        if (sc) {
            memcpy(scale, (const float *)sc->data + (size_t)layer * r, sizeof(float) * (size_t)r);
            *has_scale = 1;
        }
        *l_out = l;
        *strideB = 1;
        return MOSFT_OK;
    }
    if (!strcmp(ad->spec.method, "lora")) {
        snprintf(name, sizeof name, "lora.layers.%d.%s.A", layer, mn);
        const adapter_tensor *A = adapter_find_tensor(ad, name);
        snprintf(name, sizeof name, "lora.layers.%d.%s.B", layer, mn);
        const adapter_tensor *B = adapter_find_tensor(ad, name);
        MOSFT_ASSERT(A && B);
        for (int k = 0; k < r; k++) {
            offA[k] = (int64_t)A->offset + (int64_t)k * di;
            offB[k] = (int64_t)B->offset + k;
        }
        *l_out = 1;
        *strideB = r;
        return MOSFT_OK;
    }
    return mosft_fail_hint(MOSFT_ERR_INPUT, "use device \"cpu\" (--set device=cpu) for this method",
                           "adapter.method: the CUDA backend trains \"mos\" and \"lora\", got \"%s\"", ad->spec.method);
}

// ---- kernel launchers ---------------------------------------------------------------------------------

extern "C" void lowrank_gather_batch_cuda(cuda_ctx *ctx, const lowrank_gather_job *jobs, int n, int64_t n_max,
                                          const float *params) {
    if (n <= 0) return;
    MOSFT_ASSERT(n <= 65535);
    gather_kernel<<<dim3(ceil_div_i(n_max, 256), (unsigned)n), 256, 0, ctx->stream>>>(jobs, params);
    CUDA_LAUNCH_CHECK();
}

extern "C" int adapter_block_pieces(weight_piece *p, bf16 *buf, int64_t ld, int d_in, int d_out, const bf16 *B,
                                    const bf16 *A, int R) {
    p[0] = (weight_piece){NULL, B, R, d_out, R, buf + d_in};             // sB beside W's rows
    p[1] = (weight_piece){NULL, A, d_in, R, d_in, buf + (int64_t)d_out * ld};  // A below them
    return 2;
}

extern "C" void adapter_blocks_cuda(cudaStream_t st, bf16 *buf, int64_t ld, int d_in, int d_out, const bf16 *B,
                                    const bf16 *A, int R) {
    weight_piece p[2];
    weight_group_fill_cuda(st, p, adapter_block_pieces(p, buf, ld, d_in, d_out, B, A, R), ld);
}

extern "C" void lowrank_scatter_group_cuda(cuda_ctx *ctx, const lowrank_map *mp, int n, const float *const *gA,
                                          const float *const *gB, float *grad) {
    MOSFT_ASSERT(n >= 1 && n <= 3);
    scatter_args a;
    memset(&a, 0, sizeof a);
    int64_t most = 0;
    for (int i = 0; i < n; i++) {
        a.mp[i] = mp[i];
        a.gA[i] = gA[i];
        a.gB[i] = gB[i];
        int64_t na = (int64_t)mp[i].r * mp[i].d_in, nb = (int64_t)mp[i].d_out * mp[i].r;
        most = na > most ? na : most;
        most = nb > most ? nb : most;
    }
    scatter_kernel<<<dim3(ceil_div_i(most, 256), (unsigned)n, 2), 256, 0, ctx->stream>>>(a, grad);
    CUDA_LAUNCH_CHECK();
}

extern "C" void lowrank_scatter_cuda(cuda_ctx *ctx, const lowrank_map *mp, const float *gA, const float *gB, float *grad) {
    lowrank_scatter_group_cuda(ctx, mp, 1, &gA, &gB, grad);
}

extern "C" int64_t dropout_mask_words(int64_t T, int d_in) { return (T * d_in + 31) / 32; }

extern "C" void dropout_apply_cuda(cuda_ctx *ctx, bf16 *xd, const bf16 *x, int64_t ldx, int64_t T, int d_in, uint64_t key,
                                   uint32_t thr, float keep, uint32_t *bits) {
    int64_t n = T * d_in;
    if (n == 0) return;
    MOSFT_ASSERT(d_in % 4 == 0 && ldx % 4 == 0);
    dropout_apply_kernel<<<ceil_div_i(n / 4, 256), 256, 0, ctx->stream>>>(xd, x, ldx, T, d_in, key, thr, keep, bits);
    CUDA_LAUNCH_CHECK();
}

// Splits of the reduced dimension for a grid of `tiles` x splits blocks of `threads` threads with smem bytes
// of shared memory (the kernel's limit raised to smem_max once): as many as one wave of resident blocks
// holds (the fused dropout and SwiGLU kernels are latency-bound, so every resident slot counts, and a second,
// partial wave would only add a tail), at most n_chunks and 16, and while more than one, each split's
// split_floats of fp32 partials within part's part_floats.
template <class K>
static int wave_splits(const cuda_ctx *ctx, K kernel, size_t smem_max, size_t smem, int tiles, int n_chunks,
                       size_t split_floats, const float *part, size_t part_floats, int threads = 128) {
    static const void *attr_set[8];  // the kernels whose limit is raised (above the 48 KiB default)
    int k = 0;
    while (k < 8 && attr_set[k] && attr_set[k] != (const void *)kernel) k++;
    MOSFT_ASSERT(k < 8);
    if (!attr_set[k]) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_max));
        attr_set[k] = (const void *)kernel;
    }
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    int splits = per_sm * ctx->sm_count / tiles;
    if (splits > n_chunks) splits = n_chunks;
    if (splits > 16) splits = 16;
    while (splits > 1 && (!part || (size_t)splits * split_floats > part_floats)) splits--;
    return splits < 1 ? 1 : splits;
}

extern "C" int lowrank_dropout_fused_fits(int n, int r) { return n >= 1 && n <= 3 && r % 16 == 0 && n * r <= DA_NR; }

extern "C" void lowrank_dropout_h_cuda(cuda_ctx *ctx, bf16 *h, int64_t ldh, const bf16 *x, int64_t ldx, const bf16 *A, int n,
                                       int r, int64_t T, int d_in, const uint64_t *keys, uint32_t thr, float keep,
                                       uint32_t *const *bits, float *part, size_t part_floats) {
    MOSFT_ASSERT(lowrank_dropout_fused_fits(n, r) && d_in % 4 == 0 && ldh % 2 == 0 && (!bits || d_in % 32 == 0));
    if (T == 0) return;
    int64_t NR = (int64_t)n * r;
    da_masks mk;
    memset(&mk, 0, sizeof mk);
    for (int i = 0; i < n; i++) mk.key[i] = keys[i];
    uint32_t *b[3] = {NULL, NULL, NULL};
    for (int i = 0; bits && i < n; i++) b[i] = bits[i];
    int vec = ldx % 8 == 0 && d_in % 8 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)A % 16 == 0;
    // splits of d_in: one wave of resident blocks, within the partials' room
    size_t smem = dh_smem_bytes(n, (int)NR);
    int rows = ceil_div_i(T, DH_T), n_chunks = ceil_div_i(d_in, DH_K);
    int splits = wave_splits(ctx, lowrank_dropout_h_kernel, dh_smem_bytes(3, DA_NR), smem, rows, n_chunks,
                             (size_t)(T * NR), part, part_floats);
    dim3 grid((unsigned)rows, (unsigned)splits);
    lowrank_dropout_h_kernel<<<grid, 128, smem, ctx->stream>>>(splits > 1 ? part : NULL, h, ldh, x, ldx, A, n, r, T,
                                                                         d_in, mk, b[0], b[1], b[2], thr, keep, n_chunks,
                                                                         splits, vec);
    CUDA_LAUNCH_CHECK();
    if (splits > 1) splitk_sum_cuda(ctx, part, splits, T, NR, h, ldh, GEMM_BF16);
}

extern "C" void lowrank_dropout_da_cuda(cuda_ctx *ctx, float *gA, const bf16 *gh, int64_t ldgh, const bf16 *x, int64_t ldx,
                                        int n, int r, int64_t T, int d_in, const uint64_t *keys, uint32_t thr, float keep,
                                        const uint32_t *const *bits, float *part, size_t part_floats) {
    MOSFT_ASSERT(lowrank_dropout_fused_fits(n, r) && d_in % 4 == 0 && (!bits || d_in % 32 == 0));
    int64_t NR = (int64_t)n * r;
    if (T == 0) {
        CUDA_CHECK(cudaMemsetAsync(gA, 0, sizeof(float) * (size_t)(NR * d_in), ctx->stream));
        return;
    }
    da_masks mk;
    memset(&mk, 0, sizeof mk);
    for (int i = 0; i < n; i++) {
        mk.key[i] = keys[i];
        mk.bits[i] = bits ? bits[i] : NULL;
    }
    int vec = ldgh % 8 == 0 && ldx % 8 == 0 && d_in % 8 == 0 && (uintptr_t)gh % 16 == 0 && (uintptr_t)x % 16 == 0;
    // splits of T: one wave of resident blocks, within the partials' room
    size_t smem = da_smem_bytes(n, (int)NR);
    int tiles = ceil_div_i(d_in, DA_C), n_chunks = ceil_div_i(T, DA_T);
    int splits = wave_splits(ctx, lowrank_dropout_da_kernel, da_smem_bytes(3, DA_NR), smem, tiles, n_chunks,
                             (size_t)(NR * d_in), part, part_floats);
    float *dst = splits > 1 ? part : gA;
    dim3 grid((unsigned)tiles, (unsigned)splits);
    lowrank_dropout_da_kernel<<<grid, 128, smem, ctx->stream>>>(dst, NR * d_in, gh, ldgh, x, ldx, n, r, T, d_in,
                                                                          mk, thr, keep, n_chunks, splits, vec);
    CUDA_LAUNCH_CHECK();
    if (splits > 1) splitk_sum_cuda(ctx, part, splits, NR, d_in, gA, d_in, GEMM_F32);
}

extern "C" void lowrank_dropout_dx_cuda(cuda_ctx *ctx, void *gx, int gx_f32, int64_t ldgx, const bf16 *gh, int64_t ldgh,
                                        const bf16 *A, int n, int r, int64_t T, int d_in, const uint64_t *keys,
                                        uint32_t thr, float keep, const uint32_t *const *bits) {
    if (T == 0 || n == 0) return;
    MOSFT_ASSERT(n >= 1 && n <= 3 && d_in % 4 == 0 && ldgx % 4 == 0 && (!bits || d_in % 32 == 0));
    dx_keys k;
    memset(&k, 0, sizeof k);
    for (int i = 0; i < n; i++) {
        k.key[i] = keys[i];
        k.bits[i] = bits ? bits[i] : NULL;
        MOSFT_ASSERT(!bits || bits[i]);  // all or none: the kernel reads the next module's bits ahead
    }
    // 16-byte copies where every row and module offset keeps them aligned
    int vec = r % 8 == 0 && ldgh % 8 == 0 && d_in % 8 == 0 && (uintptr_t)gh % 16 == 0 && (uintptr_t)A % 16 == 0;
    int gvec = (uintptr_t)gx % 16 == 0 && (gx_f32 || (ldgx % 8 == 0 && d_in % 8 == 0));
    size_t smem = dx_smem_bytes(gx_f32);
    static int attr_set = 0;
    if (!attr_set) {  // above the 48 KiB default (fp32 tile: 60 KiB)
        CUDA_CHECK(cudaFuncSetAttribute(lowrank_dropout_dx_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)dx_smem_bytes(1)));
        attr_set = 1;
    }
    dim3 grid((unsigned)ceil_div_i(d_in, DX_COLS), (unsigned)ceil_div_i(T, DX_ROWS));
    lowrank_dropout_dx_kernel<<<grid, 256, smem, ctx->stream>>>(gx, gx_f32, ldgx, gh, ldgh, A, n, r, T, d_in, k, thr, keep,
                                                                vec, gvec);
    CUDA_LAUNCH_CHECK();
}

// The streaming-rows forward where it fits (R <= SR_R, room for the slices' partials unless one slice
// covers I); swiglu_lowrank_use_rows(0) or MOSFT_SWIGLU_ROWS=0 keeps swiglu_lowrank_kernel.
static int g_rows = -1;
extern "C" void swiglu_lowrank_use_rows(int on) { g_rows = on ? 1 : 0; }
static int rows_on(void) {
    if (g_rows < 0) {
        const char *e = getenv("MOSFT_SWIGLU_ROWS");
        g_rows = !(e && !strcmp(e, "0"));
    }
    return g_rows;
}
extern "C" size_t swiglu_rows_part_floats(int64_t T, int I, int R) {
    return (size_t)ceil_div_i(I, SR_W) * (size_t)(T * R);
}

static int swiglu_rows_forward(cuda_ctx *ctx, float *part, size_t part_floats, const bf16 *gu, int64_t ldgu, bf16 *out,
                               int64_t ldo, bf16 *h, int64_t ldh, const bf16 *A, int R, int64_t T, int I) {
    int S = ceil_div_i(I, SR_W);
    if (!rows_on() || R > SR_R || (S > 1 && (!part || swiglu_rows_part_floats(T, I, R) > part_floats))) return 0;
    size_t smem = sr_smem_bytes(R);
    static int attr_set = 0;
    if (!attr_set) {
        CUDA_CHECK(cudaFuncSetAttribute(swiglu_rows_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)sr_smem_bytes(SR_R)));
        attr_set = 1;
    }
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, swiglu_rows_forward_kernel, SR_NT, smem));
    int64_t nb = (T + 15) / 16, G = (int64_t)(per_sm > 0 ? per_sm : 1) * ctx->sm_count / S;
    if (G < 1) G = 1;
    if (G > nb) G = nb;
    swiglu_rows_forward_kernel<<<(unsigned)(S * G), SR_NT, smem, ctx->stream>>>(S > 1 ? part : NULL, gu, ldgu, out, ldo,
                                                                               h, ldh, A, R, T, I, S, (int)G);
    CUDA_LAUNCH_CHECK();
    if (S > 1) splitk_sum_cuda(ctx, part, S, T, R, h, ldh, GEMM_BF16);
    return 1;
}

extern "C" int swiglu_lowrank_fits(int bwd, int I, int64_t ldgu, int R, int r) {
    return I % 8 == 0 && ldgu % 8 == 0 && R % 16 == 0 && r % 16 == 0 && r >= 16 && r <= SW_R &&
           R <= (bwd ? 3 * SW_R : SW_R);
}

// The chunks of I split over blocks.y (fp32 partials [splits][T][R] summed in order), one wave as the
// dropout kernels.
template <bool BWD>
static void swiglu_lowrank_launch(cuda_ctx *ctx, float *part, size_t part_floats, bf16 *gu, int64_t ldgu,
                                  const bf16 *gout, bf16 *out, int64_t ldo, bf16 *h, int64_t ldh, const bf16 *M, int R,
                                  int r, int c_gate, int c_up, int64_t T, int I, const swiglu_dx *dx) {
    const swiglu_dx none = {};
    size_t smem = sw_smem_bytes(BWD, R, r, dx != NULL);
    int rows = ceil_div_i(T, SW_T), n_chunks = ceil_div_i(I, SW_K);
    int splits = wave_splits(ctx, swiglu_lowrank_kernel<BWD>,
                             BWD ? sw_smem_bytes(1, 0, SW_R, 1) : sw_smem_bytes(0, SW_R, 0, 0), smem, rows, n_chunks,
                             (size_t)(T * R), part, part_floats, SW_NT);
    dim3 grid((unsigned)rows, (unsigned)splits);
    swiglu_lowrank_kernel<BWD><<<grid, SW_NT, smem, ctx->stream>>>(splits > 1 ? part : NULL, gu, ldgu, gout, out, ldo, h,
                                                                 ldh, M, R, r, c_gate, c_up, T, I, n_chunks, splits,
                                                                 dx ? *dx : none);
    CUDA_LAUNCH_CHECK();
    if (splits > 1) splitk_sum_cuda(ctx, part, splits, T, R, h, ldh, GEMM_BF16);
}

extern "C" void swiglu_lowrank_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, bf16 *h, int64_t ldh, const bf16 *gu,
                                            int64_t ldgu, const bf16 *A, int R, int64_t T, int I, float *part,
                                            size_t part_floats) {
    MOSFT_ASSERT(swiglu_lowrank_fits(0, I, ldgu, R, 16) && ldo % 8 == 0 && ldh % 2 == 0);
    MOSFT_ASSERT((uintptr_t)gu % 16 == 0 && (uintptr_t)out % 16 == 0 && (uintptr_t)A % 16 == 0);
    if (T == 0) return;
    if (swiglu_rows_forward(ctx, part, part_floats, gu, ldgu, out, ldo, h, ldh, A, R, T, I)) return;
    swiglu_lowrank_launch<false>(ctx, part, part_floats, (bf16 *)gu, ldgu, NULL, out, ldo, h, ldh, A, R, 0, -1, -1, T, I,
                                 NULL);
}

extern "C" int swiglu_dx_fits(int I, int r, int64_t ldgh, const void *gh, const void *A) {
    return I % 32 == 0 && r % 16 == 0 && r >= 16 && r <= SW_R && ldgh % 8 == 0 && (uintptr_t)gh % 16 == 0 &&
           (uintptr_t)A % 16 == 0;
}

extern "C" void swiglu_lowrank_backward_cuda(cuda_ctx *ctx, bf16 *gu, int64_t ldgu, const bf16 *gout, bf16 *gh, int64_t ldh,
                                             const bf16 *B, int R, int r, int c_gate, int c_up, int64_t T, int I,
                                             float *part, size_t part_floats, const swiglu_dx *dx) {
    MOSFT_ASSERT(swiglu_lowrank_fits(1, I, ldgu, R, r) && ldh % 2 == 0 && (c_gate >= 0 || c_up >= 0));
    MOSFT_ASSERT(!dx || (swiglu_dx_fits(I, r, dx->ldgh, dx->gh, dx->A) && dx->bits));
    MOSFT_ASSERT((c_gate < 0 || (c_gate % 8 == 0 && c_gate + r <= R)) && (c_up < 0 || (c_up % 8 == 0 && c_up + r <= R)));
    MOSFT_ASSERT((uintptr_t)gu % 16 == 0 && (uintptr_t)gout % 16 == 0 && (uintptr_t)B % 16 == 0);
    if (T == 0) return;
    swiglu_lowrank_launch<true>(ctx, part, part_floats, gu, ldgu, gout, NULL, 0, gh, ldh, B, R, r, c_gate, c_up, T, I, dx);
}
