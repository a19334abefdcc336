// swiglu_lowrank.cu: SwiGLU with the adapter product that reads its output, in one pass: the down
// adapter's h = a A^T in the forward, the gate|up adapter's gh = [dgate | dup] sB in the backward
// (declared in cuda/ops_cuda.h; the CPU twins are swiglu_*_cpu and the GEMM path they replace). Two
// walks over gu: tiles of 64 tokens x 64 columns (both directions; the backward's dropout term), and
// blocks that own a slice of I and stream bands of whole rows (the forward, where it fits).
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
// sigmoid(g) as both walks compute it (one __expf, one approximate reciprocal), so that they give the
// same bits: silu(g) = g sw_sigmoid(g).
__device__ __forceinline__ float sw_sigmoid(float g) { return __fdividef(1.0f, 1.0f + __expf(-g)); }

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
                    float sg = sw_sigmoid(gf[k]);
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
