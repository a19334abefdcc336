// swiglu_lowrank.cu: SwiGLU with the adapter product that reads its output, in one pass: the down
// adapter's h = a A^T in the forward, the gate|up adapter's gh = [dgate | dup] sB in the backward
// (declared in cuda/ops_cuda.h; the CPU twins are swiglu_*_cpu and the GEMM path they replace). Two
// walks over gu: tiles of 64 tokens x 64 columns (both directions; the backward's dropout term), and
// blocks that own a slice of I and stream bands of whole rows (the forward, and the backward with the
// gate|up adapter's dL/dB too, where they fit).
#include <stdlib.h>
#include <string.h>

#include "cuda/lowrank_split.cuh"
#include "cuda/mma.cuh"

// ---- CUDA kernels ----------------------------------------------------------------------------------

// SwiGLU with the adapter product that reads its result, in one pass (instead of the elementwise kernel
// and a skinny GEMM that reads its T x I output again):
//   forward  (the down group, no dropout): a = silu(gate) * up, h = a A^T           A [R][I]
//   backward (the gate|up group):          dgate | dup (in place over gate | up),
//                                          gh = dgate sB_gate + dup sB_up            sB [2I][R]
// where the gate|up group's sB is block-structured: the gate module's r columns (from c_gate) on the
// gate rows, the up module's (from c_up) on the up rows, zeros elsewhere; only those blocks are
// multiplied (with dropout the backward can also add the down module's masked input gradient to the
// output-gradient tile first: swiglu_dx, see its block in the kernel). Block: 64 tokens and a range of
// 64-column chunks of I (the splits: fp32 partials summed in a fixed order afterwards); 8 warps. Per chunk
// the gate, up (and output-gradient) tiles and the factor's chunk stream in through two cp.async stages;
// each thread makes the elementwise results of 8 columns at a time (one __expf and one approximate
// reciprocal an element: with a quarter of the elementwise kernel's threads a multiprocessor, exact expf
// and division made this the bottleneck), writes them out and back into the gate / up tiles (bf16: the
// values a GEMM would read), then the products run on the tensor cores: warp w owns tokens 16 (w % 4) ..
// +15 and, backward, the gate module (w < 4) or the up module, forward every other pair of n-tiles.
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
// sigmoid(g) as both walks compute it (one MUFU.EX2, one MUFU.RCP), so that they give the same bits:
// silu(g) = g sw_sigmoid(g). The flush-to-zero forms: __expf and __fdividef wrap each MUFU in range
// scaling for results below 2^-126, which a sigmoid (1 + e >= 1) only meets where it is itself below
// 2^-126 (g < -87), and then only in how far below.
__device__ __forceinline__ float sw_sigmoid(float g) { return rcp_ftz(1.0f + ex2_ftz(g * -LOG2E_F)); }
// dL/dgate, dL/dup of 8 elements from gate, up and dL/da, as both backward walks compute them.
__device__ __forceinline__ void sw_backward8(const float *g, const float *u, const float *go, float *dg, float *du) {
#pragma unroll
    for (int k = 0; k < 8; k++) {  // as swiglu_backward_kernel
        float sg = sw_sigmoid(g[k]), silu = g[k] * sg;
        dg[k] = (go[k] * u[k]) * fmaf(-silu, sg, silu + sg);  // silu' = s + silu (1 - s)
        du[k] = go[k] * silu;
    }
}

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
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
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
                sw_backward8(gf, uf, go, dg, du);
                store_bf16<8>(gs, dg);
                store_bf16<8>(us, du);
                if (ok) {
                    *(uint4 *)(gu + t * ldgu + k0 + cq) = *(const uint4 *)gs;
                    *(uint4 *)(gu + t * ldgu + I + k0 + cq) = *(const uint4 *)us;
                }
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++) gf[k] = gf[k] * sw_sigmoid(gf[k]) * uf[k];
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
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
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
        for (int hl = 0; hl < 2; hl++) {
            int64_t t = t0 + g + 8 * hl;
            float gf[8], uf[8];
            load_bf16<8>((const bf16 *)&x[0][hl], gf);
            load_bf16<8>((const bf16 *)&x[1][hl], uf);
#pragma unroll
            for (int k = 0; k < 8; k++) gf[k] = gf[k] * sw_sigmoid(gf[k]) * uf[k];
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
            store_acc_rows(acc, part, s, R, h, ldh, t0 + g, T, warp * 8 + 2 * c);
        }
#pragma unroll
        for (int i = 0; i < 2; i++) x[i][0] = xn[i][0], x[i][1] = xn[i][1];
    }
}

// ---- the backward with the gate|up adapter's dL/dB, streaming bands ----------------------------------
// The weight gradient dL/dB = s [dgate | dup]^T h of the gate|up group read the T x 2I output gradient
// again on the side stream (268 MB a 3B layer; leaving that product out shortens a 3B step by ~2-3 ms:
// docs/BENCHMARKS.md, eighteenth session). Summing it where dgate, dup are made needs the columns of I
// owned across all tokens, so this backward walks as the rows forward does: a block owns a slice of SR_W
// columns (sB's gate and up blocks transposed in shared memory) and the bands of 16 tokens gi, gi + G, ...
// A band's gate, up and output-gradient rows and the gate|up h of its tokens stream in by cp.async, two
// bands ahead in three stages (no registers held for loads; each thread's copies are fixed but for the
// band, so their addresses advance by a stride); warp w makes row w's dgate, dup over the slice and writes
// them out and back over the stage's gate and up rows; after a barrier, warps w and w + 8 multiply the
// dgate (n-tile w % 8 < r/8) or dup rows by sB's n-tile w % 8 over one half of the slice each, and every
// warp adds its 32 columns' dgate^T h_gate and dup^T h_up over the band's tokens to its dL/dB accumulators
// (mma.sync, 64 a thread); after a second barrier warp w adds warp w + 8's half of gh (through shared
// memory) and writes the fp32 partial gh [slice][t][R] (summed over slices in order afterwards). dL/dB
// leaves once at the end, as fp32 partials [module][gi][I][r] summed in order when G > 1. In the step
// (CUPTI, a 3B layer) 338 us against the tiles' 305, while the side stream no longer reads gu: steps 3B
// -0.1 to -0.7 ms, 7B -1.3 to -3.5. The kernel is bound by latency, not DRAM (~36 % of the issue slots a
// band at the step's ~1.4 GHz; ncu at the boost clock had the first version at 292 us, the step 362-382),
// and in the step its time follows its instruction count (~750 a warp a band: the elementwise pass ~260,
// the copies ~160, gh and dL/dB ~200): the ftz sigmoid and the loop without a remainder or division took
// it from 344 to ~315 us a 3B layer (docs/BENCHMARKS.md, twenty-fourth session). Bulk copies of a warp's
// rows on an mbarrier a stage instead of cp.async (fewer copy instructions) were slower: 10.7 against 9.3
// ms a 3B step.
#define SB_NS 3  // stages
#define SB_R 32  // at most r
#define SB_HLD (2 * SB_R + 8)

static size_t sb_smem_bytes(int r) {
    return sizeof(bf16) * ((size_t)2 * r * SR_LD + (size_t)SB_NS * 16 * (3 * SR_LD + SB_HLD)) + sizeof(float) * 8 * 32 * 4;
}

__global__ void __launch_bounds__(SR_NT, 1) swiglu_bands_backward_kernel(float *part, bf16 *gu, int64_t ldgu,
                                                                         const bf16 *__restrict__ gout, bf16 *gh,
                                                                         int64_t ldh, const bf16 *__restrict__ B,
                                                                         const bf16 *__restrict__ hh, int64_t ldhh,
                                                                         float *dbp, float *gB, float s_db, int R, int r,
                                                                         int c_gate, int c_up, int64_t T, int I, int S,
                                                                         int G) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    extern __shared__ __align__(16) unsigned char sw_smem[];
    bf16 *Fs = (bf16 *)sw_smem;               // [2r][SR_LD]: sB's gate block, then its up block, transposed
    bf16 *Xs = Fs + 2 * r * SR_LD;            // [SB_NS][gate, up, gout][16][SR_LD]
    bf16 *Hs = Xs + SB_NS * 3 * 16 * SR_LD;   // [SB_NS][16][SB_HLD]: h_gate | h_up of the band's tokens
    float4 *Ex = (float4 *)(Hs + SB_NS * 16 * SB_HLD);  // [8 n-tiles][32 lanes]: gh's second half of the slice
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, i4 = lane >> 3;
    int s = blockIdx.x % S, gi = blockIdx.x / S, f0 = s * SR_W;
    {  // sB[m I + f][c_m + n] -> Fs[m r + n][f - f0]
        int vr = r / 8;
        for (int v = threadIdx.x; v < 2 * SR_W * vr; v += SR_NT) {
            int m = v / (SR_W * vr), fl = (v / vr) % SR_W, n8 = (v % vr) * 8, cm = m ? c_up : c_gate, f = f0 + fl;
            uint4 x = make_uint4(0, 0, 0, 0);
            if (cm >= 0 && f < I) x = *(const uint4 *)(B + ((int64_t)m * I + f) * R + cm + n8);
            const bf16 *xe = (const bf16 *)&x;
#pragma unroll
            for (int e = 0; e < 8; e++) Fs[(m * r + n8 + e) * SR_LD + fl] = xe[e];
        }
    }
    const int64_t nb = (T + 15) / 16, n_my = gi < nb ? (nb - 1 - gi) / G + 1 : 0;  // this block's bands
    // A thread's copies are the same every band but for the band's rows: rows r0 and r0 + 8 of the gate, up
    // and output-gradient tiles at column cq (thread 64 r0 + cq / 8), and one vector of the h band (the
    // first 16 * 2r/8 threads): pointers advanced by G bands a call, no index arithmetic in the loop.
    static_assert(SR_NT == 512 && SR_W == 512, "a thread copies rows r0 and r0 + 8 of one column vector");
    const int r0 = threadIdx.x >> 6, cq = (threadIdx.x & 63) * 8, nhv = 2 * r / 8;
    const bool okf = f0 + cq < I, hthr = (int)threadIdx.x < 16 * nhv;
    const int hrow = threadIdx.x / nhv, hq = (threadIdx.x % nhv) * 8, hm = hq >= r, hcm = hm ? c_up : c_gate;
    const int64_t rows_g = (int64_t)G * 16;  // rows from one of this block's bands to the next
    int64_t tl = (int64_t)gi * 16 + r0, th = (int64_t)gi * 16 + hrow;  // the next band's rows for this thread
    const bf16 *pg = gu + tl * ldgu + f0 + cq, *po = gout + tl * I + f0 + cq;
    const bf16 *ph = hh + th * ldhh + (hcm >= 0 ? hcm + hq - hm * r : 0);
    bf16 *xs0 = Xs + r0 * SR_LD + cq, *hs0 = Hs + hrow * SB_HLD + hq;
    int stage = 0;  // (k % SB_NS, kept apart from the loop's `cur`: passing (cur + 2) % SB_NS instead measured
                    // 8.75 / 8.94 against 8.63 / 8.77 ms a 3B step, at the 128-register cap)
    auto load = [&](int64_t k) {  // band gi + k G into the next stage (an empty group past the last)
        if (k < n_my) {
            bool ok0 = okf && tl < T, ok1 = okf && tl + 8 < T;
            bf16 *xs = xs0 + stage * 3 * 16 * SR_LD;
            // a copy that is off (past T, past I) reads nothing and fills zeros: its address need not be valid
            cp_async16(xs, pg, ok0);
            cp_async16(xs + 8 * SR_LD, pg + 8 * ldgu, ok1);
            cp_async16(xs + 16 * SR_LD, pg + I, ok0);
            cp_async16(xs + 24 * SR_LD, pg + 8 * ldgu + I, ok1);
            cp_async16(xs + 32 * SR_LD, po, ok0);
            cp_async16(xs + 40 * SR_LD, po + 8 * I, ok1);
            if (hthr) cp_async16(hs0 + stage * 16 * SB_HLD, ph, th < T && hcm >= 0);  // zeros past T, for a missing module
            tl += rows_g, th += rows_g, pg += rows_g * ldgu, po += rows_g * I, ph += rows_g * ldhh;
            stage = stage == SB_NS - 1 ? 0 : stage + 1;
        }
        cp_commit();
    };
    float db[2][2][SB_R / 8][4];  // [module][m-tile: 16 columns][n-tile of r][C fragment]
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int nt = 0; nt < SB_R / 8; nt++) db[m][mt][nt][0] = db[m][mt][nt][1] = db[m][mt][nt][2] = db[m][mt][nt][3] = 0.0f;
    const int kmax = I - f0 < SR_W ? (I - f0 + 15) / 16 * 16 : SR_W;  // a short last slice
    load(0);
    load(1);
    // band k's first row and stage, advanced by the loop (no 64-bit multiply or remainder a band)
    int64_t t0 = (int64_t)gi * 16;
    int cur = 0;
    for (int64_t k = 0; k < n_my; k++, t0 += rows_g, cur = cur == SB_NS - 1 ? 0 : cur + 1) {
        cp_wait<1>();     // this thread's copies of band k have landed
        __syncthreads();  // everyone's have, and every warp is done with band k - 1 (whose stage is reloaded)
        load(k + 2);
        int64_t t = t0 + warp;
        bf16 *xs = Xs + cur * 3 * 16 * SR_LD;
        const bf16 *hs = Hs + cur * 16 * SB_HLD;
#pragma unroll
        for (int h2 = 0; h2 < 2; h2++) {  // row `warp`, columns 8 lane + 256 h2 ..: swiglu_lowrank_kernel's math
            int fl = 8 * lane + 256 * h2, f = f0 + fl;
            bf16 *gs = xs + warp * SR_LD + fl, *us = gs + 16 * SR_LD;
            float gf[8], uf[8], go[8], dg[8], du[8];
            load_bf16<8>(gs, gf);
            load_bf16<8>(us, uf);
            load_bf16<8>(us + 16 * SR_LD, go);
            sw_backward8(gf, uf, go, dg, du);
            store_bf16<8>(gs, dg);  // zeros outside T x I: they add nothing below
            store_bf16<8>(us, du);
            if (t < T && f < I) {
                *(uint4 *)(gu + t * ldgu + f) = *(const uint4 *)gs;
                *(uint4 *)(gu + t * ldgu + I + f) = *(const uint4 *)us;
            }
        }
        __syncthreads();  // the band's dgate and dup rows are whole
        // gh: output n-tile nt = warp % 8 (module m's columns 8 (nt - m r / 8) ..), warps w and w + 8 each over
        // half of the slice; the second half's sum goes through shared memory (Ex) to warp w after the dL/dB
        // products and a barrier
        const int nt = warp & 7, kh = warp >> 3, m_gh = nt * 8 >= r, cm_gh = m_gh ? c_up : c_gate;  // nt < 2r/8
        const bool gh_on = nt < 2 * r / 8 && cm_gh >= 0;
        float acc[4][4] = {};  // four chains, added at the end
        if (gh_on) {
            const bf16 *a_t = xs + m_gh * 16 * SR_LD + (lane & 15) * SR_LD + (lane >> 4) * 8;
            if (kmax == SR_W) {  // a whole slice: B fragments by ldmatrix too, two k-steps a load
                const bf16 *b_t = Fs + (nt * 8 + (lane & 7)) * SR_LD + (lane >> 3) * 8;
#pragma unroll 4
                for (int kk = kh * (SR_W / 2); kk < (kh + 1) * (SR_W / 2); kk += 32) {
                    uint32_t a0[4], a1[4], b[4];
                    ldsm4(b, b_t + kk);
                    ldsm4(a0, a_t + kk);
                    ldsm4(a1, a_t + kk + 16);
                    int j = (kk >> 5) & 1;
                    mma16816(acc[2 * j], a0, b[0], b[1]);
                    mma16816(acc[2 * j + 1], a1, b[2], b[3]);
                }
            } else {  // a short last slice
                const bf16 *fr = Fs + (nt * 8 + g) * SR_LD + 2 * c;
                int k1 = kh ? kmax : (kmax < SR_W / 2 ? kmax : SR_W / 2);
                for (int kk = kh * (SR_W / 2); kk < k1; kk += 16) {
                    uint32_t a[4];
                    ldsm4(a, a_t + kk);
                    mma16816(acc[0], a, ld32(fr + kk), ld32(fr + kk + 8));
                }
            }
#pragma unroll
            for (int e = 0; e < 4; e++) acc[0][e] = (acc[0][e] + acc[1][e]) + (acc[2][e] + acc[3][e]);
            if (kh) Ex[nt * 32 + lane] = make_float4(acc[0][0], acc[0][1], acc[0][2], acc[0][3]);
        }
#pragma unroll
        for (int m = 0; m < 2; m++) {  // dL/dB rows: this warp's columns 32 warp .., k = the band's tokens
            if ((m ? c_up : c_gate) < 0) continue;
            uint32_t a[2][4];  // A[i][t] = d(module m)[t][32 warp + 16 mt + i]: .trans
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
                ldsm4t(a[mt], xs + (m * 16 + (i4 >> 1) * 8 + (lane & 7)) * SR_LD + warp * 32 + mt * 16 + (i4 & 1) * 8);
#pragma unroll
            for (int np = 0; np < SB_R / 16; np++) {
                if (np >= r / 16) break;
                uint32_t b[4];  // B[t][n] = h_m[t][n]: .trans
                ldsm4t(b, hs + ((i4 & 1) * 8 + (lane & 7)) * SB_HLD + m * r + np * 16 + (i4 >> 1) * 8);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma16816(db[m][mt][2 * np], a[mt], b[0], b[1]);
                    mma16816(db[m][mt][2 * np + 1], a[mt], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // the second halves of gh are in Ex
        if (gh_on && !kh) {
            float4 o = Ex[nt * 32 + lane];
            acc[0][0] += o.x, acc[0][1] += o.y, acc[0][2] += o.z, acc[0][3] += o.w;
            store_acc_rows(acc[0], S > 1 ? part : NULL, s, R, gh, ldh, t0 + g, T, cm_gh + nt * 8 - m_gh * r + 2 * c);
        }
    }
    cp_wait<0>();  // no copy outlives the block
#pragma unroll
    for (int m = 0; m < 2; m++) {
        int cm = m ? c_up : c_gate;
        if (cm < 0) continue;
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int nt = 0; nt < SB_R / 8; nt++) {
                if (nt >= r / 8) break;
#pragma unroll
                for (int hl = 0; hl < 2; hl++) {
                    int f = f0 + warp * 32 + mt * 16 + g + 8 * hl, n = nt * 8 + 2 * c;
                    if (f >= I) continue;
                    float2 v = make_float2(s_db * db[m][mt][nt][2 * hl], s_db * db[m][mt][nt][2 * hl + 1]);
                    if (G > 1)
                        *(float2 *)(dbp + (((int64_t)m * G + gi) * I + f) * r + n) = v;
                    else
                        *(float2 *)(gB + ((int64_t)m * I + f) * R + cm + n) = v;
                }
            }
    }
}

// dL/dB from the bands kernel's partials [2][G][I][r]: both modules' blocks in one launch, the groups
// added in order (as splitk_sum_cuda).
__global__ void swiglu_bands_db_sum_kernel(const float *__restrict__ part, int G, int I, int r, float *gB, int R,
                                           int c_gate, int c_up) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, n1 = (int64_t)I * r;
    if (e >= 2 * n1) return;
    int m = (int)(e / n1), cm = m ? c_up : c_gate;
    if (cm < 0) return;
    int64_t i = e % n1;
    const float *p = part + (int64_t)m * G * n1 + i;
    float sum = 0.0f;
    for (int k = 0; k < G; k++) sum += p[(int64_t)k * n1];
    gB[((int64_t)m * I + i / r) * R + cm + i % r] = sum;
}

// ---- kernel launchers ---------------------------------------------------------------------------------

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
    int per_sm = resident_blocks(swiglu_rows_forward_kernel, SR_NT, smem, sr_smem_bytes(SR_R));
    int64_t nb = (T + 15) / 16, G = (int64_t)per_sm * ctx->sm_count / S;
    if (G < 1) G = 1;
    if (G > nb) G = nb;
    launch_pdl(swiglu_rows_forward_kernel, dim3((unsigned)(S * G)), dim3(SR_NT), smem, ctx->stream, S > 1 ? part : NULL,
               gu, ldgu, out, ldo, h, ldh, A, R, T, I, S, (int)G);
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
    launch_pdl(swiglu_lowrank_kernel<BWD>, grid, dim3(SW_NT), smem, ctx->stream, splits > 1 ? part : NULL, gu, ldgu,
               gout, out, ldo, h, ldh, M, R, r, c_gate, c_up, T, I, n_chunks, splits, dx ? *dx : none);
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

// The bands backward's partials: gh's slices [S][T][R] (S > 1) and dL/dB's [2][G][I][r] for up to SB_G
// token groups (fewer when part is smaller).
#define SB_G 8
extern "C" size_t swiglu_bands_part_floats(int64_t T, int I, int R, int r) {
    return swiglu_rows_part_floats(T, I, R) + (size_t)2 * SB_G * I * r;
}

extern "C" int swiglu_lowrank_backward_db_cuda(cuda_ctx *ctx, bf16 *gu, int64_t ldgu, const bf16 *gout, bf16 *gh,
                                               int64_t ldh, const bf16 *B, int R, int r, int c_gate, int c_up,
                                               const bf16 *h, int64_t ldhh, float s, float *gB, int64_t T, int I,
                                               float *part, size_t part_floats) {
    MOSFT_ASSERT(swiglu_lowrank_fits(1, I, ldgu, R, r) && ldh % 2 == 0 && (c_gate >= 0 || c_up >= 0));
    MOSFT_ASSERT((c_gate < 0 || (c_gate % 8 == 0 && c_gate + r <= R)) && (c_up < 0 || (c_up % 8 == 0 && c_up + r <= R)));
    MOSFT_ASSERT((uintptr_t)gu % 16 == 0 && (uintptr_t)gout % 16 == 0 && (uintptr_t)B % 16 == 0);
    MOSFT_ASSERT(ldhh % 8 == 0 && (uintptr_t)h % 16 == 0);
    if (!rows_on() || r > SB_R || T == 0) return 0;
    int S = ceil_div_i(I, SR_W);
    size_t ghp = S > 1 ? swiglu_rows_part_floats(T, I, R) : 0, dbf = (size_t)2 * I * r;  // dL/dB's floats a group
    if (ghp > 0 && (!part || ghp > part_floats)) return 0;
    size_t smem = sb_smem_bytes(r);
    int per_sm = resident_blocks(swiglu_bands_backward_kernel, SR_NT, smem, sb_smem_bytes(SB_R));
    int64_t nb = (T + 15) / 16, slots = (int64_t)per_sm * ctx->sm_count, G = slots / S;
    // one block a multiprocessor and one wave: where the slices leave more than 5 % of the multiprocessors
    // idle while there are bands for them (13B: 27 slices x 4 groups on 132), the tiles do better
    if (G < nb && S * G * 20 < slots * 19) return 0;
    if (G > nb) G = nb;
    while (G > 1 && (!part || ghp + (size_t)G * dbf > part_floats)) G--;
    if (G < 1) G = 1;
    float *dbp = G > 1 ? part + ghp : NULL;
    launch_pdl(swiglu_bands_backward_kernel, dim3((unsigned)(S * G)), dim3(SR_NT), smem, ctx->stream, part, gu, ldgu,
               gout, gh, ldh, B, h, ldhh, dbp, gB, s, R, r, c_gate, c_up, T, I, S, (int)G);
    CUDA_LAUNCH_CHECK();
    if (S > 1) splitk_sum_cuda(ctx, part, S, T, R, gh, ldh, GEMM_BF16);
    if (G > 1) {
        launch_pdl(swiglu_bands_db_sum_kernel, dim3(ceil_div_i((int64_t)dbf, 256)), dim3(256), 0, ctx->stream, dbp,
                   (int)G, I, r, gB, R, c_gate, c_up);
        CUDA_LAUNCH_CHECK();
    }
    return 1;
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
