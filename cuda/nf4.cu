// nf4.cu: NF4 quantization and dequantization on the device, bit-identical to core/nf4.c (and so to
// bitsandbytes); dtype conversions and random fills used when weights are loaded or generated.
//
// Bit-identity rests on the same fp32 operations in the same order as core/nf4.c (read its header):
// x * (1/absmax) with an IEEE division, strict comparisons with the fp32 midpoints (ties to the lower
// code), bnb's binary search for the 8-bit code, offset = fp32(sum in double) * fp32(1/n) summed on
// the host in the CPU's order, and code * absmax with no fused multiply-add (the __f*_rn intrinsics
// forbid the contraction nvcc would otherwise do).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/nf4.h"
#include "core/rng.h"
#include "cuda/cuda_util.cuh"

__constant__ float c_nf4_code[16];
__constant__ float c_nf4_thr[15];
static int g_consts_ready;

static void nf4_consts_init(void) {
    if (g_consts_ready) return;
    float thr[15];
    for (int i = 0; i < 15; i++) thr[i] = (k_nf4_code[i] + k_nf4_code[i + 1]) * 0.5f;
    CUDA_CHECK(cudaMemcpyToSymbol(c_nf4_code, k_nf4_code, sizeof(float) * 16));
    CUDA_CHECK(cudaMemcpyToSymbol(c_nf4_thr, thr, sizeof thr));
    g_consts_ready = 1;
}

extern "C" size_t nf4_cuda_bytes(int64_t numel, int double_quant) {
    int64_t nb = (numel + NF4_BLOCK - 1) / NF4_BLOCK, nn = (nb + NF4_NESTED_BLOCK - 1) / NF4_NESTED_BLOCK;
    size_t b = cuda_align((size_t)((numel + 1) / 2));
    if (double_quant)
        b += cuda_align((size_t)nb) + cuda_align(sizeof(float) * (size_t)nn) + cuda_align(sizeof(float) * 256);
    else
        b += cuda_align(sizeof(float) * (size_t)nb);
    return b;
}

extern "C" void nf4_cuda_layout(nf4_cuda_tensor *t, int64_t rows, int64_t cols, int double_quant, void *mem) {
    memset(t, 0, sizeof *t);
    t->rows = rows;
    t->cols = cols;
    t->numel = rows * cols;
    t->n_blocks = (t->numel + NF4_BLOCK - 1) / NF4_BLOCK;
    t->double_quant = double_quant != 0;
    int64_t nn = (t->n_blocks + NF4_NESTED_BLOCK - 1) / NF4_NESTED_BLOCK;
    char *p = (char *)mem;
    t->packed = (uint8_t *)p;
    p += cuda_align((size_t)((t->numel + 1) / 2));
    if (t->double_quant) {
        t->absmax_q = (uint8_t *)p;
        p += cuda_align((size_t)t->n_blocks);
        t->nested_absmax = (float *)p;
        p += cuda_align(sizeof(float) * (size_t)nn);
        t->nested_code = (float *)p;
    } else {
        t->absmax = (float *)p;
    }
}

// ---- quantization ---------------------------------------------------------------------------------

__device__ __forceinline__ unsigned nf4_code_of(float x) {
    unsigned q = 0;
#pragma unroll
    for (int i = 0; i < 15; i++) q += x > c_nf4_thr[i];
    return q;
}

// One warp per 64-element block; lane i owns elements 2i, 2i+1 (one output byte).
__global__ void nf4_quant_kernel(const float *__restrict__ w, int64_t numel, int64_t n_blocks, uint8_t *packed,
                                 float *absmax) {
    int64_t b = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (b >= n_blocks) return;
    int64_t i = b * NF4_BLOCK + 2 * lane;
    float a = i < numel ? w[i] : 0.0f, c = i + 1 < numel ? w[i + 1] : 0.0f;
    float m = warp_max(fmaxf(fabsf(a), fabsf(c)));
    if (lane == 0) absmax[b] = m;
    float inv = __fdiv_rn(1.0f, m);  // an all-zero block: inf, 0 * inf = NaN -> code 0, as bnb
    if (i < numel) packed[i >> 1] = (uint8_t)(nf4_code_of(__fmul_rn(a, inv)) << 4 | nf4_code_of(__fmul_rn(c, inv)));
}

// bnb's dQuantize over the sorted 256-value map (nf4_dynamic_code in core/nf4.c).
__device__ __forceinline__ uint8_t dynamic_code(const float *map, float x) {
    int pivot = 127, lo = 0, hi = 255;
    for (int step = 64; step > 0; step >>= 1) {
        if (x > map[pivot]) {
            lo = pivot;
            pivot += step;
        } else {
            hi = pivot;
            pivot -= step;
        }
    }
    float val = map[pivot];
    if (x > val) {
        float mid = __fmul_rn(__fadd_rn(map[hi], val), 0.5f);
        return (uint8_t)(x > mid ? hi : pivot);
    }
    float mid = __fmul_rn(__fadd_rn(map[lo], val), 0.5f);
    return (uint8_t)(x < mid ? lo : pivot);
}

// One block of 256 threads per nested block of 256 absmax values.
__global__ void nf4_nested_kernel(const float *__restrict__ absmax, int64_t nb, float offset, const float *code,
                                  float *nested_absmax, uint8_t *absmax_q) {
    __shared__ float map[256];
    map[threadIdx.x] = code[threadIdx.x];
    int64_t b = (int64_t)blockIdx.x * NF4_NESTED_BLOCK + threadIdx.x;
    float v = b < nb ? __fsub_rn(absmax[b], offset) : 0.0f;
    float amax = block_max(fabsf(v));  // also orders the map's writes before the reads below
    if (threadIdx.x == 0) nested_absmax[blockIdx.x] = amax;
    float inv = __fdiv_rn(1.0f, amax);
    if (b < nb) absmax_q[b] = dynamic_code(map, __fmul_rn(v, inv));
}

extern "C" void nf4_quantize_cuda(cuda_ctx *ctx, nf4_cuda_tensor *t, const float *w, float *absmax_tmp) {
    nf4_consts_init();
    float *am = t->double_quant ? absmax_tmp : t->absmax;
    int warps = 8;
    nf4_quant_kernel<<<ceil_div_i(t->n_blocks, warps), 32 * warps, 0, ctx->stream>>>(w, t->numel, t->n_blocks,
                                                                                      t->packed, am);
    CUDA_LAUNCH_CHECK();
    if (!t->double_quant) return;
    // offset = mean(absmax), summed on the host in block order exactly as core/nf4.c.
    size_t bytes = sizeof(float) * (size_t)t->n_blocks;
    float *h = bytes <= ctx->host_scratch_bytes ? ctx->host_scratch : (float *)xmalloc(bytes);
    CUDA_CHECK(cudaMemcpyAsync(h, am, bytes, cudaMemcpyDeviceToHost, ctx->stream));
    CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
    double sum = 0;
    for (int64_t b = 0; b < t->n_blocks; b++) sum += h[b];
    if (h != ctx->host_scratch) free(h);
    t->offset = (float)sum * (1.0f / (float)t->n_blocks);
    float map[256];
    nf4_dynamic_map(map);
    CUDA_CHECK(cudaMemcpyAsync(t->nested_code, map, sizeof map, cudaMemcpyHostToDevice, ctx->stream));
    CUDA_CHECK(cudaStreamSynchronize(ctx->stream));  // `map` is a stack array
    int64_t nn = (t->n_blocks + NF4_NESTED_BLOCK - 1) / NF4_NESTED_BLOCK;
    nf4_nested_kernel<<<(unsigned)nn, NF4_NESTED_BLOCK, 0, ctx->stream>>>(am, t->n_blocks, t->offset, t->nested_code,
                                                                          t->nested_absmax, t->absmax_q);
    CUDA_LAUNCH_CHECK();
}

extern "C" void nf4_upload_cuda(cuda_ctx *ctx, nf4_cuda_tensor *t, const nf4_tensor *host) {
    MOSFT_ASSERT(t->numel == host->numel && t->double_quant == host->double_quant);
    CUDA_CHECK(cudaMemcpyAsync(t->packed, host->packed, (size_t)((host->numel + 1) / 2), cudaMemcpyHostToDevice, ctx->stream));
    if (host->double_quant) {
        int64_t nn = (host->n_blocks + NF4_NESTED_BLOCK - 1) / NF4_NESTED_BLOCK;
        CUDA_CHECK(cudaMemcpyAsync(t->absmax_q, host->absmax_q, (size_t)host->n_blocks, cudaMemcpyHostToDevice, ctx->stream));
        CUDA_CHECK(cudaMemcpyAsync(t->nested_absmax, host->nested_absmax, sizeof(float) * (size_t)nn, cudaMemcpyHostToDevice, ctx->stream));
        CUDA_CHECK(cudaMemcpyAsync(t->nested_code, host->nested_code, sizeof(float) * 256, cudaMemcpyHostToDevice, ctx->stream));
        t->offset = host->offset;
    } else {
        CUDA_CHECK(cudaMemcpyAsync(t->absmax, host->absmax, sizeof(float) * (size_t)host->n_blocks, cudaMemcpyHostToDevice, ctx->stream));
    }
    (void)ctx;
}

// ---- dequantization -----------------------------------------------------------------------------

__device__ __forceinline__ float nf4_block_scale(const nf4_cuda_tensor &t, int64_t b) {
    if (!t.double_quant) return __ldg(t.absmax + b);
    return __fadd_rn(__fmul_rn(__ldg(t.nested_code + __ldg(t.absmax_q + b)), __ldg(t.nested_absmax + b / NF4_NESTED_BLOCK)),
                     t.offset);
}

// 8 elements (4 packed bytes, one 16-byte store) a group, NF4_DQ_GROUPS (4) groups a thread: warp w of
// block blk takes the 128 groups from (blk * 8 + w) * 128, lane i the groups i, i + 32, i + 64, i + 96, so
// that each load and store instruction of a warp is contiguous. The work a group is kept small (ncu, a 3B
// gate|up group of 50M weights: 29.7M -> 17.5M warp instructions and 54.7 -> 50.7 us against the previous
// layout of 2 groups a thread with a scale and a division each and two table reads a byte):
//   - a packed byte's two values come from one 8-byte entry of a 256-entry table in shared memory
//     ({code[hi], code[lo]}), are scaled with two multiplies and rounded with one bf16x2 conversion;
//   - a warp's 128 groups share 16 absmax blocks: lanes 0-15 compute one scale each and the groups take
//     theirs with a shuffle;
//   - the row and column come from one division a thread, then step by 256 elements.
// numel % 8 == 0, out 16-byte aligned, blockDim.x == 256.
#define NF4_DQ_GROUPS 4

// The pair table of nf4_dequant8_block, by the block's 256 threads (a barrier follows in the caller).
__device__ __forceinline__ void nf4_pair_table(float2 *pair) {
    pair[threadIdx.x] = make_float2(c_nf4_code[threadIdx.x >> 4], c_nf4_code[threadIdx.x & 15]);
}

// Block `blk` of a tensor's dequantization into out (row stride ldo); pair: nf4_pair_table's.
__device__ __forceinline__ void nf4_dequant8_block(const nf4_cuda_tensor &t, bf16 *__restrict__ out, int64_t ldo,
                                                   int64_t blk, const float2 *pair) {
    int lane = threadIdx.x & 31;
    int64_t n_groups = t.numel / 8, base = (blk * 8 + (threadIdx.x >> 5)) * 128;  // the warp's first group
    if (base >= n_groups) return;  // warp-uniform: the shuffles below see every lane
    uint32_t word[NF4_DQ_GROUPS];
#pragma unroll
    for (int j = 0; j < NF4_DQ_GROUPS; j++) {
        int64_t g = base + lane + 32 * j;
        word[j] = g < n_groups ? __ldg((const unsigned int *)(t.packed + g * 4)) : 0u;
    }
    int64_t sb = base / (NF4_BLOCK / 8) + (lane & 15);  // absmax block of lane's scale
    float s_lane = lane < 16 && sb * (NF4_BLOCK / 8) < n_groups ? nf4_block_scale(t, sb) : 0.0f;
    int64_t row, col, e = (base + lane) * 8;
    if (t.numel <= 0x7fffffff) {  // 32-bit division: a 64-bit one costs more than the rest of the work
        uint32_t cols = (uint32_t)t.cols;
        row = (uint32_t)e / cols;
        col = (uint32_t)e - (uint32_t)row * cols;
    } else {
        row = e / t.cols;
        col = e % t.cols;
    }
#pragma unroll
    for (int j = 0; j < NF4_DQ_GROUPS; j++) {
        float s = __shfl_sync(0xffffffffu, s_lane, (lane >> 3) + 4 * j);  // group lane + 32 j: block (lane + 32 j) / 8
        if (base + lane + 32 * j < n_groups) {
            uint32_t v[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float2 c = pair[(word[j] >> (8 * k)) & 0xff];
                __nv_bfloat162 h = __floats2bfloat162_rn(__fmul_rn(c.x, s), __fmul_rn(c.y, s));
                memcpy(&v[k], &h, 4);
            }
            *(uint4 *)(out + row * ldo + col) = make_uint4(v[0], v[1], v[2], v[3]);
        }
        col += 256;  // the next group of this lane: 32 groups on
        while (col >= t.cols) col -= t.cols, row++;
    }
}

// The pieces of one weight_group_fill_cuda launch: piece i takes blocks [blk0[i], blk0[i + 1]).
typedef struct {
    weight_piece w;     // w.t (a host address) says only whether it is an NF4 piece
    nf4_cuda_tensor t;  // that tensor, by value: the launch's parameters carry it
} wf_piece;
typedef struct {
    wf_piece p[WEIGHT_PIECES_MAX];
    int64_t blk0[WEIGHT_PIECES_MAX + 1];
    int64_t ld;
    int n;
} weight_fill_args;

// Blocks of 256 threads: an NF4 piece's nf4_dequant8_block, a bf16 block's one 16-byte vector a
// thread. A block belongs to one piece, so the branch is uniform.
__global__ void __launch_bounds__(256) weight_fill_kernel(weight_fill_args a) {
    __shared__ float2 pair[256];
    nf4_pair_table(pair);
    __syncthreads();
    int i = 0;
    while (i + 1 < a.n && (int64_t)blockIdx.x >= a.blk0[i + 1]) i++;
    const weight_piece &p = a.p[i].w;
    int64_t blk = blockIdx.x - a.blk0[i];
    if (p.t) {
        nf4_dequant8_block(a.p[i].t, p.dst, a.ld, blk, pair);
        return;
    }
    int64_t v = blk * blockDim.x + threadIdx.x, vpr = p.cols / 8;
    if (v >= p.rows * vpr) return;
    int64_t r = v / vpr, c = (v - r * vpr) * 8;
    *(uint4 *)(p.dst + r * a.ld + c) = *(const uint4 *)(p.src + r * p.lds + c);
}

__global__ void nf4_dequant1_kernel(nf4_cuda_tensor t, bf16 *__restrict__ out, int64_t ldo) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = c_nf4_code[threadIdx.x];
    __syncthreads();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= t.numel) return;
    uint8_t byte = t.packed[i >> 1];
    unsigned q = (i & 1) ? (byte & 15) : (byte >> 4);
    out[(i / t.cols) * ldo + i % t.cols] = __float2bfloat16_rn(__fmul_rn(code[q], nf4_block_scale(t, i / NF4_BLOCK)));
}

extern "C" void nf4_dequantize_cuda(cuda_ctx *ctx, const nf4_cuda_tensor *t, bf16 *out, int64_t ldo) {
    nf4_dequantize_on(ctx, ctx->stream, t, out, ldo);
}

// Any shape or alignment: an element a thread (weight_group_fill_cuda's fallback).
static void nf4_dequant_scalar(cudaStream_t stream, const nf4_cuda_tensor *t, bf16 *out, int64_t ldo) {
    nf4_dequant1_kernel<<<ceil_div_i(t->numel, 256), 256, 0, stream>>>(*t, out, ldo);
    CUDA_LAUNCH_CHECK();
}

// One tensor is a one-piece weight group: the same kernels, the same choice of the vector path.
extern "C" void nf4_dequantize_on(cuda_ctx *ctx, cudaStream_t stream, const nf4_cuda_tensor *t, bf16 *out, int64_t ldo) {
    (void)ctx;
    weight_piece p = {t, NULL, 0, 0, 0, out};
    weight_group_fill_cuda(stream, &p, 1, ldo > 0 ? ldo : t->cols);
}

// Whether a piece can take the vector path (16-byte rows; 4-byte packed words).
static int piece_vectorizable(const weight_piece *p, int64_t ld) {
    if (ld % 8 || (uintptr_t)p->dst % 16) return 0;
    if (p->t) return p->t->cols % 8 == 0 && (uintptr_t)p->t->packed % 4 == 0;
    return p->cols % 8 == 0 && p->lds % 8 == 0 && (uintptr_t)p->src % 16 == 0;
}

extern "C" void weight_group_fill_cuda(cudaStream_t st, const weight_piece *p, int n, int64_t ld) {
    MOSFT_ASSERT(n >= 0 && n <= WEIGHT_PIECES_MAX);
    nf4_consts_init();
    weight_fill_args a;
    memset(&a, 0, sizeof a);
    a.ld = ld;
    int vec = 1;
    for (int i = 0; i < n; i++) vec &= piece_vectorizable(&p[i], ld);
    if (!vec) {  // piece by piece: the scalar dequantization, 2D copies
        for (int i = 0; i < n; i++) {
            if (p[i].t)
                nf4_dequant_scalar(st, p[i].t, p[i].dst, ld);
            else if (p[i].rows > 0 && p[i].cols > 0)
                CUDA_CHECK(cudaMemcpy2DAsync(p[i].dst, (size_t)ld * 2, p[i].src, (size_t)p[i].lds * 2, (size_t)p[i].cols * 2,
                                             (size_t)p[i].rows, cudaMemcpyDeviceToDevice, st));
        }
        return;
    }
    int64_t blocks = 0;
    for (int i = 0; i < n; i++) {
        a.p[a.n].w = p[i];
        if (p[i].t) a.p[a.n].t = *p[i].t;
        a.blk0[a.n] = blocks;
        int64_t nb = p[i].t ? ceil_div_i(p[i].t->numel / 8, 256 * NF4_DQ_GROUPS) : ceil_div_i(p[i].rows * (p[i].cols / 8), 256);
        if (nb == 0) continue;
        blocks += nb;
        a.n++;
    }
    a.blk0[a.n] = blocks;
    if (!blocks) return;
    weight_fill_kernel<<<(unsigned)blocks, 256, 0, st>>>(a);
    CUDA_LAUNCH_CHECK();
}

// ---- conversions and fills ----------------------------------------------------------------------

__global__ void convert_kernel(const void *src, int dt, int64_t n, float *dst, int round_bf16) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x;
    if (dt == MOSFT_F32)
        x = ((const float *)src)[i];
    else if (dt == MOSFT_BF16)
        x = __bfloat162float(((const bf16 *)src)[i]);
    else
        x = __half2float(((const __half *)src)[i]);
    if (round_bf16) x = __bfloat162float(__float2bfloat16_rn(x));
    dst[i] = x;
}

extern "C" void convert_to_f32_cuda(cuda_ctx *ctx, const void *src, mosft_dtype dt, int64_t n, float *dst,
                                    int round_bf16) {
    MOSFT_ASSERT(dt == MOSFT_F32 || dt == MOSFT_BF16 || dt == MOSFT_F16);
    if (n == 0) return;
    convert_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(src, (int)dt, n, dst, round_bf16);
    CUDA_LAUNCH_CHECK();
}

__global__ void f32_to_bf16_kernel(const float *src, bf16 *dst, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16_rn(src[i]);
}
__global__ void bf16_to_f32_kernel(const bf16 *src, float *dst, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __bfloat162float(src[i]);
}

extern "C" void f32_to_bf16_cuda(cuda_ctx *ctx, const float *src, bf16 *dst, int64_t n) {
    if (n == 0) return;
    f32_to_bf16_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(src, dst, n);
    CUDA_LAUNCH_CHECK();
}
extern "C" void bf16_to_f32_cuda(cuda_ctx *ctx, const bf16 *src, float *dst, int64_t n) {
    if (n == 0) return;
    bf16_to_f32_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(src, dst, n);
    CUDA_LAUNCH_CHECK();
}

// Box-Muller on two Philox lanes; the values only need to look like weights (benchmarks).
__global__ void fill_normal_kernel(float *dst, int64_t n, uint64_t key, float std) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint32_t o[4];
    rng_philox4(key, (uint64_t)i >> 1, o);
    int k = (int)(i & 1) * 2;
    float u1 = ((float)o[k] + 1.0f) * (1.0f / 4294967296.0f), u2 = (float)o[k + 1] * (1.0f / 4294967296.0f);
    dst[i] = std * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

extern "C" void fill_normal_f32_cuda(cuda_ctx *ctx, float *dst, int64_t n, uint64_t key, float std) {
    if (n == 0) return;
    fill_normal_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(dst, n, key, std);
    CUDA_LAUNCH_CHECK();
}
