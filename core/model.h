// model.h: the LLaMA-family model description (HF config.json), tensor names, and the loaded frozen
// base weights (fp32 or NF4) used by the CPU backend.
#ifndef MOSFT_MODEL_H
#define MOSFT_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "core/config.h"
#include "core/nf4.h"
#include "core/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    char model_type[32];  // "llama"
    int hidden;           // hidden_size
    int intermediate;     // intermediate_size
    int n_layers;         // num_hidden_layers
    int n_heads;          // num_attention_heads
    int n_kv_heads;       // num_key_value_heads (= n_heads without GQA)
    int head_dim;         // head_dim (default hidden / n_heads)
    int vocab;            // vocab_size
    int max_pos;          // max_position_embeddings
    int sliding_window;   // model_type "mistral": its sliding_window (0: null, or llama)
    double rms_eps;       // rms_norm_eps
    double rope_theta;    // rope_theta (default 10000)
    int tie_embeddings;   // tie_word_embeddings
    // rope_scaling {"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
    //               original_max_position_embeddings}; rope_llama3 = 0 when absent
    int rope_llama3;
    double rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_orig_max_pos;
    int bos_id, eos_id;   // from config.json (-1 when absent)
    char torch_dtype[16]; // "bfloat16", "float16", "float32" ("" when absent)
} llama_config;

// Parse an HF config.json (a file, or a folder holding one). Errors name the file and the key.
int llama_config_load(llama_config *c, const char *path);
// Whether sequences of max_seq_len tokens suit the model (cfg_path names the training config): a
// Mistral sliding window shorter than max_seq_len is MOSFT_ERR_INPUT (mosft's attention is full causal);
// max_seq_len beyond max_position_embeddings is a warning (positions the model was not trained on).
int llama_check_seq_len(const llama_config *c, int max_seq_len, const char *cfg_path);
// Input and output width of an adapted linear type (MOD_Q ... MOD_DOWN).
void llama_module_dims(const llama_config *c, int module, int *d_in, int *d_out);
// Frozen parameters of the whole model (embedding, all linears, norms, lm_head when untied).
int64_t llama_param_count(const llama_config *c);
// Parameters in the quantizable linears (q,k,v,o,gate,up,down over all layers).
int64_t llama_linear_param_count(const llama_config *c);
// HF tensor name of a linear's weight: "model.layers.{i}.self_attn.q_proj.weight".
void llama_linear_name(char *out, size_t n, int layer, int module);
// rotary inverse frequencies (head_dim/2 values), including llama3 rope scaling.
void llama_rope_inv_freq(const llama_config *c, double *inv_freq);

// A frozen base linear: y = x W^T with W [d_out][d_in], kept as fp32 or NF4.
typedef struct {
    int d_in, d_out;
    float *w;      // [d_out][d_in] fp32 (quantization none), else NULL
    nf4_tensor q;  // NF4 (quantization nf4)
    int quantized;
} base_linear;

typedef struct {
    float *attn_norm;  // [hidden] input_layernorm
    float *mlp_norm;   // [hidden] post_attention_layernorm
    base_linear lin[MOD_COUNT];
} llama_layer;

typedef struct {
    llama_config cfg;
    float *embed;       // [vocab][hidden]
    float *lm_head;     // [vocab][hidden]; == embed when tied
    float *final_norm;  // [hidden]
    llama_layer *layers;
    int quantized;      // NF4 base
} llama_model;

// model.quantization: "nf4" -> *nf4 = 1, "none" -> 0; anything else is MOSFT_ERR_INPUT naming the key.
int llama_quantization_parse(const char *quantization, int *nf4);

// Load a HF model folder for the CPU backend. quantization "nf4": every linear is rounded to bf16 (as
// HF loads with torch_dtype=bf16) and quantized exactly as bitsandbytes; embeddings, norms and lm_head
// are fp32 copies of the bf16-rounded values (prepare_model_for_kbit_training). "none": fp32 copies
// of the stored values. Pre-quantized bnb-4bit linears are read as they are (their stored double
// quantization wins over `double_quant`; with "none" they are kept as their bf16 dequantization).
// Every tensor's shape is checked against config.json: a mismatch is MOSFT_ERR_INPUT naming the file,
// the tensor, the expected and the found shape. Sharded checkpoints (model.safetensors.index.json) work.
int llama_model_load(llama_model *m, const char *dir, const char *quantization, int double_quant);
void llama_model_free(llama_model *m);
// The stored float tensor `name` of a checkpoint with exactly `shape` (the shape config.json implies).
// Input errors name the file, the tensor, the expected and the found shape or dtype.
int llama_find_float_tensor(const st_set *s, const char *name, int ndim, const int64_t *shape, const st_tensor **out);
// W (fp32 [d_out][d_in]) of a base linear into `out`. An NF4 weight is dequantized and rounded to bf16,
// as bitsandbytes dequantizes to the bf16 compute dtype for QLoRA's matmuls.
void base_linear_weight(const base_linear *l, float *out);

#ifdef __cplusplus
}
#endif
#endif
