// adapter.cu: the adapter's kernels: gathering a layer's effective factors A^i, B^i (bf16) from the
// fp32 parameter buffer (MoS pools, LoRA matrices), scattering the factors' gradients back, and the
// adapter-input dropout (the mask regenerated from the Philox key, as adapter_dropout_mask does on the
// CPU, so forward, recomputation and backward see the same mask without storing it).
//
// The low-rank products themselves are GEMMs issued by the backend (cuda/backend_cuda.cu).
#include <string.h>

#include "core/rng.h"
#include "cuda/cuda_util.cuh"
#include "cuda/lowrank_split.cuh"
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
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
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
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
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
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
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
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
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
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
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
    launch_pdl(scatter_kernel, dim3(ceil_div_i(most, 256), (unsigned)n, 2), dim3(256), 0, ctx->stream, a, grad);
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
    launch_pdl(dropout_apply_kernel, dim3(ceil_div_i(n / 4, 256)), dim3(256), 0, ctx->stream, xd, x, ldx, T, d_in, key,
               thr, keep, bits);
    CUDA_LAUNCH_CHECK();
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
    launch_pdl(lowrank_dropout_h_kernel, grid, dim3(128), smem, ctx->stream, splits > 1 ? part : NULL, h, ldh, x, ldx,
               A, n, r, T, d_in, mk, b[0], b[1], b[2], thr, keep, n_chunks, splits, vec);
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
    launch_pdl(lowrank_dropout_da_kernel, grid, dim3(128), smem, ctx->stream, dst, NR * d_in, gh, ldgh, x, ldx, n, r, T,
               d_in, mk, thr, keep, n_chunks, splits, vec);
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
    launch_pdl(lowrank_dropout_dx_kernel, grid, dim3(256), smem, ctx->stream, gx, gx_f32, ldgx, gh, ldgh, A, n, r, T,
               d_in, k, thr, keep, vec, gvec);
    CUDA_LAUNCH_CHECK();
}
