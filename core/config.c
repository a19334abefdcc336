// config.c: the schema table and the loader (see config.h).
#include "core/config.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/fileio.h"

const char *const k_module_names[MOD_COUNT] = {"q", "k", "v", "o", "gate", "up", "down"};
const char *const k_module_hf[MOD_COUNT] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                             "mlp.down_proj"};

int module_from_name(const char *s) {
    for (int m = 0; m < MOD_COUNT; m++) {
        size_t n = strlen(k_module_names[m]);
        if (!strcmp(s, k_module_names[m])) return m;
        if (!strncmp(s, k_module_names[m], n) && !strcmp(s + n, "_proj")) return m;
    }
    return -1;
}

// ---- schema -----------------------------------------------------------------------------------

typedef enum { T_STR, T_ENUM, T_INT, T_I64, T_U64, T_NUM, T_BOOL, T_TARGETS } field_type;

// Range flags for numbers: lo/hi bounds, each inclusive or exclusive, or absent.
enum { R_NONE = 0, R_LO = 1, R_LO_EX = 2, R_HI = 4, R_HI_EX = 8 };

typedef struct {
    const char *path;  // "train.lr" (for sources: the key inside one source, "weight")
    field_type type;
    size_t offset;
    const char *def;   // default, as JSON text (strings unquoted)
    int range;
    double lo, hi;
    const char *choices;  // T_ENUM: "a|b|c"
    const char *doc;
} field;

#define F(path, type, member, def, range, lo, hi, choices, doc) \
    {path, type, offsetof(mosft_config, member), def, range, lo, hi, choices, doc}
#define S(path, type, member, def, range, lo, hi, choices, doc) \
    {path, type, offsetof(cfg_source, member), def, range, lo, hi, choices, doc}

static const field k_schema[] = {
    F("model.path", T_STR, model.path, "", 0, 0, 0, NULL,
      "HF model folder: config.json and model.safetensors (or sharded with model.safetensors.index.json)"),
    F("model.quantization", T_ENUM, model.quantization, "nf4", 0, 0, 0, "nf4|none",
      "frozen base weights: nf4 (4-bit NormalFloat, QLoRA) or none (bf16 on GPU, fp32 on CPU)"),
    F("model.double_quant", T_BOOL, model.double_quant, "true", 0, 0, 0, NULL,
      "quantize the NF4 block scales again (8-bit, blocks of 256), as bnb_4bit_use_double_quant"),
    F("model.keep_dequantized", T_BOOL, model.keep_dequantized, "false", 0, 0, 0, NULL,
      "cuda, nf4: keep the base dequantized to bf16 (once, at load) instead of dequantizing each weight where "
      "it is used: the same values and results, ~4 % faster steps, 2 bytes a weight more GPU memory (7B: +8.8 GiB; "
      "the memory plan before step 1 says when it fits)"),
    F("model.name", T_STR, model.name, "", 0, 0, 0, NULL,
      "base_model_name_or_path written by export (default: model.path)"),
    F("tokenizer.path", T_STR, tokenizer.path, "", 0, 0, 0, NULL,
      "tokenizer.json (default: <model.path>/tokenizer.json)"),
    F("tokenizer.eos_text", T_STR, tokenizer.eos_text, "", 0, 0, 0, NULL,
      "EOS text the chat template appends to answers (default: eos_token of tokenizer_config.json)"),
    F("adapter.method", T_ENUM, adapter.method, "mos", 0, 0, 0, "mos|lora|prolora|vera|tied_lora|sharelora|sira",
      "adapter type"),
    F("adapter.r", T_INT, adapter.r, "32", R_LO, 1, 0, NULL,
      "rank of every layer's A (r x d_in) and B (d_out x r); the scaling is alpha / r"),
    F("adapter.equiv_rank", T_INT, adapter.equiv_rank, "8", R_LO, 1, 0, NULL,
      "MoS R_v: the pools hold as many parameters as a LoRA of this rank"),
    F("adapter.private_rank", T_INT, adapter.private_rank, "2", R_LO, 0, 0, NULL,
      "MoS R_p: private vector pairs per layer (0 <= R_p <= min(R_v, r))"),
    F("adapter.shards", T_INT, adapter.shards, "4", R_LO, 1, 0, NULL,
      "MoS l: shards per vector (must divide every d_in and d_out)"),
    F("adapter.alpha", T_NUM, adapter.alpha, "16", R_LO_EX, 0, 0, NULL, "LoRA alpha; scaling alpha / r"),
    F("adapter.dropout", T_NUM, adapter.dropout, "0.1", R_LO | R_HI_EX, 0, 1, NULL, "dropout on the adapter input"),
    F("adapter.targets", T_TARGETS, adapter.targets, "[\"q\",\"k\",\"v\",\"o\",\"gate\",\"up\",\"down\"]", 0, 0, 0,
      NULL, "adapted linears: any of q, k, v, o, gate, up, down (or \"all\")"),
    F("adapter.seed", T_U64, adapter.seed, "0", R_LO, 0, 9007199254740992.0, NULL,
      "seed of the index tables and the initialization"),
    F("adapter.pair_dissociation", T_BOOL, adapter.pair_dissociation, "true", 0, 0, 0, NULL,
      "MoS: draw A and B indices separately (false: ablation MoS-pd, I_b = I_a)"),
    F("adapter.pure_sharing", T_BOOL, adapter.pure_sharing, "false", 0, 0, 0, NULL,
      "ablation: every layer uses the whole pool (sets l = 1, R_p = 0, r = R_v * layers)"),
    F("adapter.subset_selection", T_BOOL, adapter.subset_selection, "false", 0, 0, 0, NULL,
      "ablation: each layer takes r random vector pairs (I_b = I_a, l = 1, R_p = 0)"),
    F("adapter.scale_mean", T_NUM, adapter.scale_mean, "1", R_LO_EX, 0, 0, NULL,
      "random scaling ablation: mean of the frozen per-layer per-rank scale"),
    F("adapter.scale_std", T_NUM, adapter.scale_std, "0", R_LO, 0, 0, NULL,
      "random scaling ablation: its standard deviation (0 = off, as in the released MoS code)"),
    F("adapter.prolora_unshared_r", T_INT, adapter.prolora_unshared_r, "0", R_LO, 0, 0, NULL,
      "PRoLoRA u: unshared rank"),
    F("adapter.prolora_reduce_a", T_INT, adapter.prolora_reduce_a, "2", R_LO, 1, 0, NULL,
      "PRoLoRA m: broadcast reduction of A"),
    F("adapter.prolora_reduce_b", T_INT, adapter.prolora_reduce_b, "2", R_LO, 1, 0, NULL,
      "PRoLoRA n: broadcast reduction of B"),
    F("adapter.vera_d_initial", T_NUM, adapter.vera_d_initial, "0.1", R_NONE, 0, 0, NULL, "VeRA: initial d"),
    F("adapter.vera_projection_seed", T_U64, adapter.vera_projection_seed, "0", R_LO, 0, 9007199254740992.0, NULL,
      "VeRA: seed of the frozen random A and B"),
    F("adapter.tied_lora_trainable", T_STR, adapter.tied_lora_trainable, "vBuA", 0, 0, 0, NULL,
      "Tied-LoRA: which of v, B, u, A train (letters of \"vBuA\")"),
    F("adapter.sharelora_share", T_ENUM, adapter.sharelora_share, "A", 0, 0, 0, "A|B|AB|qkv",
      "ShareLoRA: which factor is shared across layers"),
    F("adapter.sira_experts", T_INT, adapter.sira_experts, "4", R_LO, 1, 0, NULL, "SiRA: experts per module"),
    F("adapter.sira_top_k", T_INT, adapter.sira_top_k, "2", R_LO, 1, 0, NULL, "SiRA: experts per token"),
    F("adapter.sira_capacity_factor", T_NUM, adapter.sira_capacity_factor, "1.25", R_LO_EX, 0, 0, NULL,
      "SiRA: expert capacity factor"),
    F("adapter.sira_expert_dropout", T_NUM, adapter.sira_expert_dropout, "0.1", R_LO | R_HI_EX, 0, 1, NULL,
      "SiRA: dropout on the gate outputs"),
    // data.sources is special-cased (an array of objects, see k_source_schema)
    F("data.max_seq_len", T_INT, data.max_seq_len, "512", R_LO, 2, 0, NULL,
      "examples are truncated to this many tokens (keeping the left part)"),
    F("data.eval_examples", T_INT, data.eval_examples, "1024", R_LO, 0, 0, NULL,
      "held-out examples split off the training stream for eval loss"),
    F("data.shuffle_buffer", T_INT, data.shuffle_buffer, "10000", R_LO, 1, 0, NULL,
      "examples in the shuffle buffer (1 = no shuffling)"),
    F("data.seed", T_U64, data.seed, "42", R_LO, 0, 9007199254740992.0, NULL, "shuffle and mixture seed"),
    F("data.epochs", T_INT, data.epochs, "0", R_LO, 0, 0, NULL, "passes over the data (0 = endless)"),
    F("data.group_by_length", T_BOOL, data.group_by_length, "true", 0, 0, 0, NULL,
      "batch examples of similar length (less padding), as HF group_by_length"),
    F("data.on_bad_record", T_ENUM, data.on_bad_record, "skip", 0, 0, 0, "skip|fail",
      "a malformed record is skipped and counted, or stops the run"),
    F("data.template_seed", T_U64, data.template_seed, "42", R_LO, 0, 9007199254740992.0, NULL,
      "seed of the random prompt templates (open-instruct uses 42)"),
    F("data.prefetch", T_INT, data.prefetch, "4", R_LO, 1, 0, NULL, "batches prepared ahead by the loader thread"),
    F("data.http_connect_timeout", T_NUM, data.http_connect_timeout, "15", R_LO_EX, 0, 0, NULL,
      "seconds to connect to an http(s) source before the attempt counts as failed"),
    F("data.http_read_timeout", T_NUM, data.http_read_timeout, "60", R_LO_EX, 0, 0, NULL,
      "seconds without a byte from an http(s) source before the connection is retried (resuming with Range)"),
    F("data.http_retries", T_INT, data.http_retries, "8", R_LO, 0, 0, NULL,
      "retries of a failed http(s) read (exponential backoff from 1 s, at most 60 s apart)"),
    F("train.steps", T_INT, train.steps, "10000", R_LO, 1, 0, NULL, "optimizer steps"),
    F("train.batch_size", T_INT, train.batch_size, "16", R_LO, 1, 0, NULL, "sequences per optimizer step"),
    F("train.micro_batch_size", T_INT, train.micro_batch_size, "16", R_LO, 1, 0, NULL,
      "sequences per forward/backward; batch_size must be a multiple (gradient accumulation)"),
    F("train.lr", T_NUM, train.lr, "2e-4", R_LO_EX, 0, 0, NULL, "peak learning rate"),
    F("train.schedule", T_ENUM, train.schedule, "linear", 0, 0, 0, "linear|cosine|constant",
      "learning-rate schedule after warmup"),
    F("train.warmup_ratio", T_NUM, train.warmup_ratio, "0.03", R_LO | R_HI, 0, 1, NULL,
      "warmup steps = ceil(ratio * steps)"),
    F("train.beta1", T_NUM, train.beta1, "0.9", R_LO | R_HI_EX, 0, 1, NULL, "AdamW beta1"),
    F("train.beta2", T_NUM, train.beta2, "0.999", R_LO | R_HI_EX, 0, 1, NULL, "AdamW beta2"),
    F("train.eps", T_NUM, train.eps, "1e-8", R_LO_EX, 0, 0, NULL, "AdamW epsilon"),
    F("train.weight_decay", T_NUM, train.weight_decay, "0", R_LO, 0, 0, NULL, "AdamW decoupled weight decay"),
    F("train.max_grad_norm", T_NUM, train.max_grad_norm, "0.3", R_LO, 0, 0, NULL,
      "clip the global gradient norm to this (0 = no clipping)"),
    F("train.recompute", T_ENUM, train.recompute, "none", 0, 0, 0, "none|partial|full",
      "activation recomputation in backward: less memory, more compute"),
    F("train.seed", T_U64, train.seed, "0", R_LO, 0, 9007199254740992.0, NULL, "seed of adapter dropout"),
    F("train.eval_every", T_INT, train.eval_every, "1000", R_LO, 0, 0, NULL,
      "steps between eval-loss passes (0 = never)"),
    F("train.log_every", T_INT, train.log_every, "1", R_LO, 1, 0, NULL, "steps between progress lines"),
    F("train.max_nonfinite", T_INT, train.max_nonfinite, "10", R_LO, 1, 0, NULL,
      "consecutive steps with a non-finite loss or gradient norm before the run stops"),
    F("train.threads", T_INT, train.threads, "0", R_LO, 0, 0, NULL, "CPU backend threads (0 = all cores)"),
    F("output.dir", T_STR, output.dir, "runs/mosft", 0, 0, 0, NULL, "run directory (checkpoints, metrics, config)"),
    F("output.save_every", T_INT, output.save_every, "1000", R_LO, 0, 0, NULL,
      "steps between checkpoints (0 = only at the end)"),
    F("output.keep_last", T_INT, output.keep_last, "3", R_LO, 1, 0, NULL, "checkpoints kept"),
    F("device", T_ENUM, device, "auto", 0, 0, 0, "auto|cpu|cuda", "auto picks cuda when a GPU is present and can train the adapter (sira: cpu)"),
};
#define N_SCHEMA ((int)(sizeof k_schema / sizeof k_schema[0]))

static const field k_source_schema[] = {
    S("path", T_STR, path, "", 0, 0, 0, NULL, "file, directory, glob or http(s) URL; .gz files are inflated"),
    S("format", T_ENUM, format, "messages", 0, 0, 0, "codealpaca|superni|flan_v2|messages|prompt_completion",
      "record format"),
    S("weight", T_NUM, weight, "1", R_LO_EX, 0, 0, NULL, "mixture weight"),
    S("max_records", T_I64, max_records, "0", R_LO, 0, 0, NULL, "read at most this many records (0 = all)"),
    S("tasks", T_STR, tasks, "", 0, 0, 0, NULL, "superni: split file of task names to use (empty: all)"),
    S("exclude_tasks", T_STR, exclude_tasks, "", 0, 0, 0, NULL, "superni: split file of task names to skip"),
    S("zero_shot_per_task", T_INT, zero_shot_per_task, "60", R_LO, 0, 0, NULL, "superni: zero-shot instances"),
    S("few_shot_per_task", T_INT, few_shot_per_task, "20", R_LO, 0, 0, NULL, "superni: few-shot instances"),
    S("n_few_shot", T_INT, n_few_shot, "2", R_LO, 0, 0, NULL, "superni: positive exemplars per few-shot prompt"),
};
#define N_SOURCE_SCHEMA ((int)(sizeof k_source_schema / sizeof k_source_schema[0]))

static const char *const k_sections[] = {"model", "tokenizer", "adapter", "data", "train", "output"};
#define N_SECTIONS 6

// ---- value handling ---------------------------------------------------------------------------

static void *field_ptr(void *base, const field *f) { return (char *)base + f->offset; }

static void describe_expected(const field *f, char *out, size_t n) {
    char lo[32], hi[32];
    snprintf(lo, sizeof lo, "%g", f->lo);
    snprintf(hi, sizeof hi, "%g", f->hi);
    const char *kind = f->type == T_NUM ? "a number" : "an integer";
    if (f->type == T_INT || f->type == T_I64 || f->type == T_U64) snprintf(lo, sizeof lo, "%.0f", f->lo);
    switch (f->type) {
    case T_STR: snprintf(out, n, "a string"); return;
    case T_BOOL: snprintf(out, n, "true or false"); return;
    case T_TARGETS: snprintf(out, n, "a list of q, k, v, o, gate, up, down (or \"all\")"); return;
    case T_ENUM: {
        size_t o = (size_t)snprintf(out, n, "one of ");
        const char *c = f->choices;
        while (*c && o < n) {
            const char *bar = strchr(c, '|');
            size_t len = bar ? (size_t)(bar - c) : strlen(c);
            o += (size_t)snprintf(out + o, n - o, "%s\"%.*s\"", c == f->choices ? "" : ", ", (int)len, c);
            c += len + (bar ? 1 : 0);
        }
        return;
    }
    default: break;
    }
    int r = f->range;
    if ((r & (R_LO | R_LO_EX)) && (r & (R_HI | R_HI_EX)))
        snprintf(out, n, "%s in %s%s, %s%s", kind, (r & R_LO_EX) ? "(" : "[", lo, hi, (r & R_HI_EX) ? ")" : "]");
    else if (r & R_LO_EX)
        snprintf(out, n, "%s > %s", kind, lo);
    else if (r & R_LO)
        snprintf(out, n, "%s >= %s", kind, lo);
    else
        snprintf(out, n, "%s", kind);
}

// Render a JSON value shortly for "got ..." messages.
static void render_got(const cJSON *v, char *out, size_t n) {
    if (!v) {
        snprintf(out, n, "nothing");
        return;
    }
    char *s = cJSON_PrintUnformatted(v);
    if (!s) {
        snprintf(out, n, "?");
        return;
    }
    if (strlen(s) > 40) {
        s[37] = '.';
        s[38] = '.';
        s[39] = '.';
        s[40] = 0;
    }
    snprintf(out, n, "%s", s);
    cJSON_free(s);
}

static int bad_value(const char *file, const char *path, const field *f, const cJSON *v) {
    char exp[256], got[64];
    describe_expected(f, exp, sizeof exp);
    render_got(v, got, sizeof got);
    return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected %s, got %s", file, path, exp, got);
}

static int in_range(const field *f, double x) {
    if ((f->range & R_LO) && !(x >= f->lo)) return 0;
    if ((f->range & R_LO_EX) && !(x > f->lo)) return 0;
    if ((f->range & R_HI) && !(x <= f->hi)) return 0;
    if ((f->range & R_HI_EX) && !(x < f->hi)) return 0;
    return isfinite(x);
}

static int enum_has(const char *choices, const char *s) {
    size_t n = strlen(s);
    const char *c = choices;
    while (*c) {
        const char *bar = strchr(c, '|');
        size_t len = bar ? (size_t)(bar - c) : strlen(c);
        if (len == n && !strncmp(c, s, n)) return 1;
        c += len + (bar ? 1 : 0);
    }
    return 0;
}

// Set one field from a JSON value, with checks. `file` and `path` are for messages.
static int apply_value(void *base, const field *f, const cJSON *v, const char *file, const char *path) {
    void *p = field_ptr(base, f);
    switch (f->type) {
    case T_STR:
    case T_ENUM:
        if (!cJSON_IsString(v)) return bad_value(file, path, f, v);
        if (f->type == T_ENUM && !enum_has(f->choices, v->valuestring)) return bad_value(file, path, f, v);
        free(*(char **)p);
        *(char **)p = xstrdup(v->valuestring);
        return MOSFT_OK;
    case T_BOOL:
        if (!cJSON_IsBool(v)) return bad_value(file, path, f, v);
        *(int *)p = cJSON_IsTrue(v);
        return MOSFT_OK;
    case T_NUM:
        if (!cJSON_IsNumber(v) || !in_range(f, v->valuedouble)) return bad_value(file, path, f, v);
        *(double *)p = v->valuedouble;
        return MOSFT_OK;
    case T_INT:
    case T_I64:
    case T_U64: {
        if (!cJSON_IsNumber(v)) return bad_value(file, path, f, v);
        double x = v->valuedouble;
        if (x != floor(x) || !in_range(f, x) || (f->type == T_INT && fabs(x) > 2147483647.0) ||
            fabs(x) > 9007199254740992.0)
            return bad_value(file, path, f, v);
        if (f->type == T_INT)
            *(int *)p = (int)x;
        else if (f->type == T_I64)
            *(int64_t *)p = (int64_t)x;
        else
            *(uint64_t *)p = (uint64_t)x;
        return MOSFT_OK;
    }
    case T_TARGETS: {
        int t[MOD_COUNT] = {0};
        if (cJSON_IsString(v)) {
            if (!strcmp(v->valuestring, "all")) {
                for (int m = 0; m < MOD_COUNT; m++) t[m] = 1;
            } else {  // "q,k,v"
                char *s = xstrdup(v->valuestring), *save = NULL;
                for (char *tok = strtok_r(s, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
                    int m = module_from_name(tok);
                    if (m < 0) {
                        free(s);
                        return bad_value(file, path, f, v);
                    }
                    t[m] = 1;
                }
                free(s);
            }
        } else if (cJSON_IsArray(v)) {
            for (const cJSON *it = v->child; it; it = it->next) {
                int m = cJSON_IsString(it) ? module_from_name(it->valuestring) : -1;
                if (m < 0) return bad_value(file, path, f, v);
                t[m] = 1;
            }
        } else {
            return bad_value(file, path, f, v);
        }
        int any = 0;
        for (int m = 0; m < MOD_COUNT; m++) any |= t[m];
        if (!any) return bad_value(file, path, f, v);
        memcpy(p, t, sizeof t);
        return MOSFT_OK;
    }
    }
    return MOSFT_ERR_RUNTIME;
}

static void apply_default(void *base, const field *f) {
    cJSON *v = NULL;
    if (f->type == T_STR || f->type == T_ENUM)
        v = cJSON_CreateString(f->def);
    else
        v = cJSON_Parse(f->def);
    MOSFT_ASSERT(v != NULL);
    int rc = apply_value(base, f, v, "defaults", f->path);
    MOSFT_ASSERT(rc == MOSFT_OK);
    cJSON_Delete(v);
}

static void source_defaults(cfg_source *s) {
    memset(s, 0, sizeof *s);
    for (int i = 0; i < N_SOURCE_SCHEMA; i++) apply_default(s, &k_source_schema[i]);
}

void config_defaults(mosft_config *c) {
    memset(c, 0, sizeof *c);
    c->source_path = xstrdup("");
    for (int i = 0; i < N_SCHEMA; i++) apply_default(c, &k_schema[i]);
}

static void free_fields(void *base, const field *schema, int n) {
    for (int i = 0; i < n; i++)
        if (schema[i].type == T_STR || schema[i].type == T_ENUM) {
            char **p = field_ptr(base, &schema[i]);
            free(*p);
            *p = NULL;
        }
}

void config_free(mosft_config *c) {
    if (!c) return;
    free_fields(c, k_schema, N_SCHEMA);
    for (int i = 0; i < c->data.n_sources; i++) free_fields(&c->data.sources[i], k_source_schema, N_SOURCE_SCHEMA);
    free(c->source_path);
    memset(c, 0, sizeof *c);
}

// ---- "did you mean" ---------------------------------------------------------------------------

static int edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return 99;
    int d[64][64];
    for (size_t i = 0; i <= la; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++)
        for (size_t j = 1; j <= lb; j++) {
            int c = tolower((unsigned char)a[i - 1]) == tolower((unsigned char)b[j - 1]) ? 0 : 1;
            int x = d[i - 1][j] + 1, y = d[i][j - 1] + 1, z = d[i - 1][j - 1] + c;
            d[i][j] = x < y ? (x < z ? x : z) : (y < z ? y : z);
        }
    return d[la][lb];
}

static const char *last_part(const char *p) {
    const char *d = strrchr(p, '.');
    return d ? d + 1 : p;
}

// Names users bring from HF transformers/PEFT and the MoS code, mapped to ours (suggested, not accepted).
static const char *const k_aliases[][2] = {
    {"rank", "adapter.r"},
    {"lora_r", "adapter.r"},
    {"lora_alpha", "adapter.alpha"},
    {"lora_dropout", "adapter.dropout"},
    {"target_modules", "adapter.targets"},
    {"valid_param_lora_r", "adapter.equiv_rank"},
    {"valid_param_private_r", "adapter.private_rank"},
    {"num_chunk_per_vec", "adapter.shards"},
    {"learning_rate", "train.lr"},
    {"max_steps", "train.steps"},
    {"num_train_epochs", "data.epochs"},
    {"max_seq_length", "data.max_seq_len"},
    {"gradient_checkpointing", "train.recompute"},
    {"lr_scheduler_type", "train.schedule"},
    {"adam_beta1", "train.beta1"},
    {"adam_beta2", "train.beta2"},
    {"adam_epsilon", "train.eps"},
    {"max_grad_norm", "train.max_grad_norm"},
    {"per_device_train_batch_size", "train.micro_batch_size"},
    {"gradient_accumulation_steps", "train.batch_size"},
    {"output_dir", "output.dir"},
    {"save_steps", "output.save_every"},
    {"save_total_limit", "output.keep_last"},
    {"eval_steps", "train.eval_every"},
    {"logging_steps", "train.log_every"},
    {"load_in_4bit", "model.quantization"},
    {"bnb_4bit_use_double_quant", "model.double_quant"},
    {"model_name_or_path", "model.path"},
};

// Best suggestion for an unknown key `path` (full dotted path); NULL if nothing is close.
static const char *suggest(const char *path, int in_source) {
    const char *best = NULL;
    int bd = 99;
    const char *leaf = last_part(path);
    if (!in_source)
        for (size_t i = 0; i < sizeof k_aliases / sizeof k_aliases[0]; i++)
            if (!strcmp(leaf, k_aliases[i][0])) return k_aliases[i][1];
    int n = in_source ? N_SOURCE_SCHEMA : N_SCHEMA;
    const field *sc = in_source ? k_source_schema : k_schema;
    for (int i = 0; i < n; i++) {
        int d1 = edit_distance(path, sc[i].path), d2 = edit_distance(leaf, last_part(sc[i].path));
        int d = d1 < d2 + 1 ? d1 : d2 + 1;  // a right leaf in the wrong section still helps
        if (d < bd) {
            bd = d;
            best = sc[i].path;
        }
    }
    if (!in_source) {
        for (int i = 0; i < N_SECTIONS; i++) {
            int d = edit_distance(path, k_sections[i]);
            if (d < bd) {
                bd = d;
                best = k_sections[i];
            }
        }
        if (edit_distance(path, "data.sources") < bd) {
            bd = edit_distance(path, "data.sources");
            best = "data.sources";
        }
    }
    int lim = (int)strlen(leaf) / 3;
    if (lim < 2) lim = 2;
    return bd <= lim ? best : NULL;
}

static int unknown_key(const char *file, const char *path, int in_source, const char *shown) {
    const char *s = suggest(path, in_source);
    if (s)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: unknown key (did you mean \"%s\"?)", file, shown, s);
    return mosft_fail_hint(MOSFT_ERR_INPUT, "`mosft help config` lists every key", "%s: %s: unknown key", file, shown);
}

static int is_comment_key(const char *k) { return k[0] == '_' || k[0] == '#'; }

static const field *find_field(const field *schema, int n, const char *path) {
    for (int i = 0; i < n; i++)
        if (!strcmp(schema[i].path, path)) return &schema[i];
    return NULL;
}

static int load_source(mosft_config *c, int idx, const cJSON *obj, const char *file) {
    char where[64];
    snprintf(where, sizeof where, "data.sources[%d]", idx);
    if (!cJSON_IsObject(obj))
        return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected an object {\"path\": ..., \"format\": ...}", file, where);
    cfg_source *s = &c->data.sources[idx];
    for (const cJSON *kv = obj->child; kv; kv = kv->next) {
        if (is_comment_key(kv->string)) continue;
        char shown[160];
        snprintf(shown, sizeof shown, "%s.%s", where, kv->string);
        const field *f = find_field(k_source_schema, N_SOURCE_SCHEMA, kv->string);
        if (!f) return unknown_key(file, kv->string, 1, shown);
        int rc = apply_value(s, f, kv, file, shown);
        if (rc) return rc;
    }
    if (!s->path[0]) return mosft_fail(MOSFT_ERR_INPUT, "%s: %s.path: expected a file, directory or URL, got nothing", file, where);
    if (!cJSON_GetObjectItemCaseSensitive(obj, "format"))
        return mosft_fail(MOSFT_ERR_INPUT,
                          "%s: %s.format: expected one of \"codealpaca\", \"superni\", \"flan_v2\", \"messages\", "
                          "\"prompt_completion\", got nothing",
                          file, where);
    return MOSFT_OK;
}

static int load_sources(mosft_config *c, const cJSON *arr, const char *file) {
    if (!cJSON_IsArray(arr))
        return mosft_fail(MOSFT_ERR_INPUT, "%s: data.sources: expected an array of {\"path\", \"format\"} objects", file);
    for (int i = 0; i < c->data.n_sources; i++) free_fields(&c->data.sources[i], k_source_schema, N_SOURCE_SCHEMA);
    c->data.n_sources = 0;
    int n = cJSON_GetArraySize(arr);
    if (n > CFG_MAX_SOURCES)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: data.sources: expected at most %d sources, got %d", file, CFG_MAX_SOURCES, n);
    int i = 0;
    for (const cJSON *it = arr->child; it; it = it->next, i++) {
        source_defaults(&c->data.sources[i]);
        c->data.n_sources = i + 1;
        int rc = load_source(c, i, it, file);
        if (rc) return rc;
    }
    return MOSFT_OK;
}

// Apply a JSON object tree (a whole config file, or a one-key object from --set).
static int apply_tree(mosft_config *c, const cJSON *root, const char *file) {
    if (!cJSON_IsObject(root)) return mosft_fail(MOSFT_ERR_INPUT, "%s: expected a JSON object at the top level", file);
    for (const cJSON *sec = root->child; sec; sec = sec->next) {
        const char *k = sec->string;
        if (is_comment_key(k)) continue;
        const field *f = find_field(k_schema, N_SCHEMA, k);
        if (f) {  // a top-level scalar (device)
            int rc = apply_value(c, f, sec, file, k);
            if (rc) return rc;
            continue;
        }
        int known = 0;
        for (int i = 0; i < N_SECTIONS; i++) known |= !strcmp(k, k_sections[i]);
        if (!known) return unknown_key(file, k, 0, k);
        if (!cJSON_IsObject(sec)) return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected an object", file, k);
        for (const cJSON *kv = sec->child; kv; kv = kv->next) {
            if (is_comment_key(kv->string)) continue;
            char path[160];
            snprintf(path, sizeof path, "%s.%s", k, kv->string);
            if (!strcmp(path, "data.sources")) {
                int rc = load_sources(c, kv, file);
                if (rc) return rc;
                continue;
            }
            const field *ff = find_field(k_schema, N_SCHEMA, path);
            if (!ff) return unknown_key(file, path, 0, path);
            int rc = apply_value(c, ff, kv, file, path);
            if (rc) return rc;
        }
    }
    return MOSFT_OK;
}

static void json_error_position(const char *text, const char *at, int *line, int *col) {
    *line = 1;
    *col = 1;
    for (const char *p = text; p < at && *p; p++) {
        if (*p == '\n') {
            (*line)++;
            *col = 1;
        } else {
            (*col)++;
        }
    }
}

int config_load(mosft_config *c, const char *path) {
    char *text = NULL;
    size_t len = 0;
    int rc = file_read_all(path, &text, &len);
    if (rc) return rc;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) {
        int line, col;
        json_error_position(text, end ? end : text, &line, &col);
        free(text);
        return mosft_fail(MOSFT_ERR_INPUT, "%s: line %d, column %d: expected valid JSON", path, line, col);
    }
    free(text);
    free(c->source_path);
    c->source_path = xstrdup(path);
    rc = apply_tree(c, root, path);
    cJSON_Delete(root);
    return rc;
}

int config_set(mosft_config *c, const char *assignment) {
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        return mosft_fail(MOSFT_ERR_INPUT, "--set %s: expected key=value (for example train.lr=1e-4)", assignment);
    char key[256];
    size_t kl = (size_t)(eq - assignment);
    if (kl >= sizeof key) return mosft_fail(MOSFT_ERR_INPUT, "--set: key too long");
    memcpy(key, assignment, kl);
    key[kl] = 0;
    const char *val = eq + 1;
    cJSON *v = cJSON_Parse(val);
    if (!v) v = cJSON_CreateString(val);  // bare words are strings: --set model.path=/models/x
    char file[300];
    snprintf(file, sizeof file, "--set %s", key);
    int rc;
    // data.sources[N].key or data.sources.N.key
    int idx = -1;
    char sub[128] = "";
    if (sscanf(key, "data.sources[%d].%127s", &idx, sub) == 2 || sscanf(key, "data.sources.%d.%127s", &idx, sub) == 2) {
        if (idx < 0 || idx > c->data.n_sources || idx >= CFG_MAX_SOURCES) {
            cJSON_Delete(v);
            return mosft_fail(MOSFT_ERR_INPUT, "--set %s: data.sources has %d entries; index %d is out of range", key,
                              c->data.n_sources, idx);
        }
        if (idx == c->data.n_sources) {  // appending a new source
            source_defaults(&c->data.sources[idx]);
            c->data.n_sources++;
        }
        const field *f = find_field(k_source_schema, N_SOURCE_SCHEMA, sub);
        rc = f ? apply_value(&c->data.sources[idx], f, v, "--set", key) : unknown_key("--set", sub, 1, key);
    } else if (!strcmp(key, "data.sources")) {
        rc = load_sources(c, v, "--set");
    } else {
        const field *f = find_field(k_schema, N_SCHEMA, key);
        rc = f ? apply_value(c, f, v, "--set", key) : unknown_key("--set", key, 0, key);
    }
    cJSON_Delete(v);
    return rc;
}

int config_validate(const mosft_config *c) {
    const char *file = c->source_path[0] ? c->source_path : "config";
    if (c->train.batch_size % c->train.micro_batch_size != 0)
        return mosft_fail(MOSFT_ERR_INPUT,
                          "%s: train.batch_size: expected a multiple of train.micro_batch_size (%d), got %d", file,
                          c->train.micro_batch_size, c->train.batch_size);
    const char *t = c->adapter.tied_lora_trainable;
    if (!t[0]) return mosft_fail(MOSFT_ERR_INPUT, "%s: adapter.tied_lora_trainable: expected letters of \"vBuA\", got \"\"", file);
    for (const char *p = t; *p; p++)
        if (!strchr("vBuA", *p))
            return mosft_fail(MOSFT_ERR_INPUT, "%s: adapter.tied_lora_trainable: expected letters of \"vBuA\", got \"%s\"",
                              file, t);
    if (c->adapter.sira_top_k > c->adapter.sira_experts)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: adapter.sira_top_k: expected at most adapter.sira_experts (%d), got %d",
                          file, c->adapter.sira_experts, c->adapter.sira_top_k);
    if (c->adapter.pure_sharing && c->adapter.subset_selection)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: adapter: pure_sharing and subset_selection exclude each other", file);
    return MOSFT_OK;
}

// ---- output -----------------------------------------------------------------------------------

static cJSON *value_json(const void *base, const field *f) {
    const void *p = (const char *)base + f->offset;
    switch (f->type) {
    case T_STR:
    case T_ENUM: return cJSON_CreateString(*(char *const *)p);
    case T_BOOL: return cJSON_CreateBool(*(const int *)p);
    case T_NUM: return cJSON_CreateNumber(*(const double *)p);
    case T_INT: return cJSON_CreateNumber(*(const int *)p);
    case T_I64: return cJSON_CreateNumber((double)*(const int64_t *)p);
    case T_U64: return cJSON_CreateNumber((double)*(const uint64_t *)p);
    case T_TARGETS: {
        cJSON *a = cJSON_CreateArray();
        const int *t = p;
        for (int m = 0; m < MOD_COUNT; m++)
            if (t[m]) cJSON_AddItemToArray(a, cJSON_CreateString(k_module_names[m]));
        return a;
    }
    }
    return cJSON_CreateNull();
}

static cJSON *section_obj(cJSON *root, const char *sec) {
    cJSON *o = cJSON_GetObjectItemCaseSensitive(root, sec);
    if (!o) o = cJSON_AddObjectToObject(root, sec);
    return o;
}

char *config_to_json(const mosft_config *c) {
    cJSON *root = cJSON_CreateObject();
    for (int i = 0; i < N_SCHEMA; i++) {
        const field *f = &k_schema[i];
        const char *dot = strchr(f->path, '.');
        if (!dot) {
            cJSON_AddItemToObject(root, f->path, value_json(c, f));
            continue;
        }
        char sec[32];
        snprintf(sec, sizeof sec, "%.*s", (int)(dot - f->path), f->path);
        cJSON *o = section_obj(root, sec);
        if (!strcmp(f->path, "data.max_seq_len")) {  // sources first inside data
            cJSON *arr = cJSON_AddArrayToObject(o, "sources");
            for (int s = 0; s < c->data.n_sources; s++) {
                cJSON *so = cJSON_CreateObject();
                for (int j = 0; j < N_SOURCE_SCHEMA; j++)
                    cJSON_AddItemToObject(so, k_source_schema[j].path, value_json(&c->data.sources[s], &k_source_schema[j]));
                cJSON_AddItemToArray(arr, so);
            }
        }
        cJSON_AddItemToObject(o, dot + 1, value_json(c, f));
    }
    char *s = cJSON_Print(root);
    cJSON_Delete(root);
    char *r = xstrdup(s);
    cJSON_free(s);
    return r;
}

static void value_text(const void *base, const field *f, char *out, size_t n) {
    cJSON *v = value_json(base, f);
    if (cJSON_IsString(v)) {
        snprintf(out, n, "%s", v->valuestring[0] ? v->valuestring : "(default)");
    } else {
        char *s = cJSON_PrintUnformatted(v);
        snprintf(out, n, "%s", s);
        cJSON_free(s);
    }
    cJSON_Delete(v);
}

char *config_doc_markdown(void) {
    mosft_buf b = {0};
    buf_append_str(&b, "| key | type | default | meaning |\n|---|---|---|---|\n");
    for (int i = 0; i < N_SCHEMA; i++) {
        const field *f = &k_schema[i];
        char exp[256];
        describe_expected(f, exp, sizeof exp);
        const char *def = f->def[0] ? f->def : "\"\"";
        buf_printf(&b, "| `%s` | %s | `%s` | %s |\n", f->path, exp, def, f->doc);
        if (!strcmp(f->path, "adapter.sira_expert_dropout"))
            buf_append_str(&b, "| `data.sources` | a list of source objects (below) | `[]` | the training data |\n");
    }
    buf_append_str(&b, "\nEach entry of `data.sources`:\n\n| key | type | default | meaning |\n|---|---|---|---|\n");
    for (int i = 0; i < N_SOURCE_SCHEMA; i++) {
        const field *f = &k_source_schema[i];
        char exp[256];
        describe_expected(f, exp, sizeof exp);
        buf_printf(&b, "| `%s` | %s | `%s` | %s |\n", f->path, exp, f->def[0] ? f->def : "\"\"", f->doc);
    }
    return buf_cstr(&b);
}

char *config_table(const mosft_config *c) {
    mosft_buf b = {0};
    const int kw = 28, vw = 56;
    char line[256];
    memset(line, 0, sizeof line);
    for (int i = 0; i < kw + vw + 5; i++) line[i] = '-';
    buf_printf(&b, "+%s+\n", line);
    buf_printf(&b, "| %-*s | %-*s |\n", kw, "configuration", vw, c->source_path[0] ? c->source_path : "(defaults)");
    buf_printf(&b, "+%s+\n", line);
    for (int i = 0; i < N_SCHEMA; i++) {
        const field *f = &k_schema[i];
        // Peer-adapter knobs are only shown for their method.
        const char *m = c->adapter.method;
        if (!strncmp(f->path, "adapter.prolora_", 16) && strcmp(m, "prolora")) continue;
        if (!strncmp(f->path, "adapter.vera_", 13) && strcmp(m, "vera")) continue;
        if (!strncmp(f->path, "adapter.tied_lora_", 18) && strcmp(m, "tied_lora")) continue;
        if (!strncmp(f->path, "adapter.sharelora_", 18) && strcmp(m, "sharelora")) continue;
        if (!strncmp(f->path, "adapter.sira_", 13) && strcmp(m, "sira")) continue;
        if ((!strcmp(f->path, "adapter.equiv_rank") || !strcmp(f->path, "adapter.private_rank") ||
             !strcmp(f->path, "adapter.shards") || !strcmp(f->path, "adapter.pair_dissociation") ||
             !strcmp(f->path, "adapter.pure_sharing") || !strcmp(f->path, "adapter.subset_selection") ||
             !strncmp(f->path, "adapter.scale_", 14)) &&
            strcmp(m, "mos"))
            continue;
        char v[512];
        value_text(c, f, v, sizeof v);
        buf_printf(&b, "| %-*s | %-*.*s |\n", kw, f->path, vw, vw, v);
        if (!strcmp(f->path, "data.max_seq_len")) {
            for (int s = 0; s < c->data.n_sources; s++) {
                const cfg_source *src = &c->data.sources[s];
                char k[64], val[512];
                snprintf(k, sizeof k, "data.sources[%d]", s);
                snprintf(val, sizeof val, "%s (%s, weight %g)", src->path, src->format, src->weight);
                buf_printf(&b, "| %-*s | %-*.*s |\n", kw, k, vw, vw, val);
            }
        }
    }
    buf_printf(&b, "+%s+\n", line);
    return buf_cstr(&b);
}
