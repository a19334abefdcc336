// backend_cuda.cuh: the CUDA backend's internal state, shared by its files:
//   cuda/model_cuda.cu    the frozen base on the device (loaded from safetensors, or random weights)
//   cuda/step_cuda.cu     forward and backward of one micro-batch (the CPU reference's math)
//   cuda/backend_cuda.cu  creation, memory plan, optimizer, the op table of core/backend.h
#ifndef MOSFT_BACKEND_CUDA_CUH
#define MOSFT_BACKEND_CUDA_CUH

#include "core/adapter.h"
#include "core/backend.h"
#include "core/model.h"
#include "cuda/cuda_util.cuh"

// Fused weight groups of a layer: one GEMM each.
enum { GRP_QKV = 0, GRP_O, GRP_GU, GRP_DOWN, GRP_COUNT };

typedef struct {
    float *attn_norm, *mlp_norm;   // [C] fp32
    nf4_cuda_tensor q[MOD_COUNT];  // NF4 base: one tensor per HF weight (as bitsandbytes quantizes them)
    bf16 *w[GRP_COUNT];            // bf16 base: [d_out + Rp][d_in + Rp] per group (cuda_group_dims), rows of
                                   // q|k|v and gate|up stacked; the extra row/column blocks take the adapter
} cuda_layer;

typedef struct {
    llama_config cfg;
    int Rp[GRP_COUNT];       // adapter columns riding with each group (0: none); see step_cuda.cu
    int nf4;                 // NF4 base (else bf16)
    bf16 *embed;             // [V][C]
    bf16 *lm_head;           // [V][C] (== embed when tied)
    float *final_norm;       // [C]
    cuda_layer *layers;      // [L]
} cuda_model;

// A fused group's input and output widths: q|k|v: C -> Q+2KV, o: Q -> C, gate|up: C -> 2I, down: I -> C.
static inline void cuda_group_dims(const llama_config *c, int g, int *d_in, int *d_out) {
    int Q = c->n_heads * c->head_dim, KV = c->n_kv_heads * c->head_dim;
    switch (g) {
    case GRP_QKV: *d_in = c->hidden, *d_out = Q + 2 * KV; break;
    case GRP_O: *d_in = Q, *d_out = c->hidden; break;
    case GRP_GU: *d_in = c->hidden, *d_out = 2 * c->intermediate; break;
    default: *d_in = c->intermediate, *d_out = c->hidden; break;
    }
}

// Bytes of the frozen base on the device (model_cuda.cu); m->Rp must be set. `dq_of` may be NULL (every linear uses
// double_quant), else dq_of[l*MOD_COUNT + m] says how that linear is stored.
size_t cuda_model_bytes(const cuda_model *m, int nf4, int double_quant, const int *dq_of);
// Load a HF folder onto the device (weights carved from `ar`). MOSFT_ERR_INPUT on bad files.
int cuda_model_load(cuda_ctx *ctx, cuda_model *m, const char *dir, int nf4, int double_quant, cuda_arena *ar);
// The NF4 base `src` as a bf16 base carved from `ar` (model.keep_dequantized): every linear dequantized
// once into its group buffer (the values the step would dequantize at each use), embeddings and norms
// copied. `dst` needs cfg and Rp set; `src` stays as it was (the caller frees its memory).
void cuda_model_dequantize(cuda_ctx *ctx, cuda_model *dst, const cuda_model *src, cuda_arena *ar);
// Random weights at the config's shapes, generated on the device (benchmarks).
int cuda_model_random(cuda_ctx *ctx, cuda_model *m, const llama_config *cfg, int nf4, int double_quant, uint64_t seed,
                      cuda_arena *ar);
// Which stored linears of `dir` are pre-quantized with double quantization (for the plan).
int cuda_model_scan(const char *dir, const llama_config *cfg, int double_quant, int *dq_of);

// Activations of one layer; with recompute, several layers share buffers (see step_cuda.cu).
typedef struct {
    bf16 *x_in;    // [T][C] layer input (residual stream), always saved
    bf16 *h1;      // [T][C + Rp_qkv] input_layernorm(x_in) | the q,k,v adapters' h
    float *rstd1;  // [T]
    bf16 *qkv;     // [T][Q + 2 KV] q|k|v projection output, token-major; q, k rotated in place (rope_qk_cuda)
    bf16 *att;     // [T][Hq*D + Rp_o] attention output (input of o_proj) | the o adapter's h
    float *lse;    // [B][Hq][S]
    bf16 *x_mid;   // [T][C] x_in + o(att)
    bf16 *h2;      // [T][C + Rp_gu] post_attention_layernorm(x_mid) | the gate,up adapters' h
    float *rstd2;  // [T]
    bf16 *gu;      // [T][2I + Rp_gu] gate | up (in backward: their gradients | the adapters' gh)
    bf16 *a;       // [T][I + Rp_down] silu(gate) * up | the down adapter's h
} cuda_acts;

enum { RECOMPUTE_NONE = 0, RECOMPUTE_PARTIAL, RECOMPUTE_FULL };

// The adapted modules of one fused weight group (q|k|v, o, gate|up, down) share their input, so their
// low-rank factors are stacked: A_g = [A_m1; A_m2; ...] ([R][d_in], R = r x modules) and B_g is
// block-diagonal ([d_out][R], module m's B in its output rows and rank columns, zeros elsewhere).
// Without dropout the group's adapter is then two GEMMs forward (h = x A_g^T, y += s h B_g^T) and four
// backward, whatever the number of modules; with dropout (a mask per module) it runs per module on
// the blocks.
typedef struct {
    int n;             // adapted modules in the group (0: none)
    int mod[3];        // their module ids, in order
    int row_off[3];    // first output row of each in the group's output
    int d_out_m[3];    // output width of each
    int R;             // n * r
    int d_in, d_out;   // the group's input width and whole output width
    int h_off;         // first column of this group's h in a layer's saved h
    bf16 **A, **B;     // [L]: A [R][d_in], B [d_out][R]
    lowrank_map *map;  // [L * 3]: module i of layer l at [l * 3 + i] (device pointers inside, ldB = R)
} cuda_adapter_group;

// Per-phase timing with CUDA events (MOSFT_PROFILE=1): a mark says "from here, time goes to this
// phase"; the backend prints the mean per micro-batch when it is destroyed.
enum {
    PROF_DEQUANT = 0,
    PROF_GEMM,
    PROF_GEMM_BWD,
    PROF_ATTN,
    PROF_ATTN_BWD,
    PROF_ADAPTER,
    PROF_ADAPTER_BWD,
    PROF_ELEM,
    PROF_LOSS,
    PROF_OTHER,
    PROF_COUNT
};
#define PROF_MAX 16384

typedef struct {
    cuda_ctx *ctx;
    cuda_model model;
    int prof;                      // MOSFT_PROFILE set
    cudaEvent_t *ev;               // [PROF_MAX]
    int *ev_cat, n_ev, prof_steps;
    double prof_ms[PROF_COUNT];
    int recompute;
    cuda_arena persist;  // weights, adapter state, factors, maps
    cuda_arena acts_ar;  // activations and scratch for micro-batches up to B_cap x S_cap
    int B_cap, S_cap;
    double bytes_weights, bytes_adapter;
    double bytes_kept;             // the NF4 base's bytes dequantized (0: not NF4 per use): the plan's hint
    // trainable state: one contiguous fp32 buffer each
    float *params, *grad, *m, *v;  // [n_params]
    cuda_adapter_group grp[GRP_COUNT];
    int R_tot, R_max, dout_max;    // sum and max of the groups' R; widest group output
    int built;                     // factors match params
    int kept;                      // an NF4 base kept dequantized (model.keep_dequantized; model.nf4 is 0)
    lowrank_gather_job *gjobs;     // [n_gjobs] device: every (layer, module)'s gather (MoS, LoRA)
    int n_gjobs;
    int64_t gjob_max;              // the largest r d_in or d_out r among them
    // The other low-rank methods (PRoLoRA, VeRA, Tied-LoRA, ShareLoRA: `peer`) build their factors and
    // map the factors' gradients back with their own host code (adapter_ops.build / scatter): once per
    // optimizer step the host builds every (layer, module)'s A, B from the current params and uploads
    // them as bf16 into the same group buffers MoS and LoRA gather into; in backward each module's dense
    // dL/dA, dL/dB goes to host memory (async copies in stream order) and, once the micro-batch is done,
    // the method's scatter adds it into h_grad. The params, AdamW and the norm stay on the device;
    // h_grad is uploaded into `grad` before they read it.
    int peer;
    float *h_params;               // host [n_params]: the params the current factors were built from
    float *h_grad;                 // host [n_params]: gradient accumulated over the step's micro-batches
    int grad_dirty;                // h_grad has not been uploaded into grad yet
    float *h_dfac;                 // host [n_dense] (pinned when possible): every (layer, module)'s dL/dA [r][d_in]
                                   // then dL/dB [d_out][r], from the last backward
    int h_dfac_pinned;
    size_t *dense_off;             // [L * MOD_COUNT] offset of (layer, module) in h_dfac
    int rank;
    float scaling;
    // activations and scratch (acts_ar)
    cuda_acts *acts;               // [L]
    bf16 *x_final, *xf;            // [T][C]
    float *rstd_f;                 // [T]
    bf16 *qkv;                     // [T][Q+2KV + Rp_qkv] the projection's gradient gqkv | gh in backward
    bf16 *o_tmp;                   // [B][Hq][S][D] attention output head-major, also dO head-major (GEMM attention only)
    bf16 *gx_lo;                   // [T][C] dL/d residual stream, low half (rmsnorm_backward_cuda); gxb the high
    bf16 *gxb;                     // [T][C + max(Rp_o, Rp_down)] dL/d residual stream, high half (GEMM operand) | gh
    float *gh;                     // [T][C] dL/d norm output: bf16 in the layers (the input-gradient GEMMs' output), fp32 for dL/dxf after the loss
    bf16 *gbig;                    // [T][max(I, Q)] dL/da or dL/datt
    float *gq, *gk, *gv;           // head-major attention input gradients (GEMM attention only; NULL with flash)
    float *delta;                  // [B][Hq][S]
    void *big;                     // attention scores or logits chunk
    size_t big_bytes;
    int64_t ce_rows;
    float *row_loss;               // [T]
    int32_t *ids, *targets, *mask; // [T]
    int32_t *ce_list;              // [T] the rows that go through lm_head + CE (supervised ones), ascending
    float *cs;                     // [S_cap][D/2][2] rope table
    // NF4 base: the groups' weights are dequantized ahead on a second stream (step_cuda.cu, "the NF4
    // weight stream")
    int wpipe;                     // the stream is on (MOSFT_WEIGHT_PREFETCH=0 turns it off)
    int wahead;                    // the attention kernels start the next groups (MOSFT_WEIGHT_AHEAD=0 turns it off)
    int swiglu_fused;              // SwiGLU with the adapter's h / gh in one pass (MOSFT_SWIGLU_FUSED=0 turns it off)
    bf16 *wslot[GRP_COUNT];        // dequantized weight groups, a slot per group (one buffer when wpipe is off)
    cudaStream_t wstream;
    cudaEvent_t w_ready[GRP_COUNT], w_free[GRP_COUNT];  // slot filled (weight stream) / its readers done (main)
    cudaEvent_t w_go;              // the look-ahead's start (main stream, at an attention kernel)
    int *wseq;                     // [L * 11] the micro-batch's order of groups (layer * GRP_COUNT + group)
    int wn, wi, wis, wfr;          // sequence length, next entry handed out, next to dequantize, first whose
                                   // readers are not yet known to be done
    int wtag[GRP_COUNT];           // the entry (layer * GRP_COUNT + group) each slot holds or is getting; -1: none
    bf16 *ad_xd;                   // [T][max d_in] dropout-masked adapter input
    // With dropout and no recomputation the forward keeps every module's mask as bits (1 bit an
    // element, written by its masked copy) for dL/dA in backward (lowrank_dropout_da_cuda), which then
    // reads one word per 32 elements instead of evaluating the generator again. NULL otherwise.
    // With recomputation the same store holds one layer: the layer being recomputed writes its masks
    // there (only during that recomputation) and its backward reads them; dbits_of[g] says which
    // layer's masks of group g are in it (-1: none).
    uint32_t *dbits;               // [L or 1][dbits_layer]
    int64_t dbits_layer, dbits_grp[GRP_COUNT], dbits_mod[GRP_COUNT];  // words: a layer, group offset, a module
    int dbits_of[GRP_COUNT];
    int recomputing;               // 1 while the backward recomputes a layer's forward
    float *ad_gA, *ad_gB;          // [R_max][max d_in], [dout_max][R_max]
    float *ad_part;                // split-K partials of the adapter's GEMMs
    size_t ad_part_floats;
    // The adapter's weight gradients (dL/dA, dL/dB and their scatter into grad) go to a second lane
    // (side: its own stream, cuBLASLt workspace and scratch) so that they run beside the base
    // input-gradient GEMMs: nothing in the backward chain waits for them, and the main stream joins the
    // side only before it overwrites what the side reads (side_join in step_cuda.cu). NULL: one lane
    // (MOSFT_ADAPTER_OVERLAP=0, or a peer method, whose scatter runs on the host).
    cuda_ctx *side;
    cudaEvent_t side_go, side_done[GRP_COUNT];  // main -> side; a group's side work done -> main
    int side_busy[GRP_COUNT];      // group's work was queued on the side since the last join on it
    bf16 *sd_xd;                   // the side's dropout-masked adapter input, like ad_xd
    float *sd_gA, *sd_gB, *sd_part;  // the side's ad_gA, ad_gB, ad_part
    void *red;                     // reduction partials
    int32_t *h_targets;            // host [T_cap]
    int32_t *h_ce_list;            // host [T_cap]
} cuda_impl;

static inline void prof_mark(cuda_impl *c, int cat) {
    if (!c->prof || c->n_ev >= PROF_MAX) return;
    cudaEventRecord(c->ev[c->n_ev], c->ctx->stream);
    c->ev_cat[c->n_ev++] = cat;
}
// After a synchronization: add the marked intervals to prof_ms.
void prof_collect(cuda_impl *c);
void prof_print(cuda_impl *c);

// step_cuda.cu
int cuda_step_run(backend *be, const micro_batch *mb, float loss_scale, const dropout_ctx *dc, int backward,
                  double *loss_sum, int64_t *n_tokens, float *logits_host);
// Lay out (or, with a counting arena of base NULL, measure) the activation arena for B x S.
void cuda_acts_layout(backend *be, cuda_arena *ar, int B, int S, mem_plan *plan);
// Gather every layer's factors from params (after an optimizer step or set_state).
void cuda_build_factors(backend *be);
// Peer methods (see cuda_impl.peer): build every factor on the host from params (downloaded); add the
// last backward's factor gradients (h_dfac) into h_grad with the method's scatter; upload h_grad into
// grad if it changed.
void cuda_peer_build(backend *be);
void cuda_peer_scatter(backend *be);
void cuda_peer_flush(backend *be);

#endif
