// model_config.c: HF LLaMA config.json parsing and model arithmetic (see model.h).
#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/fileio.h"
#include "core/model.h"

static int get_int(const cJSON *root, const char *path, const char *key, int required, int def, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v)) {
        if (required) return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected a positive integer, got nothing", path, key);
        *out = def;
        return MOSFT_OK;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 1 || v->valuedouble > 1e9) {
        char *s = cJSON_PrintUnformatted(v);
        int rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected a positive integer, got %.40s", path, key, s);
        cJSON_free(s);
        return rc;
    }
    *out = (int)v->valuedouble;
    return MOSFT_OK;
}

static int get_num(const cJSON *root, const char *path, const char *key, double def, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return MOSFT_OK;
    }
    if (!cJSON_IsNumber(v) || !(v->valuedouble > 0)) {
        char *s = cJSON_PrintUnformatted(v);
        int rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected a number > 0, got %.40s", path, key, s);
        cJSON_free(s);
        return rc;
    }
    *out = v->valuedouble;
    return MOSFT_OK;
}

static int token_id(const cJSON *root, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (cJSON_IsNumber(v)) return (int)v->valuedouble;
    if (cJSON_IsArray(v) && cJSON_IsNumber(cJSON_GetArrayItem(v, 0)))  // Llama 3 Instruct: a list
        return (int)cJSON_GetArrayItem(v, 0)->valuedouble;
    return -1;
}

int llama_config_load(llama_config *c, const char *path_in) {
    memset(c, 0, sizeof *c);
    char *path = dir_exists(path_in) ? path_join(path_in, "config.json") : xstrdup(path_in);
    char *text = NULL;
    int rc = file_read_all(path, &text, NULL);
    if (rc) {
        free(path);
        return rc;
    }
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: expected a JSON object (HF config.json)", path);
        free(path);
        return rc;
    }
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    snprintf(c->model_type, sizeof c->model_type, "%s", cJSON_IsString(mt) ? mt->valuestring : "llama");
    if (strcmp(c->model_type, "llama") != 0 && strcmp(c->model_type, "mistral") != 0) {
        rc = mosft_fail_hint(MOSFT_ERR_INPUT, "mosft trains LLaMA-family models (model_type \"llama\")",
                             "%s: model_type: expected \"llama\", got \"%s\"", path, c->model_type);
        goto done;
    }
    if ((rc = get_int(root, path, "hidden_size", 1, 0, &c->hidden))) goto done;
    if ((rc = get_int(root, path, "intermediate_size", 1, 0, &c->intermediate))) goto done;
    if ((rc = get_int(root, path, "num_hidden_layers", 1, 0, &c->n_layers))) goto done;
    if ((rc = get_int(root, path, "num_attention_heads", 1, 0, &c->n_heads))) goto done;
    if ((rc = get_int(root, path, "num_key_value_heads", 0, c->n_heads, &c->n_kv_heads))) goto done;
    if ((rc = get_int(root, path, "vocab_size", 1, 0, &c->vocab))) goto done;
    if ((rc = get_int(root, path, "max_position_embeddings", 0, 4096, &c->max_pos))) goto done;
    c->sliding_window = 0;
    if (!strcmp(c->model_type, "mistral")) {  // Mistral 7B v0.1 attends within 4096 tokens; v0.2+ write null
        const cJSON *sw = cJSON_GetObjectItemCaseSensitive(root, "sliding_window");
        if (sw && !cJSON_IsNull(sw) && (!cJSON_IsNumber(sw) || sw->valuedouble < 1)) {
            rc = mosft_fail(MOSFT_ERR_INPUT, "%s: sliding_window: expected a positive integer or null", path);
            goto done;
        }
        if (cJSON_IsNumber(sw)) c->sliding_window = sw->valuedouble > 1e9 ? 1000000000 : (int)sw->valuedouble;
    }
    if (c->hidden % c->n_heads != 0 && !cJSON_GetObjectItemCaseSensitive(root, "head_dim")) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: hidden_size (%d) must be a multiple of num_attention_heads (%d)", path,
                        c->hidden, c->n_heads);
        goto done;
    }
    if ((rc = get_int(root, path, "head_dim", 0, c->hidden / c->n_heads, &c->head_dim))) goto done;
    if (c->n_heads % c->n_kv_heads != 0) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: num_attention_heads (%d) must be a multiple of num_key_value_heads (%d)",
                        path, c->n_heads, c->n_kv_heads);
        goto done;
    }
    if (c->head_dim % 2 != 0) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: head_dim: expected an even number (RoPE rotates pairs), got %d", path,
                        c->head_dim);
        goto done;
    }
    if ((rc = get_num(root, path, "rms_norm_eps", 1e-6, &c->rms_eps))) goto done;
    // transformers >= 5 writes rope_parameters {rope_theta, rope_type, factor, ...} instead of
    // rope_theta + rope_scaling; accept both.
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    if (rp && !cJSON_IsNull(rp) && !cJSON_IsObject(rp)) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: rope_parameters: expected an object", path);
        goto done;
    }
    if ((rc = get_num(cJSON_IsObject(rp) && cJSON_GetObjectItemCaseSensitive(rp, "rope_theta") ? rp : root, path,
                      "rope_theta", 10000.0, &c->rope_theta)))
        goto done;
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(root, "tie_word_embeddings");
    c->tie_embeddings = cJSON_IsBool(tie) ? cJSON_IsTrue(tie) : 0;  // HF LlamaConfig default: false
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (cJSON_IsString(act) && strcmp(act->valuestring, "silu") != 0) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: hidden_act: expected \"silu\", got \"%s\"", path, act->valuestring);
        goto done;
    }
    const cJSON *ab = cJSON_GetObjectItemCaseSensitive(root, "attention_bias");
    const cJSON *mb = cJSON_GetObjectItemCaseSensitive(root, "mlp_bias");
    if (cJSON_IsTrue(ab) || cJSON_IsTrue(mb)) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected false (biases are not supported), got true", path,
                        cJSON_IsTrue(ab) ? "attention_bias" : "mlp_bias");
        goto done;
    }
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    if ((!rs || cJSON_IsNull(rs)) && cJSON_IsObject(rp)) rs = rp;
    if (rs && !cJSON_IsNull(rs)) {
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
        if (!ty) ty = cJSON_GetObjectItemCaseSensitive(rs, "type");
        if (!cJSON_IsString(ty) || (strcmp(ty->valuestring, "llama3") != 0 && strcmp(ty->valuestring, "default") != 0)) {
            rc = mosft_fail(MOSFT_ERR_INPUT, "%s: rope_scaling.rope_type: expected \"llama3\" (or null), got %s", path,
                            cJSON_IsString(ty) ? ty->valuestring : "nothing");
            goto done;
        }
        if (!strcmp(ty->valuestring, "llama3")) {
            c->rope_llama3 = 1;
            if ((rc = get_num(rs, path, "factor", 8.0, &c->rope_factor))) goto done;
            if ((rc = get_num(rs, path, "low_freq_factor", 1.0, &c->rope_low_freq_factor))) goto done;
            if ((rc = get_num(rs, path, "high_freq_factor", 4.0, &c->rope_high_freq_factor))) goto done;
            if ((rc = get_int(rs, path, "original_max_position_embeddings", 0, 8192, &c->rope_orig_max_pos))) goto done;
            if (!(c->rope_high_freq_factor > c->rope_low_freq_factor)) {
                rc = mosft_fail(MOSFT_ERR_INPUT, "%s: rope_scaling: expected high_freq_factor > low_freq_factor", path);
                goto done;
            }
        }
    }
    c->bos_id = token_id(root, "bos_token_id");
    c->eos_id = token_id(root, "eos_token_id");
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(root, "torch_dtype");
    if (!dt) dt = cJSON_GetObjectItemCaseSensitive(root, "dtype");
    snprintf(c->torch_dtype, sizeof c->torch_dtype, "%s", cJSON_IsString(dt) ? dt->valuestring : "");
done:
    cJSON_Delete(root);
    free(path);
    return rc;
}

void llama_module_dims(const llama_config *c, int module, int *d_in, int *d_out) {
    int q = c->n_heads * c->head_dim, kv = c->n_kv_heads * c->head_dim;
    switch (module) {
    case MOD_Q: *d_in = c->hidden; *d_out = q; break;
    case MOD_K:
    case MOD_V: *d_in = c->hidden; *d_out = kv; break;
    case MOD_O: *d_in = q; *d_out = c->hidden; break;
    case MOD_GATE:
    case MOD_UP: *d_in = c->hidden; *d_out = c->intermediate; break;
    case MOD_DOWN: *d_in = c->intermediate; *d_out = c->hidden; break;
    default: MOSFT_ASSERT(!"bad module");
    }
}

int64_t llama_linear_param_count(const llama_config *c) {
    int64_t per_layer = 0;
    for (int m = 0; m < MOD_COUNT; m++) {
        int di, dout;
        llama_module_dims(c, m, &di, &dout);
        per_layer += (int64_t)di * dout;
    }
    return per_layer * c->n_layers;
}

int64_t llama_param_count(const llama_config *c) {
    int64_t n = llama_linear_param_count(c);
    n += (int64_t)c->n_layers * 2 * c->hidden;  // two norms per layer
    n += c->hidden;                             // final norm
    n += (int64_t)c->vocab * c->hidden;         // embedding
    if (!c->tie_embeddings) n += (int64_t)c->vocab * c->hidden;
    return n;
}

void llama_linear_name(char *out, size_t n, int layer, int module) {
    snprintf(out, n, "model.layers.%d.%s.weight", layer, k_module_hf[module]);
}

void llama_rope_inv_freq(const llama_config *c, double *inv) {
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) inv[i] = 1.0 / pow(c->rope_theta, (double)(2 * i) / (double)c->head_dim);
    if (!c->rope_llama3) return;
    // HF _compute_llama3_parameters: long wavelengths are divided by `factor`, short ones kept, and a
    // smooth interpolation in between.
    double low_wl = c->rope_orig_max_pos / c->rope_low_freq_factor;
    double high_wl = c->rope_orig_max_pos / c->rope_high_freq_factor;
    for (int i = 0; i < half; i++) {
        double wl = 2.0 * M_PI / inv[i];
        if (wl > low_wl) {
            inv[i] = inv[i] / c->rope_factor;
        } else if (wl >= high_wl) {
            double smooth = (c->rope_orig_max_pos / wl - c->rope_low_freq_factor) /
                            (c->rope_high_freq_factor - c->rope_low_freq_factor);
            inv[i] = (1.0 - smooth) * inv[i] / c->rope_factor + smooth * inv[i];
        }
    }
}

int llama_check_seq_len(const llama_config *c, int max_seq_len, const char *cfg_path) {
    if (c->sliding_window > 0 && max_seq_len > c->sliding_window)
        return mosft_fail_hint(MOSFT_ERR_INPUT, "set data.max_seq_len to at most the window",
                               "%s: data.max_seq_len: expected at most the model's sliding_window (%d tokens; mosft's "
                               "attention is full causal), got %d",
                               cfg_path, c->sliding_window, max_seq_len);
    if (c->max_pos > 0 && max_seq_len > c->max_pos)
        mosft_log("warning: %s: data.max_seq_len (%d) exceeds the model's max_position_embeddings (%d): positions "
                  "beyond it were not pretrained\n",
                  cfg_path, max_seq_len, c->max_pos);
    return MOSFT_OK;
}
