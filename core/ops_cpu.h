// ops_cpu.h: the per-operation CPU reference kernels of the training engine (fp32, plain C loops).
//
// Every op of the LLaMA forward/backward that the engine calls exists here once, in fp32, and the CUDA
// backend has a twin of each (`rmsnorm_forward_cpu` / `rmsnorm_forward_cuda`) that is tested against
// it. The model they serve is HF LlamaForCausalLM:
//   x = embed(ids)
//   per layer: h = rmsnorm(x); q,k,v = h Wq^T, h Wk^T, h Wv^T; rope(q), rope(k);
//              x += attention(q, k, v) Wo^T;
//              h = rmsnorm(x); x += (silu(h Wg^T) * (h Wu^T)) Wd^T
//   h = rmsnorm(x); loss = cross_entropy(h Wlm^T, labels shifted by one)
// The base is frozen: no op computes a weight gradient of the model (only input gradients), except
// matmul_backward_weight_cpu, which the adapters use for their own small factors.
//
// Conventions shared by every function here:
//  - Row-major tensors; the shape of each pointer is written beside it. T is the number of token rows
//    (B*S); C, K, N, I, V are feature widths.
//  - Backward functions ACCUMULATE into their input gradients (+=), as in llm.c, so that the engine
//    can sum the contributions of several branches (a base linear and its adapter) into one buffer;
//    zero them before the first contribution. The exceptions say so (rope works in place).
//  - Determinism: each output element is reduced in one fixed order, whatever the number of threads,
//    so a run is bit-for-bit reproducible across thread counts (tested with 1 and 2 threads). The
//    matmuls sum over k in ascending order in fp32 without fused multiply-add, so their results are
//    also identical to a naive triple loop and to any x86-64 machine.
//  - Threads: OpenMP (the build adds -fopenmp), ops_cpu_threads() of them (MOSFT_THREADS or the
//    online cores by default; OMP_NUM_THREADS is not consulted). libgomp does not survive fork():
//    a process that forks WITHOUT exec after it ran a parallel op hangs in the child's next one. Fork
//    (check's CK_FORK test mode, worker processes) before the first op, or exec.
//  - Workspace: a few ops allocate scratch memory per call (said at each); nothing is kept between calls.
//  - Sums that feed a statistic (rmsnorm's mean of squares, softmax denominators, log-sum-exp, losses,
//    the global gradient norm) are accumulated in double, so the reference is as exact as fp32 storage
//    allows; dot products (matmul, attention scores and outputs) are sequential fp32 sums.
#ifndef MOSFT_OPS_CPU_H
#define MOSFT_OPS_CPU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- threads ----
// Number of OpenMP threads the ops use; n <= 0 restores the default (mosft_num_threads()).
void ops_cpu_set_threads(int n);
int ops_cpu_threads(void);

// ---- matrix multiplication (core/ops_matmul_cpu.c) ----
// General product C = (accumulate ? C : 0) + op(A) op(B), with op(A) of shape [M][K], op(B) [K][N]:
//   op(A)[i][k] = trans_a ? A[k*lda + i] : A[i*lda + k]
//   op(B)[k][j] = trans_b ? B[j*ldb + k] : B[k*ldb + j]
// C[M][N] with row stride ldc. Each C[i][j] is its start value plus the products added one by one in
// ascending k, in fp32 (cache-blocked, packed, SIMD across j, multithreaded over C tiles).
// Workspace: a packed block of A and of B per thread per call (< 1 MiB each).
void gemm_cpu(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
              const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate);
// The micro-kernel is AVX2 when the CPU has it, else SSE (the x86-64-v2 baseline); both give the same
// bits. on = 1 forces the SSE one (tests, benchmarks; also MOSFT_GEMM_SSE=1), 0 restores the choice.
void gemm_cpu_force_baseline(int on);

// A linear layer without bias, y = x W^T (HF nn.Linear layout: W [N][K] = [out_features][in_features]).
// out[T][N] = (accumulate ? out : 0) + inp[T][K] W[N][K]^T
void matmul_forward_cpu(float *out, const float *inp, const float *W, int64_t T, int K, int N, int accumulate);
// ginp[T][K] += gout[T][N] W[N][K]
void matmul_backward_input_cpu(float *ginp, const float *gout, const float *W, int64_t T, int K, int N);
// gW[N][K] += gout[T][N]^T inp[T][K]   (the sum over t in ascending order)
void matmul_backward_weight_cpu(float *gW, const float *gout, const float *inp, int64_t T, int K, int N);

// ---- normalization, activation, embedding, rotary (core/ops_cpu.c) ----
// HF LlamaRMSNorm in fp32: out = weight * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps).
// out[T][C], rstd[T] (saved for backward; may be NULL), inp[T][C], weight[C]. out may alias inp.
void rmsnorm_forward_cpu(float *out, float *rstd, const float *inp, const float *weight, int64_t T, int C,
                         float eps);
// ginp[T][C] += d/dinp of sum(gout * out); gout[T][C], inp[T][C], weight[C] (frozen: no gradient),
// rstd[T] from the forward, or NULL to recompute it with eps.
void rmsnorm_backward_cpu(float *ginp, const float *gout, const float *inp, const float *weight, const float *rstd,
                          int64_t T, int C, float eps);

// SwiGLU of the LLaMA MLP: out = silu(gate) * up, silu(g) = g / (1 + exp(-g)); elementwise over n = T*I.
// out[n] (may alias gate or up), gate[n], up[n].
void swiglu_forward_cpu(float *out, const float *gate, const float *up, int64_t n);
// ggate[n] += gout * up * silu'(gate); gup[n] += gout * silu(gate). gout[n], gate[n], up[n].
void swiglu_backward_cpu(float *ggate, float *gup, const float *gout, const float *gate, const float *up, int64_t n);

// Row lookup: out[T][C] = table[ids[t]][C]; ids[T] in [0, V) (asserted), table[V][C]. The table is
// frozen, so there is no backward.
void embedding_forward_cpu(float *out, const int32_t *ids, const float *table, int64_t T, int C, int V);

// Rotary position embedding, HF "rotate half" layout: for each head, pairs (x[i], x[i + D/2]),
// i < D/2, are rotated by the angle a = pos[t] * inv_freq[i] (computed in fp32 as HF does):
//   x[i]       <- x[i] cos a - x[i + D/2] sin a
//   x[i + D/2] <- x[i + D/2] cos a + x[i] sin a
// x[T][H][D] in place; pos[T] (0..S-1 within each sequence); inv_freq[D/2] (llama_rope_inv_freq, as fp32).
void rope_forward_cpu(float *x, const int32_t *pos, const float *inv_freq, int64_t T, int H, int D);
// The transpose rotation (angle -a), in place on the gradient g[T][H][D]: turns dL/d(rope(x)) into dL/dx.
void rope_backward_cpu(float *g, const int32_t *pos, const float *inv_freq, int64_t T, int H, int D);

// ---- attention (core/ops_attention_cpu.c) ----
// Causal grouped-query attention with a key padding mask, as HF LlamaAttention (sdpa) computes it:
// query head h reads kv head h / (Hq/Hkv); query i attends to key j iff j <= i and mask[b][j] != 0;
// p = softmax(q.k * 1/sqrt(D)) in fp32 (max-subtracted, the denominator summed in double); out = p v.
// Keys scoring more than 46 below the row's maximum get p = 0 exactly (their weight is < 1e-20; this
// keeps subnormal floats, ~50x slower on x86, out of the loops).
// Rows of padding (mask 0) still attend causally to the real keys before them, which with right
// padding is exactly what HF computes (their outputs are finite and the loss ignores them). A row with
// no allowed key at all (left padding before the first real token) gets out = 0 and no gradient.
// out[B][S][Hq*D], q[B][S][Hq*D], k[B][S][Hkv*D], v[B][S][Hkv*D], mask[B][S] (NULL = all real).
// Workspace: one row of S scores per thread.
void attention_forward_cpu(float *out, const float *q, const float *k, const float *v, const int32_t *mask, int B,
                           int S, int Hq, int Hkv, int D);
// Backward, recomputing the probabilities from q and k (nothing is saved by the forward):
// gq[B][S][Hq*D] +=, gk[B][S][Hkv*D] +=, gv[B][S][Hkv*D] +=; gout[B][S][Hq*D]. Parallel over
// (b, kv head): each thread owns whole slices of gk/gv, so their sums keep a fixed order.
// Workspace: two rows of S per thread.
void attention_backward_cpu(float *gq, float *gk, float *gv, const float *gout, const float *q, const float *k,
                            const float *v, const int32_t *mask, int B, int S, int Hq, int Hkv, int D);

// ---- lm_head + cross-entropy (core/ops_loss_cpu.c) ----
#define OPS_IGNORE_INDEX (-100)
// Causal LM loss fused with the lm_head matmul, one chunk of rows at a time so that the [T][V] logits
// are never held whole: logits = h W^T, loss_t = logsumexp(logits_t) - logits_t[targets[t]].
// h[T][C] final-normed hidden states; W[V][C] lm_head (or the tied embedding); targets[T] already
// shifted (the label of position t is token t+1), OPS_IGNORE_INDEX = not supervised, else in [0, V).
// Returns the sum of the losses of the supervised rows (double; log-sum-exp in double from fp32
// logits); *n_counted (may be NULL) receives their number.
// gh[T][C] (+=, NULL = no backward, e.g. evaluation) receives scale * d(sum of losses)/dh, with
// scale = 1 / (supervised tokens of the whole optimizer step), so the micro-batches sum to the mean.
// (In dlogits = scale * (softmax - onehot), probabilities below 1e-20 are flushed to 0: they cannot
// change dh in fp32, and the subnormal products they would make slow the matmul down ~50x.)
// logits_out[T][V] (NULL normally; for tests) receives every row's logits, ignored rows included.
// Workspace: up to 64 MiB of logits per chunk plus the chunk's rows of h and gh.
double lmhead_ce_forward_backward_cpu(const float *h, const float *W, const int32_t *targets, int64_t T, int C,
                                      int V, float scale, float *gh, float *logits_out, int64_t *n_counted);
// Rows per chunk (0 = the 64 MiB default); tests use it to cross chunk boundaries with a small V.
void lmhead_ce_set_chunk_rows_cpu(int64_t rows);
// One row of it: returns logsumexp(l) - l[y] (in double); with grad, overwrites l[V] with
// scale * (softmax(l) - onehot(y)), flushed as above. (The GPU tests feed it bf16-rounded logits.)
double ce_row_cpu(float *l, int V, int y, float scale, int grad);

// ---- optimizer (core/ops_cpu.c) ----
// One torch.optim.AdamW step (single-tensor path), in fp32 as torch does it, step counted from 1:
//   param *= 1 - lr*wd;  m = lerp(m, g, 1 - beta1);  v = beta2*v + (1 - beta2)*g*g
//   param -= lr/(1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
// param[n], grad[n], m[n], v[n] (moments, updated in place).
void adamw_update_cpu(float *param, const float *grad, float *m, float *v, int64_t n, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int64_t step);
// Sum of squares of x[n] in double (fixed blocks, summed in order), for global-norm clipping.
double global_norm_sq_cpu(const float *x, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
