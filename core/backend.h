// backend.h: the op table the training loop (core/train.c) calls. Two implementations: the CPU
// reference (core/backend_cpu.c, plain fp32 C) and CUDA (cuda/backend_cuda.cu). train.c reads the same
// for both: it hands micro-batches to forward_backward, asks for the gradient norm, steps the optimizer
// and copies state out for checkpoints.
//
// Gradients of one optimizer step accumulate over its micro-batches; each micro-batch's loss is scaled
// by `loss_scale` = 1 / (supervised tokens of the whole step), so the accumulated gradient is that of
// the mean loss over the step (correct under gradient accumulation, as HF's loss with
// num_items_in_batch).
#ifndef MOSFT_BACKEND_H
#define MOSFT_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "core/adapter.h"
#include "core/config.h"
#include "core/model.h"

#ifdef __cplusplus
extern "C" {
#endif

// One micro-batch, right-padded.
typedef struct {
    int B, S;
    const int32_t *input_ids;  // [B][S]
    const int32_t *labels;     // [B][S] -100 = no loss; NOT shifted (label t is the target of t-1's logits)
    const int32_t *attn_mask;  // [B][S] 1 = token, 0 = padding
} micro_batch;

// Where dropout randomness comes from: key = rng_key(RNG_DROPOUT, seed, step, micro, layer*8 + module).
typedef struct {
    uint64_t seed;
    int64_t step;
    int micro;
} dropout_ctx;

// Bytes by category, for the memory plan printed before step 1.
typedef struct {
    double weights;     // frozen base (NF4 or fp32/bf16), embeddings, norms, lm_head
    double adapter;     // trainable params (master), gradients, AdamW moments, frozen adapter buffers
    double activations; // saved for backward at the chosen recompute level, for one micro-batch
    double workspace;   // scratch: dequantized weight buffer, logits chunk, GEMM workspace
    double total;
    char device[64];    // "CPU (host memory)" / "NVIDIA H100 80GB HBM3 (79.1 GiB)"
    double capacity;    // bytes available on the device (0 = unknown)
    char weights_note[48];  // how the base is kept ("NF4", "NF4 kept dequantized (bf16)", ...; "" = say nothing)
    char hint[256];         // a setting that would pay here ("" = none): printed under the plan
} mem_plan;

typedef struct backend backend;

typedef struct backend_ops {
    const char *name;  // "cpu" | "cuda"
    // Memory plan for micro-batches of B x S.
    void (*memory_plan)(backend *be, int B, int S, mem_plan *plan);
    // Forward and backward of one micro-batch; gradients accumulate. Returns MOSFT_OK or an error
    // (out of memory: MOSFT_ERR_RUNTIME with a hint). loss_sum and n_tokens are this micro-batch's
    // summed token losses and supervised token count (unscaled).
    int (*forward_backward)(backend *be, const micro_batch *mb, float loss_scale, const dropout_ctx *dc,
                            double *loss_sum, int64_t *n_tokens);
    // Forward only, no dropout (evaluation).
    int (*forward_loss)(backend *be, const micro_batch *mb, double *loss_sum, int64_t *n_tokens);
    // Forward only, writing every row's logits (fp32 [B*S][vocab]); for tests and comparisons.
    int (*forward_logits)(backend *be, const micro_batch *mb, float *logits);
    // Global L2 norm of the accumulated gradients (over all trainable parameters).
    double (*grad_norm)(backend *be);
    // AdamW on every trainable parameter with gradients multiplied by grad_scale (clipping), learning
    // rate lr, bias correction for optimizer step `t` (1-based); then zero the gradients.
    void (*optimizer_step)(backend *be, float lr, float grad_scale, int64_t t);
    void (*zero_grad)(backend *be);
    // Copy trainable params (into adapter->params) and AdamW moments (m, v: n_params each) out / in.
    void (*sync_to_adapter)(backend *be);
    void (*get_moments)(backend *be, float *m, float *v);
    void (*set_state)(backend *be, const float *params, const float *m, const float *v);
    // Gradients as a host copy (n_params floats), for tests.
    void (*get_grads)(backend *be, float *g);
    // Device memory in use now (bytes), for the progress line; NULL: host resident memory is shown.
    double (*memory_used)(backend *be);
    void (*destroy)(backend *be);
} backend_ops;

struct backend {
    const backend_ops *ops;
    adapter *ad;        // the adapter being trained (params live here on CPU; synced on GPU)
    llama_config cfg;
    char recompute[16];  // none | partial | full
    float dropout;      // adapter dropout probability
    double beta1, beta2, eps, weight_decay;
    char device_name[128];
    double flops_peak;  // bf16 dense peak of the device (MFU), 0 on CPU
    void *impl;
};

// Training-time options the backend needs.
typedef struct {
    const char *recompute;
    double beta1, beta2, eps, weight_decay;
    int threads;  // CPU
    int keep_dequantized;  // CUDA, NF4 base: a bf16 copy made once at load instead of dequantizing per use
} backend_opts;

// The CPU reference backend on a loaded model.
int backend_cpu_create(backend **out, const llama_model *model, adapter *ad, const backend_opts *opt);
// The CUDA backend: loads/quantizes the model itself from model_dir (NULL if built without CUDA).
int backend_cuda_create(backend **out, const char *model_dir, const char *quantization, int double_quant, adapter *ad,
                        const backend_opts *opt);
// The CUDA backend on random weights of `cfg`'s shapes, generated on the device (`mosft bench`).
int backend_cuda_create_random(backend **out, const llama_config *cfg, const char *quantization, int double_quant,
                               uint64_t seed, adapter *ad, const backend_opts *opt);
// Is a CUDA device usable? (0 in CPU-only builds or without a GPU)
int backend_cuda_available(char *name, size_t n);
// Can the CUDA backend train this adapter on a model of these dimensions? MOSFT_OK, or MOSFT_ERR_INPUT
// saying why (a token-routed method, head sizes the kernels do not take); device "auto" then falls back
// to the CPU.
int backend_cuda_supports(const adapter *ad, const llama_config *cfg);
void backend_destroy(backend *be);
// Every input id in [0, vocab) and every label -100 or in [0, vocab): MOSFT_OK, or MOSFT_ERR_INPUT naming
// the row (both backends check a micro-batch before touching it).
int backend_check_batch(const backend *be, const micro_batch *mb);

#ifdef __cplusplus
}
#endif
#endif
