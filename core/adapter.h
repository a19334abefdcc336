// adapter.h: the adapter interface the training engine calls for every adapted linear, and the
// adapter object (trainable parameters in one contiguous fp32 buffer, frozen buffers, metadata).
//
// Two families sit behind one interface:
//  - low-rank (MoS, LoRA, PRoLoRA, VeRA, Tied-LoRA, ShareLoRA): for layer i and linear type t the
//    adapter builds dense effective factors A (r x d_in) and B (d_out x r), frozen and trainable
//    scales folded in, and maps the gradients of those factors back onto its own parameters
//    (`scatter`). The engine does the rest, identically for every method:
//        xd = dropout(x);  h = xd A^T;  y += s * h B^T                         (s = a->scaling)
//        gB = s * gy^T h;  gh = s * gy B;  gA = gh^T xd;  gx += (gh A) * mask / (1 - p)
//    adapter_lowrank_forward_cpu / adapter_lowrank_backward_cpu below are that math in plain C.
//  - token-routed (SiRA): the adapter computes its branch itself from xd (forward / backward).
//
// Parameters live in a->params[n_params] (fp32 master weights), described by named views
// (a->tensors); the optimizer, gradient clipping, the all-reduce of later multi-GPU training and the
// checkpoint all see that one buffer. Frozen state (MoS index tables, VeRA projections, random
// scales) lives in named buffers (a->buffers) and is saved with the adapter, never regenerated.
//
// Adding a method (issue 8): write core/adapter_<method>.c defining `const adapter_ops
// adapter_ops_<method>` and add it to k_methods in core/adapter.c. The engine, adapter.mos, `mosft
// info` and (for low-rank methods) `mosft export` need no change. Initialization must use the rng.h
// counter streams (RNG_INIT, RNG_INDEX, RNG_SCALE keyed by spec.seed) so that one seed gives the same
// adapter on every machine.
#ifndef MOSFT_ADAPTER_H
#define MOSFT_ADAPTER_H

#include <stddef.h>
#include <stdint.h>

#include "core/config.h"
#include "core/dtype.h"
#include "core/model.h"

#ifdef __cplusplus
extern "C" {
#endif

#define ADAPTER_NAME_MAX 96

// Everything that defines an adapter (copied from the config's "adapter" section).
typedef struct {
    char method[16];   // mos | lora | prolora | vera | tied_lora | sharelora | sira
    int r;             // per-layer rank (MoS: the MoS rank r)
    int equiv_rank;    // MoS R_v
    int private_rank;  // MoS R_p
    int shards;        // MoS l
    double alpha, dropout;
    int targets[MOD_COUNT];
    uint64_t seed;
    int pair_dissociation, pure_sharing, subset_selection;
    double scale_mean, scale_std;
    int prolora_unshared_r, prolora_reduce_a, prolora_reduce_b;
    double vera_d_initial;
    uint64_t vera_projection_seed;
    char tied_lora_trainable[8];
    char sharelora_share[8];
    int sira_experts, sira_top_k;
    double sira_capacity_factor, sira_expert_dropout;
} adapter_spec;

void adapter_spec_from_config(adapter_spec *s, const mosft_config *c);

typedef struct {
    char name[ADAPTER_NAME_MAX];  // "mos.q.pool_A"
    int ndim;
    int64_t shape[4];
    size_t offset, numel;  // view into adapter.params (floats)
} adapter_tensor;

typedef struct {
    char name[ADAPTER_NAME_MAX];  // "mos.q.index_A"
    mosft_dtype dtype;            // I32 or F32
    int ndim;
    int64_t shape[4];
    void *data;  // owned
    size_t nbytes;
} adapter_buffer;

typedef struct adapter adapter;

typedef struct adapter_ops {
    const char *method;
    int routed;  // 0: low-rank (build/scatter), 1: token-routed (forward/backward)
    // Create tensors and buffers for a->spec on a->model and initialize them (seeded). Checks the
    // method's constraints against the model's dimensions (clear MOSFT_ERR_INPUT messages).
    // When a->loading is set (adapter_load), only the layout is made (tensors, buffers, a->impl,
    // a->rank, a->scaling); the values come from the file.
    int (*init)(adapter *a);
    // After adapter_load filled params and buffers: check the values (index ranges, distinctness,
    // the structure the spec implies). A hand-edited file is a MOSFT_ERR_INPUT, never a crash.
    int (*attach)(adapter *a);
    // Low-rank: the effective A [r][d_in] and B [d_out][r] of (layer, module); r = a->rank.
    void (*build)(const adapter *a, int layer, int module, float *A, float *B);
    // Low-rank: add the contribution of dL/dA [r][d_in] and dL/dB [d_out][r] to grad[n_params].
    // Must be deterministic (fixed order, no races).
    void (*scatter)(const adapter *a, int layer, int module, const float *gA, const float *gB, float *grad);
    // Routed: y[T][d_out] += branch(xd[T][d_in]); `key` seeds its own randomness (gate dropout);
    // tok_mask[T] (NULL: every row is a token) marks padding rows (0), which are not routed.
    void (*forward)(const adapter *a, int layer, int module, const float *xd, int64_t T, float *y, int training,
                    uint64_t key, const int32_t *tok_mask);
    // Routed: gxd[T][d_in] += d branch / d xd; grad[n_params] += parameter gradients.
    void (*backward)(const adapter *a, int layer, int module, const float *xd, const float *gy, int64_t T,
                     float *gxd, float *grad, int training, uint64_t key, const int32_t *tok_mask);
    void (*free_impl)(adapter *a);
    // Trainable parameters this spec would have on this model (no allocation).
    int64_t (*count_params)(const adapter_spec *s, const llama_config *m);
    // The method's constraints against the model's dimensions, without allocating (NULL: none);
    // MOSFT_ERR_INPUT naming the constraint, the config key and the model's dimensions.
    int (*check)(const adapter_spec *s, const llama_config *m);
} adapter_ops;

struct adapter {
    const adapter_ops *ops;
    adapter_spec spec;
    llama_config model;     // the base model's dimensions (part of the fingerprint)
    char model_fingerprint[1024];  // JSON (dims + target tensor names), written into adapter.mos
    char base_model_name[512];     // base_model_name_or_path for export ("" = unknown)
    float scaling;          // s in the forward: alpha / r (VeRA: 1)
    int rank;               // r of the built factors (pure sharing: R_v * L)
    float *params;          // [n_params] trainable, fp32
    size_t n_params;
    adapter_tensor *tensors;
    int n_tensors;
    adapter_buffer *buffers;
    int n_buffers;
    int64_t step;           // training step the values belong to
    int loading;            // set while adapter_load builds the layout (init skips the values)
    void *impl;             // method-specific
};

// Create and initialize an adapter for a model. MOSFT_ERR_INPUT for constraint violations.
int adapter_create(adapter **out, const adapter_spec *spec, const llama_config *model);
// The layout only (tensors and buffers zero-filled, nothing drawn): what adapter_load fills.
int adapter_create_layout(adapter **out, const adapter_spec *spec, const llama_config *model);
// Check a spec against a model without building it (unknown method, the method's constraints).
int adapter_spec_check(const adapter_spec *spec, const llama_config *model);
// The spec as a JSON object with the config's key names (the "adapter" section of a config), the
// common keys and the method's own (malloc'd).
char *adapter_spec_to_json(const adapter_spec *spec);
// base_model_name_or_path recorded in adapter.mos and written by export.
void adapter_set_base_model_name(adapter *a, const char *name);
void adapter_free(adapter *a);
// The ops of a method name (NULL if unknown).
const adapter_ops *adapter_ops_find(const char *method);
// Trainable parameter count for a spec on a model, without building it (-1: unknown method).
int64_t adapter_param_count(const adapter_spec *spec, const llama_config *model);
// The targets' HF names joined ("q_proj,k_proj,...") into out.
void adapter_targets_str(const adapter_spec *spec, char *out, size_t n);
// Is module `m` adapted?
static inline int adapter_targets(const adapter *a, int m) { return a->spec.targets[m]; }

// Add a trainable tensor view / a frozen buffer (used by the methods' init). Returns its index.
int adapter_add_tensor(adapter *a, const char *name, int ndim, const int64_t *shape);
int adapter_add_buffer(adapter *a, const char *name, mosft_dtype dtype, int ndim, const int64_t *shape);
// Allocate a->params once all tensors are added (zero-filled).
void adapter_alloc_params(adapter *a);
adapter_tensor *adapter_find_tensor(const adapter *a, const char *name);
adapter_buffer *adapter_find_buffer(const adapter *a, const char *name);
static inline float *adapter_tensor_data(const adapter *a, const adapter_tensor *t) { return a->params + t->offset; }
// An `attach` for methods whose frozen F32 buffers come from the file (VeRA, Tied-LoRA): every value
// finite, since a non-finite one would poison every layer; else MOSFT_ERR_INPUT naming the entry.
int adapter_check_buffers_finite(adapter *a);

// adapter.mos (a safetensors file): params (F32), buffers, __metadata__ {format: "mos", format_version,
// adapter config, base-model fingerprint, step}. Written atomically.
int adapter_save(const adapter *a, const char *path);
// Load; when `model` is given, a different base model is a clear MOSFT_ERR_INPUT. Without it the
// model's dimensions come from the file's fingerprint (export, info).
int adapter_load(adapter **out, const char *path, const llama_config *model);

// ---- one adapted linear on CPU, any method (the fp32 reference the CUDA backend is held to) ----
// x [T][d_in] (the linear's input), mask NULL or [T][d_in] dropout multipliers (adapter_dropout_mask),
// y [T][d_out] holding the base output W0 x: y += adapter branch. `key` seeds a routed method's own
// randomness (training only).
void adapter_forward_cpu(const adapter *a, int layer, int module, int64_t T, const float *x, const float *mask,
                         float *y, int training, uint64_t key);
// gy [T][d_out] -> gx [T][d_in] += d branch / dx; grad [n_params] += the parameters' gradients (scattered
// in a fixed order, so the result is deterministic).
void adapter_backward_cpu(const adapter *a, int layer, int module, int64_t T, const float *x, const float *mask,
                          const float *gy, float *gx, float *grad, int training, uint64_t key);

// ---- the engine's low-rank math on CPU (fp32 reference) ----
// x, y: [T][d_in], [T][d_out]; A [r][d_in], B [d_out][r]; mask: NULL (no dropout) or [T][d_in] of
// 0 / (1/(1-p)) multipliers. h_out [T][r] (saved for backward, may be NULL).
void adapter_lowrank_forward_cpu(int64_t T, int d_in, int d_out, int r, float s, const float *x, const float *mask,
                                 const float *A, const float *B, float *y, float *h_out);
// gy [T][d_out] -> gx [T][d_in] (+=), gA [r][d_in] (=), gB [d_out][r] (=).
void adapter_lowrank_backward_cpu(int64_t T, int d_in, int d_out, int r, float s, const float *x, const float *mask,
                                  const float *A, const float *B, const float *gy, float *gx, float *gA, float *gB);
// Dropout multipliers for (key) over n elements: 0 or 1/(1-p), from rng_keep (p = 0: all ones).
void adapter_dropout_mask(uint64_t key, float p, size_t n, float *mask);

#ifdef __cplusplus
}
#endif
#endif
