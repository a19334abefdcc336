// config.h: the run configuration (one JSON file), its schema, defaults, validation and overrides.
//
// The schema is a table (config.c, k_schema): every key has a JSON path, a type, a default, a range
// and a line of documentation. docs/CONFIG.md is written from the same facts. Loading goes:
//   defaults -> the user's JSON file (unknown keys: error with "did you mean") -> --set a.b=value
//   overrides -> range checks -> this struct.
// Errors name the file and the JSON path:
//   config.json: train.lr: expected a number > 0, got "fast"
// Defaults are the MoS paper's recipe (shared/docs/MOS.md section 4).
// Relative paths in a config are taken relative to the current directory.
#ifndef MOSFT_CONFIG_H
#define MOSFT_CONFIG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Adapted linear types, in the order used everywhere (index tables, files, loops).
enum { MOD_Q = 0, MOD_K, MOD_V, MOD_O, MOD_GATE, MOD_UP, MOD_DOWN, MOD_COUNT };
extern const char *const k_module_names[MOD_COUNT];  // "q", "k", ..., "down"
extern const char *const k_module_hf[MOD_COUNT];     // "self_attn.q_proj", ..., "mlp.down_proj"

#define CFG_MAX_SOURCES 32

typedef struct {
    char *path;    // file, directory, glob, or http(s) URL; .gz is inflated
    char *format;  // codealpaca | superni | flan_v2 | messages | prompt_completion
    double weight; // mixture weight
    int64_t max_records;  // 0 = all
    // superni
    char *tasks;           // split file listing the task names to use ("" = every task file found)
    char *exclude_tasks;   // split file of task names to skip ("" = none)
    int zero_shot_per_task, few_shot_per_task, n_few_shot;
} cfg_source;

typedef struct mosft_config {
    char *source_path;  // the config file this came from ("" for defaults only)
    struct {
        char *path;          // HF model folder (config.json + safetensors)
        char *quantization;  // nf4 | none
        int double_quant;    // NF4 double quantization of absmax (bitsandbytes' bnb_4bit_use_double_quant)
        int keep_dequantized;  // CUDA, NF4: a bf16 copy of the base made at load (faster, more memory)
        char *name;          // base_model_name_or_path written on export ("" = model.path)
    } model;
    struct {
        char *path;       // tokenizer.json ("" = <model.path>/tokenizer.json)
        char *eos_text;   // EOS text of the chat template ("" = eos_token of tokenizer_config.json)
    } tokenizer;
    struct {
        char *method;        // mos | lora | prolora | vera | tied_lora | sharelora | sira
        int r;               // rank of every layer's A (r x d_in) and B (d_out x r); scaling alpha / r
        int equiv_rank;      // MoS R_v: parameter budget equal to LoRA of this rank
        int private_rank;    // MoS R_p: private vector pairs per layer
        int shards;          // MoS l: shards per vector
        double alpha;
        double dropout;      // on the adapter input
        int targets[MOD_COUNT];  // 1 = adapted
        uint64_t seed;       // index tables, init
        int pair_dissociation;   // MoS: separate index draws for A and B
        int pure_sharing;        // ablation: every layer uses the whole pool (l=1, R_p=0, r=R_v*L)
        int subset_selection;    // ablation: paired indices (I_b = I_a), l = 1, R_p = 0
        double scale_mean, scale_std;  // random scaling ablation (std 0 = off)
        // peers
        int prolora_unshared_r, prolora_reduce_a, prolora_reduce_b;
        double vera_d_initial;
        uint64_t vera_projection_seed;
        char *tied_lora_trainable;  // subset of "vBuA"
        char *sharelora_share;      // A | B | AB | qkv
        int sira_experts, sira_top_k;
        double sira_capacity_factor, sira_expert_dropout;
    } adapter;
    struct {
        cfg_source sources[CFG_MAX_SOURCES];
        int n_sources;
        int max_seq_len;
        int eval_examples;
        int shuffle_buffer;
        uint64_t seed;
        int epochs;            // 0 = endless
        int group_by_length;
        char *on_bad_record;   // skip | fail
        uint64_t template_seed;  // prompt-template draws (open-instruct uses 42)
        int prefetch;          // batches prepared ahead by the loader thread
        double http_connect_timeout, http_read_timeout;  // seconds
        int http_retries;
    } data;
    struct {
        int steps;
        int batch_size;        // sequences per optimizer step
        int micro_batch_size;  // sequences per forward/backward (batch_size = micro * accumulation)
        double lr;
        char *schedule;        // linear | cosine | constant
        double warmup_ratio;
        double beta1, beta2, eps, weight_decay, max_grad_norm;
        char *recompute;       // none | partial | full
        uint64_t seed;         // dropout
        int eval_every;        // 0 = never
        int log_every;
        int max_nonfinite;     // consecutive non-finite steps before the run stops
        int threads;           // CPU threads (0 = all cores)
    } train;
    struct {
        char *dir;
        int save_every;
        int keep_last;
    } output;
    char *device;  // auto | cpu | cuda
} mosft_config;

// Fill every field with its default (strings are owned copies).
void config_defaults(mosft_config *c);
// Load a JSON file over the defaults. Returns MOSFT_OK or MOSFT_ERR_INPUT with the message set.
int config_load(mosft_config *c, const char *path);
// Apply one "a.b=value" override (value parsed as JSON when it parses, else taken as a string).
// data.sources[N].key or data.sources.N.key address one source.
int config_set(mosft_config *c, const char *assignment);
// Final range and cross-field checks (call after all overrides).
int config_validate(const mosft_config *c);
void config_free(mosft_config *c);

// The resolved configuration as pretty JSON (malloc'd). Loading it back gives the same config.
char *config_to_json(const mosft_config *c);
// The documentation table (markdown), for docs/CONFIG.md and `mosft help config`.
char *config_doc_markdown(void);
// A boxed, aligned table of the resolved configuration for the start of a run.
char *config_table(const mosft_config *c);

// Parse "q,k,v" / ["q_proj", ...] style names; returns module index or -1.
int module_from_name(const char *s);

#ifdef __cplusplus
}
#endif
#endif
