// ops_cuda.h: the CUDA kernels of the training step, one twin per CPU reference op of core/ops_cpu.h
// (`rmsnorm_forward_cpu` / `rmsnorm_forward_cuda`), plus the GPU-only pieces (NF4 on the device, GEMMs
// through cuBLASLt, the adapter's gather/scatter). C-callable, so that the GPU tests (tests/gpu/*.c)
// feed both twins the same random inputs and compare.
//
// Conventions:
//  - Every pointer is DEVICE memory unless its comment says "host". Shapes are written beside them.
//  - `bf16` is __nv_bfloat16 in CUDA code and its bit pattern (uint16_t) in C: the same bytes.
//  - Activations are bf16; statistics (rmsnorm rstd, softmax lse, losses) and gradient accumulators of
//    the residual stream are fp32. Like the CPU ops, backward kernels ACCUMULATE (+=) into input
//    gradients unless their comment says otherwise.
//  - Every launcher runs on the context's stream and checks the launch (a failure is fatal:
//    mosft_die with a hint). Nothing synchronizes unless it says so.
#ifndef MOSFT_OPS_CUDA_H
#define MOSFT_OPS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "core/adapter.h"
#include "core/dtype.h"
#include "core/nf4.h"

#if defined(__CUDACC__) || defined(MOSFT_CUDA_EMU)  // the emulator compiles cuda/ as C++
#include <cuda_bf16.h>
typedef __nv_bfloat16 bf16;
#else
typedef uint16_t bf16;  // bit pattern of a bfloat16 (core/dtype.h converts)
#endif

#ifdef __cplusplus
extern "C" {
#endif

// ---- context: stream, cuBLASLt handle and workspace, GEMM plan cache (cuda/context.cu) ----
typedef struct cuda_ctx cuda_ctx;
// NULL (with the error recorded) when no device or the libraries fail.
cuda_ctx *cuda_ctx_create(void);
// A second context (its own stream at the lowest priority, cuBLASLt handle and workspace) for work
// that may run beside the main stream's (the caller orders the two with events).
cuda_ctx *cuda_ctx_create_side(void);
void cuda_ctx_free(cuda_ctx *ctx);
cudaStream_t cuda_ctx_stream(const cuda_ctx *ctx);
void cuda_ctx_sync(cuda_ctx *ctx);
size_t cuda_ctx_workspace_bytes(void);
// Products of at least 2^30 multiply-adds on this context target `sms` multiprocessors (0: all), leaving
// the rest to kernels of other streams (cuBLASLt's SM_COUNT_TARGET). Plans made before keep theirs.
void cuda_ctx_set_gemm_sms(cuda_ctx *ctx, int sms);

typedef enum { GEMM_BF16 = 0, GEMM_F32 = 1 } gemm_dtype;
// Row-major D[M][N] = alpha * op(A)[M][K] op(B)[K][N] + beta * C[M][N], bf16 operands, fp32
// accumulation, C and D of type `cd` with row stride ldd (C may be D; C is ignored when beta = 0):
//   op(A)[i][k] = trans_a ? A[k*lda + i] : A[i*lda + k];  op(B)[k][j] = trans_b ? B[j*ldb + k] : B[k*ldb + j].
// A linear layer y = x W^T (W [N][K]) is gemm_cuda(ctx, 0, 1, T, N, K, 1, x, K, W, K, 0, NULL, y, N, ...).
void gemm_cuda(cuda_ctx *ctx, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16 *A,
               int64_t lda, const bf16 *B, int64_t ldb, float beta, const void *C, void *D, int64_t ldd, gemm_dtype cd);
// gemm_cuda over `batch` matrices at fixed element strides (sa, sb, sd) from A, B, D (C = D).
void gemm_batched_cuda(cuda_ctx *ctx, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                       const bf16 *A, int64_t lda, int64_t sa, const bf16 *B, int64_t ldb, int64_t sb, float beta, void *D,
                       int64_t ldd, int64_t sd, gemm_dtype cd, int batch);
// D[M][N] (row stride ldd, bf16 or fp32) = sum over c = 0 .. splits-1 of P[c][M][N], in that order: the
// fp32 partials of the fused low-rank kernels (cuda/adapter.cu, cuda/swiglu_lowrank.cu) that split their
// contraction.
void splitk_sum_cuda(cuda_ctx *ctx, const float *P, int splits, int64_t M, int64_t N, void *D, int64_t ldd, gemm_dtype cd);

// ---- NF4 on the device (cuda/nf4.cu), bit-identical to core/nf4.c and bitsandbytes ----
typedef struct {
    int64_t rows, cols, numel, n_blocks;
    int double_quant;
    uint8_t *packed;        // [ceil(numel/2)] two codes per byte, the even element in the high nibble
    float *absmax;          // [n_blocks] (double_quant == 0)
    uint8_t *absmax_q;      // [n_blocks] (double_quant == 1)
    float *nested_absmax;   // [ceil(n_blocks/256)]
    float *nested_code;     // [256] the tensor's own 8-bit map (a bnb file carries one per weight)
    float offset;           // host value
} nf4_cuda_tensor;
// Device bytes of the pieces, each rounded up to 256 bytes.
size_t nf4_cuda_bytes(int64_t numel, int double_quant);
// Carve the pieces of `t` (rows x cols) out of `mem` (nf4_cuda_bytes of it).
void nf4_cuda_layout(nf4_cuda_tensor *t, int64_t rows, int64_t cols, int double_quant, void *mem);
// Quantize w[rows*cols] (device fp32, already rounded to bf16 when it came from bf16 weights).
// absmax_tmp [n_blocks] device scratch. Synchronizes (the offset is summed on the host as core/nf4.c).
void nf4_quantize_cuda(cuda_ctx *ctx, nf4_cuda_tensor *t, const float *w, float *absmax_tmp);
// out[rows][cols] (row stride ldo, 0 = cols) = bf16(code * absmax) (core/model.c base_linear_weight, bit
// for bit).
void nf4_dequantize_cuda(cuda_ctx *ctx, const nf4_cuda_tensor *t, bf16 *out, int64_t ldo);
// The same on another stream (the backend dequantizes the next weight group while a GEMM runs).
void nf4_dequantize_on(cuda_ctx *ctx, cudaStream_t stream, const nf4_cuda_tensor *t, bf16 *out, int64_t ldo);
// One piece of a weight group's bf16 buffer: an NF4 tensor t dequantized (t->rows x t->cols), or with
// t NULL a bf16 block src[rows][cols] (row stride lds) copied; dst is its top-left element.
#define WEIGHT_PIECES_MAX 5
typedef struct {
    const nf4_cuda_tensor *t;
    const bf16 *src;
    int64_t lds, rows, cols;
    bf16 *dst;
} weight_piece;
// The n pieces of a buffer with row stride ld on stream st, in one launch where every piece allows 16-byte
// vectors (the dequantized values those of nf4_dequantize_cuda, bit for bit): a K-augmented group's
// NF4 weights and the adapter's blocks beside them (cuda/step_cuda.cu).
void weight_group_fill_cuda(cudaStream_t st, const weight_piece *p, int n, int64_t ld);
// Upload a host nf4_tensor (pre-quantized bnb-4bit, or quantized by core/nf4.c) into a laid-out tensor.
void nf4_upload_cuda(cuda_ctx *ctx, nf4_cuda_tensor *t, const nf4_tensor *host);

// ---- conversions and fills (cuda/nf4.cu) ----
// dst[n] = fp32(src[n]) for src of dtype F32, F16 or BF16 (device), optionally rounded to bf16.
void convert_to_f32_cuda(cuda_ctx *ctx, const void *src, mosft_dtype dt, int64_t n, float *dst, int round_bf16);
void f32_to_bf16_cuda(cuda_ctx *ctx, const float *src, bf16 *dst, int64_t n);
void bf16_to_f32_cuda(cuda_ctx *ctx, const bf16 *src, float *dst, int64_t n);
// Random N(0, std^2) values from the Philox stream `key` (element i uses rng_u32 lanes 2i, 2i+1).
void fill_normal_f32_cuda(cuda_ctx *ctx, float *dst, int64_t n, uint64_t key, float std);

// ---- normalization, activation, embedding (cuda/norm_act.cu) ----
// Row strides: ld* arguments give the row stride of a [T][...] buffer that has more columns than the
// op writes or reads (the adapter's h rides in extra columns of a linear's input); multiples of 8.
// out[T][C] (row stride ldo) = bf16(weight * (x * rstd)), rstd[T] (may be NULL) = 1/sqrt(mean(x^2) + eps);
// inp[T][C].
void rmsnorm_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, float *rstd, const bf16 *inp, const float *weight,
                          int64_t T, int C, float eps);
// dL/dinp (= d/dinp of sum(gout * out)) added to the pair ghi + glo (acc) or written there (acc = 0). The
// pair holds an fp32 gradient in two bf16 halves: ghi[T][C] (row stride ldh) = bf16(value), the next GEMM's
// operand; glo[T][C] = bf16(value - ghi). gout[T][C] fp32 (gout_f32) or bf16.
void rmsnorm_backward_cuda(cuda_ctx *ctx, bf16 *ghi, int64_t ldh, bf16 *glo, int acc, const void *gout, int gout_f32,
                           const bf16 *inp, const float *weight, const float *rstd, int64_t T, int C);
// SwiGLU on the fused gate|up output gu[T][2I] (gate in columns [0, I), up in [I, 2I)):
// out[T][I] (row stride ldo) = silu(gate) * up; gu with row stride ldgu.
void swiglu_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, const bf16 *gu, int64_t ldgu, int64_t T, int I);
// In place: gu[T][2I] becomes (dL/dgate | dL/dup) from gout[T][I] (overwrites, no accumulation).
void swiglu_backward_cuda(cuda_ctx *ctx, bf16 *gu, int64_t ldgu, const bf16 *gout, int64_t T, int I);
// The same two with the adapter product that reads their output, in one pass (cuda/swiglu_lowrank.cu):
// forward: out as swiglu_forward_cuda and h[T][R] (bf16, row stride ldh) = out A^T, A [R][I] bf16;
// backward: gu as swiglu_backward_cuda and gh[T][R] (bf16, row stride ldh) = dgate sB[0:I] + dup sB[I:2I]
// over the r columns from c_gate (gate rows) and from c_up (up rows) only (-1: no such module), sB [2I][R]
// bf16. Splits I over fp32 partials in `part` (part_floats of room; NULL: no split), summed in a fixed
// order. swiglu_lowrank_fits: the shapes the backward (bwd) or forward takes (I, ldgu % 8 == 0, R and
// r % 16 == 0, 16 <= r <= 64; forward R <= 64, backward R <= 192).
int swiglu_lowrank_fits(int bwd, int I, int64_t ldgu, int R, int r);
// The forward, where R <= 64 and `part` has room for swiglu_rows_part_floats(T, I, R) (slices of 512
// columns of I) or one slice covers I, runs as blocks that own a slice of I and stream bands of 16 whole
// rows (~10 % faster than tiles of 64 tokens x 64 columns, which the backward keeps).
// swiglu_lowrank_use_rows(0) (or MOSFT_SWIGLU_ROWS=0) keeps the tiles for the forward too.
size_t swiglu_rows_part_floats(int64_t T, int I, int R);
void swiglu_lowrank_use_rows(int on);
void swiglu_lowrank_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, bf16 *h, int64_t ldh, const bf16 *gu,
                                 int64_t ldgu, const bf16 *A, int R, int64_t T, int I, float *part, size_t part_floats);
// With dropout the backward can also take the down module's masked input gradient (dx, NULL: none): gout
// is read as bf16(gout + mask * keep * (gh A)), what lowrank_dropout_dx_cuda with that one module and its
// kept bits writes into gout (bit for bit), without that pass over gout. swiglu_dx_fits: the shapes it
// takes (I % 32 == 0 for the bits, r % 16 == 0 and <= 64, ldgh % 8 == 0, 16-byte aligned gh and A).
typedef struct {
    const bf16 *gh;        // [T][r] (row stride ldgh): gy sB of the down module
    int64_t ldgh;
    const bf16 *A;         // [r][I]: its A
    const uint32_t *bits;  // its kept mask over [T][I], 1 bit an element
    float keep;            // 1 / (1 - p)
} swiglu_dx;
int swiglu_dx_fits(int I, int r, int64_t ldgh, const void *gh, const void *A);
void swiglu_lowrank_backward_cuda(cuda_ctx *ctx, bf16 *gu, int64_t ldgu, const bf16 *gout, bf16 *gh, int64_t ldh,
                                  const bf16 *B, int R, int r, int c_gate, int c_up, int64_t T, int I, float *part,
                                  size_t part_floats, const swiglu_dx *dx);
// The backward (without dx) with the gate|up group's weight gradient as well: gB ([2I][R] fp32, the layout
// of the dL/dB GEMM, s gy^T h) gets s dgate^T h[:, c_gate:+r] in its gate rows' block at c_gate and s
// dup^T h[:, c_up:+r] in its up rows' block at c_up (nothing else is written), h [T][R] bf16 with row
// stride ldhh: one pass over gu instead of a second reading of dL/dgate | dL/dup. Needs r <= 32 and room
// in part for swiglu_bands_part_floats(T, I, R, r) (a partial's worth less: fewer token groups); returns
// 0 (and does nothing) where it does not fit, where its one wave of blocks would leave more than 5 % of
// the multiprocessors idle, or with MOSFT_SWIGLU_ROWS=0.
size_t swiglu_bands_part_floats(int64_t T, int I, int R, int r);
int swiglu_lowrank_backward_db_cuda(cuda_ctx *ctx, bf16 *gu, int64_t ldgu, const bf16 *gout, bf16 *gh, int64_t ldh,
                                    const bf16 *B, int R, int r, int c_gate, int c_up, const bf16 *h, int64_t ldhh, float s,
                                    float *gB, int64_t T, int I, float *part, size_t part_floats);
// out[T][C] = table[ids[t]]; ids[T] device, in [0, V) (checked on the host).
void embedding_forward_cuda(cuda_ctx *ctx, bf16 *out, const int32_t *ids, const bf16 *table, int64_t T, int C);

// ---- rotary embedding and attention (cuda/attention.cu) ----
// cos/sin table for positions [0, S): cs[S][D/2] pairs (cos, sin) computed on the host exactly as
// rope_forward_cpu does; the caller uploads it (rope_table_host fills a host array of S*D floats).
void rope_table_host(float *cs, const float *inv_freq, int S, int D);
// RoPE in place on the fused projection's output qkv[B*S][ld] (token-major: Hq q heads at column 0, then
// Hkv k heads, then Hkv v heads, D columns each): the q and k heads rotated, position = index within the
// sequence; the v heads are not touched. cs[S][D/2][2].
void rope_qk_cuda(cuda_ctx *ctx, bf16 *qkv, int64_t ld, const float *cs, int B, int S, int Hq, int Hkv, int D);
// Backward: gqkv[B*S][Hq*D + 2*Hkv*D] (bf16, overwritten) from head-major fp32 gq, gk, gv, with the
// inverse rotation on q and k.
void rope_merge_backward_cuda(cuda_ctx *ctx, bf16 *gqkv, int64_t ldg, const float *gq, const float *gk, const float *gv,
                              const float *cs, int B, int S, int Hq, int Hkv, int D);
// Attention scratch bytes for chunks of `bc` sequences (scores fp32 + probabilities bf16 + the chunk's q, k, v
// head-major; the batched-GEMM path; the flash backward needs flash_attention_scratch_bytes(bc, S, Hq) instead).
size_t attention_scratch_bytes(int bc, int S, int Hq, int Hkv, int D);
// Sequences per chunk that fit `budget` bytes of scratch (at least 1).
int attention_chunk(size_t budget, int B, int S, int Hq, int Hkv, int D);
// Causal GQA attention with key padding, as attention_forward_cpu: out[B*S][Hq*D] (token-major) and
// lse[B][Hq][S] (log-sum-exp of each row's scaled scores, +inf for a row with no key) from the fused
// projection's output qkv[B*S][ldqkv] (token-major, as rope_qk_cuda) after RoPE (rope_qk_cuda).
// mask[B][S] device (1 = token). scratch: attention_scratch_bytes(bc, S, Hq, Hkv, D) bytes;
// o_tmp[B][Hq][S][D] bf16 scratch.
void attention_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, float *lse, const bf16 *qkv, int64_t ldqkv,
                            const int32_t *mask, int B, int S, int Hq, int Hkv, int D, void *scratch, int bc,
                            bf16 *o_tmp);
// Backward into the fused projection's gradient: gqkv[B*S][Hq*D + 2*Hkv*D] (bf16, row stride ldg,
// overwritten) = RoPE backward of (dQ, dK) | dV, from gout[B*S][Hq*D] (token-major dO), the forward's
// out (row stride ldo) and lse, qkv as the forward read it (q, k rotated), and the rope table
// cs[S][D/2][2]. delta[B][Hq][S] fp32 scratch. The batched-GEMM path also takes scratch
// (attention_scratch_bytes(bc, S, Hq, Hkv, D)), do_tmp[B][Hq][S][D] bf16 and gq[B][Hq][S][D],
// gk, gv[B][Hkv][S][D] fp32; with attention_uses_flash(D) they may be NULL.
void attention_backward_cuda(cuda_ctx *ctx, bf16 *gqkv, int64_t ldg, const float *cs, const bf16 *gout, const bf16 *out,
                             int64_t ldo, const float *lse, const bf16 *qkv, int64_t ldqkv, const int32_t *mask, int B,
                             int S, int Hq, int Hkv, int D, float *delta, void *scratch, int bc, bf16 *do_tmp, float *gq,
                             float *gk, float *gv);

// FlashAttention-style kernels (cuda/flash_attention.cu) serve head sizes 16, 32, 64 and 128: the two
// functions above use them (no scratch needed) unless attention_use_flash(0) or MOSFT_ATTENTION=gemm
// selects the batched-GEMM path; attention_uses_flash(D) says which one runs.
int flash_attention_supported(int D);
void attention_use_flash(int on);
int attention_uses_flash(int D);
void flash_attention_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, float *lse, const bf16 *qkv, int64_t ldqkv,
                                  const int32_t *mask, int B, int S, int Hq, int Hkv, int D);
// dO[B*S][Hq*D] token-major (row stride ldd); delta[B][Hq][S] is computed (= rowsum(dO * O)); gqkv as
// attention_backward_cuda. scratch: flash_attention_scratch_bytes(bc, S, Hq) bytes (dS of bc sequences at
// a time: the dQ kernel reads what the dK/dV kernel wrote instead of computing it again).
size_t flash_attention_scratch_bytes(int bc, int S, int Hq);
// The forward, dK/dV and dQ kernels on Hopper's warpgroup products (cuda/wgmma.cuh) at D 128 on a
// compute-capability-9 device; flash_attention_use_wgmma(0) or MOSFT_FLASH_WGMMA=0 keeps the mma.sync
// kernels (the tests run both).
void flash_attention_use_wgmma(int on);
int flash_attention_uses_wgmma(const cuda_ctx *ctx, int D);
void flash_attention_backward_cuda(cuda_ctx *ctx, bf16 *gqkv, int64_t ldg, float *delta, const bf16 *dO, int64_t ldd,
                                   const bf16 *out, int64_t ldo, const float *lse, const bf16 *qkv, int64_t ldqkv,
                                   const int32_t *mask, const float *cs, int B, int S, int Hq, int Hkv, int D, void *scratch,
                                   int bc);

// ---- GEMM algorithm choice (cuda/context.cu) ----
// With the choice on (MOSFT_GEMM_TUNE=1 or 2, or gemm_tune_set_level; -1: back to the environment, whose
// default is off), products of at least `flop` (2 M N K; default 5e10) choose their cuBLASLt algorithm
// by measurement the second time they run (see gemm_tune); tests lower it to reach small shapes.
void gemm_tune_set_level(int level);
void gemm_tune_set_min_flop(double flop);
// An order-independent 64-bit hash of rows x wpr 32-bit words with row stride ldw (words): the CUDA
// kernel (part: 256 words of device scratch; synchronizes) and its CPU twin give the same value.
uint64_t bits_hash_cuda(cuda_ctx *ctx, const uint32_t *d, int64_t rows, int64_t wpr, int64_t ldw, uint64_t *part);
uint64_t bits_hash_cpu(const uint32_t *d, int64_t rows, int64_t wpr, int64_t ldw);

// ---- lm_head + cross-entropy (cuda/loss.cu) ----
// Rows per chunk so that the chunk's scratch (lmhead_ce_scratch_bytes) takes at most `budget` bytes.
int64_t lmhead_ce_chunk_rows(size_t budget, int C, int V);
size_t lmhead_ce_scratch_bytes(int64_t chunk_rows, int C, int V);
// Chunked lm_head + causal-LM cross-entropy (lmhead_ce_forward_backward_cpu): for each chunk of rows
// (equal chunks of at most chunk_rows, the scratch's size), logits = h W^T (fp32 accumulation, rounded
// to bf16 as transformers' bf16 lm_head gives them; fp32 when logits_host wants them), per-row loss
// (fp32 softmax), and with gh: dlogits = scale * (softmax - onehot) (bf16) and gh[rows] = dlogits W
// (fp32, overwritten). targets[T] already shifted (-100 = ignored: loss 0, no gradient). row_loss[T]
// (fp32) receives each row's loss. rows[n_list] (device; NULL: all T rows)
// lists the rows to compute, normally the supervised ones, in its first n_rows entries (ascending);
// the entries after them (any valid row) only pad the list, so that the chunks' shapes recur from
// batch to batch (see CE_ROW_QUANTUM in step_cuda.cu). Rows not listed get loss 0 and a zero gh row
// without a GEMM. logits_host (host, [T][V], NULL normally; only with rows == NULL and gh == NULL)
// receives every row's fp32 logits (synchronizes).
void lmhead_ce_cuda(cuda_ctx *ctx, const bf16 *h, const bf16 *W, const int32_t *targets, int64_t T, int C, int V,
                    float scale, float *gh, float *row_loss, float *logits_host, void *scratch, int64_t chunk_rows,
                    const int32_t *rows, int64_t n_rows, int64_t n_list);

// ---- optimizer and reductions (cuda/optim.cu) ----
// AdamW (adamw_update_cpu bit for bit) on param[n] with grad*grad_scale; moments m, v in place.
void adamw_cuda(cuda_ctx *ctx, float *param, const float *grad, float *m, float *v, int64_t n, float grad_scale,
                double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step);
// Sum of squares of x[n] in double, in a fixed order (deterministic); partial: reduce_scratch_bytes.
// Synchronizes and returns the value.
size_t reduce_scratch_bytes(int64_t n);
double sum_squares_cuda(cuda_ctx *ctx, const float *x, int64_t n, void *partial);
// Sum of x[n] (fp32 values, summed in double in a fixed order). Synchronizes.
double sum_f32_cuda(cuda_ctx *ctx, const float *x, int64_t n, void *partial);
// x[n] *= s
void scale_f32_cuda(cuda_ctx *ctx, float *x, int64_t n, float s);

// ---- adapters (cuda/adapter.cu) ----
// How to build one (layer, module)'s effective low-rank factors from the fp32 parameter buffer, for
// the methods whose factors are gathered shards (MoS, LoRA):
//   A[k][j*sa + c] = scale[k] * params[offA[k*l + j] + c]                 A: r x d_in,  sa = d_in / l
//   B[j*sb + c][k] =            params[offB[k*l + j] + c * strideB]        B: d_out x r, sb = d_out / l
// (B, and dL/dB, with row stride ldB >= r: a block of a wider block-diagonal matrix.)
// and the gradients go back with the transposed map (scatter: += into grad at the same places).
// Within one (layer, module) every target address is distinct (MoS tables never repeat an index in a
// layer), so the scatter kernels need no atomics, and launches in stream order keep it deterministic.
typedef struct {
    int r, l, d_in, d_out, strideB;
    float scaleB;                // B is gathered as scaleB * B (the adapter's alpha / r folded in)
    const int64_t *offA, *offB;  // [r*l] device
    const float *scaleA;         // [r] device, NULL = 1
    int ldB;                     // row stride of B and gB (r when standalone)
} lowrank_map;
// The host arrays of one (layer, module)'s map from an adapter's tensors and index tables: offA, offB
// [r*l], scale [r] (filled when *has_scale), *l, *strideB. MOSFT_ERR_INPUT for methods that are not
// gathered shards (only MoS and LoRA are).
int lowrank_map_host(const adapter *ad, int layer, int module, int64_t *offA, int64_t *offB, float *scale,
                     int *has_scale, int *l, int *strideB);
// Shards per vector of the adapter's maps (1 for LoRA).
int lowrank_map_shards(const adapter *ad);
// Each job's A[r][d_in] and B[d_out][ldB] (bf16) from params, every job in one launch (a model's 7 L
// (layer, module) pairs, once a step): jobs [n] in device memory; n_max >= every job's r d_in and d_out r.
typedef struct {
    lowrank_map mp;
    bf16 *A, *B;
} lowrank_gather_job;
void lowrank_gather_batch_cuda(cuda_ctx *ctx, const lowrank_gather_job *jobs, int n, int64_t n_max, const float *params);
// A weight group's adapter blocks into its K-augmented buffer (row stride ld): B [d_out][R] beside the
// weight's rows (columns d_in ..), A [R][d_in] below them (rows d_out ..); one launch on `st` when
// R, d_in and ld are multiples of 8 (16-byte rows), else two 2D copies. adapter_block_pieces: the same
// two blocks as pieces of a weight_group_fill_cuda launch (p[2]; returns 2).
void adapter_blocks_cuda(cudaStream_t st, bf16 *buf, int64_t ld, int d_in, int d_out, const bf16 *B, const bf16 *A, int R);
int adapter_block_pieces(weight_piece *p, bf16 *buf, int64_t ld, int d_in, int d_out, const bf16 *B, const bf16 *A, int R);
// grad += the maps of gA[r][d_in] and gB[d_out][ldB] (fp32).
void lowrank_scatter_cuda(cuda_ctx *ctx, const lowrank_map *mp, const float *gA, const float *gB, float *grad);
// The same for the n (<= 3) modules of one layer's group in one launch: mp[i], gA[i], gB[i].
void lowrank_scatter_group_cuda(cuda_ctx *ctx, const lowrank_map *mp, int n, const float *const *gA, const float *const *gB,
                                float *grad);
// Dropout on the adapter input: xd[T][d_in] = x * mask (mask from rng_keep16(key, t*d_in + c, thr) with
// the multiplier `keep` = 1/(1-p)); x has row stride ldx. bits (NULL: none) receives the mask as bits:
// element e = t*d_in + c kept <=> bit e % 32 of bits[e / 32] (dropout_mask_words(T, d_in) words).
void dropout_apply_cuda(cuda_ctx *ctx, bf16 *xd, const bf16 *x, int64_t ldx, int64_t T, int d_in, uint64_t key,
                        uint32_t thr, float keep, uint32_t *bits);
int64_t dropout_mask_words(int64_t T, int d_in);
// With dropout, dL/dA of a group of n modules sharing one input, in one pass over x:
//   gA[i r + j][c] (fp32 [n r][d_in], overwritten) = sum_t gh[t][i r + j] * bf16(x[t][c] * mask_i[t][c])
// gh bf16 (row stride ldgh, the modules' r columns side by side), x bf16 (row stride ldx); mask_i from
// keys[i] as dropout_apply_cuda, or from bits[i] (the bits dropout_apply_cuda kept; needs d_in % 32 == 0)
// when bits (a host array of n device pointers) is not NULL. Splits T over fp32 partials in `part`
// (part_floats of room; NULL: no split), summed in a fixed order. lowrank_dropout_fused_fits(n, r): the
// shapes of this kernel and the next (r % 16 == 0, n r <= 96).
int lowrank_dropout_fused_fits(int n, int r);
void lowrank_dropout_da_cuda(cuda_ctx *ctx, float *gA, const bf16 *gh, int64_t ldgh, const bf16 *x, int64_t ldx, int n,
                             int r, int64_t T, int d_in, const uint64_t *keys, uint32_t thr, float keep,
                             const uint32_t *const *bits, float *part, size_t part_floats);
// With dropout, the adapter inputs h of a group of n modules sharing one input, in one pass over x:
//   h[t][i r + j] (bf16, row stride ldh) = bf16(sum_c bf16(x[t][c] * mask_i[t][c]) * A_i[j][c])
// A [n r][d_in] bf16 (A_i = rows [i r, i r + r)), masks from keys as dropout_apply_cuda; bits (NULL: none;
// d_in % 32 == 0) receives each module's mask as dropout_apply_cuda would keep it. Splits d_in over fp32
// partials in `part` (part_floats of room; NULL: no split), summed in a fixed order.
void lowrank_dropout_h_cuda(cuda_ctx *ctx, bf16 *h, int64_t ldh, const bf16 *x, int64_t ldx, const bf16 *A, int n, int r,
                            int64_t T, int d_in, const uint64_t *keys, uint32_t thr, float keep, uint32_t *const *bits,
                            float *part, size_t part_floats);
// With dropout, the input gradient of a group of n (<= 3) modules sharing one input:
//   gx[T][d_in] (+=, fp32 or bf16 by gx_f32, row stride ldgx) += sum_i mask_i * (gh_i A_i)
// gh_i = columns [i r, i r + r) of gh (bf16, row stride ldgh), A_i = rows [i r, i r + r) of A [n r][d_in]
// (bf16), mask_i from keys[i] (host array) as dropout_apply_cuda, or read from bits[i] (host array of
// device pointers, NULL: none; d_in % 32 == 0) where the forward kept them. One pass over gx; the
// products on the tensor cores (bf16 in, fp32 sums).
void lowrank_dropout_dx_cuda(cuda_ctx *ctx, void *gx, int gx_f32, int64_t ldgx, const bf16 *gh, int64_t ldgh,
                             const bf16 *A, int n, int r, int64_t T, int d_in, const uint64_t *keys, uint32_t thr,
                             float keep, const uint32_t *const *bits);

// ---- device memory ----
// A bump allocator over one cudaMalloc: every buffer of a phase comes from it, aligned to 256 bytes.
typedef struct {
    char *base;
    size_t size, used, high;
} cuda_arena;
// 0 on success; MOSFT_ERR_RUNTIME (message recorded) when the device is out of memory.
int cuda_arena_init(cuda_arena *a, size_t bytes);
void cuda_arena_free(cuda_arena *a);
void *cuda_arena_alloc(cuda_arena *a, size_t bytes);  // asserts that the plan was big enough
static inline size_t cuda_align(size_t n) { return (n + 255) & ~(size_t)255; }

#ifdef __cplusplus
}
#endif
#endif
