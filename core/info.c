// info.c: `mosft info` summaries (see info.h).
#include "core/info.h"

#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/fileio.h"
#include "core/model.h"
#include "core/nf4.h"
#include "core/safetensors.h"
#include "data/tokenizer.h"

int info_model(const char *dir, FILE *out) {
    llama_config c;
    int rc = llama_config_load(&c, dir);
    if (rc) return rc;
    // The weights: count what the checkpoint really holds, and compare with the architecture.
    st_set set;
    int have_weights = st_set_open(&set, dir) == MOSFT_OK;
    int64_t stored = 0, stored_bytes = 0;
    int n_tensors = 0, prequant = 0;
    if (have_weights) {
        for (int f = 0; f < set.n_files; f++) {
            stored_bytes += (int64_t)set.files[f].map_len;  // the file, header included
            for (int i = 0; i < set.files[f].n_tensors; i++) {
                const st_tensor *t = &set.files[f].tensors[i];
                n_tensors++;
                if (strstr(t->name, ".quant_state.") || strstr(t->name, ".absmax") || strstr(t->name, "quant_map")) {
                    prequant = 1;
                    continue;
                }
                // Tied embeddings: a stored lm_head is a copy HF ignores, not a parameter of its own.
                if (c.tie_embeddings && !strcmp(t->name, "lm_head.weight")) continue;
                stored += t->numel;
            }
        }
    } else {
        mosft_error_clear();
    }
    int64_t params = llama_param_count(&c), linear = llama_linear_param_count(&c);
    double bf16_bytes = 2.0 * (double)params;
    double nf4_bytes = 2.0 * (double)(params - linear);  // embeddings, norms, lm_head stay 16-bit
    for (int l = 0; l < c.n_layers; l++)
        for (int m = 0; m < MOD_COUNT; m++) {
            int di, dout;
            llama_module_dims(&c, m, &di, &dout);
            nf4_bytes += nf4_storage_bytes((int64_t)di * dout, 1);
        }
    char sp[32], sl[32], sb[32], sn[32], sst[32];
    mosft_fmt_count(sp, sizeof sp, (double)params);
    mosft_fmt_count(sl, sizeof sl, (double)linear);
    mosft_fmt_bytes(sb, sizeof sb, bf16_bytes);
    mosft_fmt_bytes(sn, sizeof sn, nf4_bytes);
    fprintf(out, "model            %s\n", dir);
    fprintf(out, "architecture     %s: %d layers, hidden %d, intermediate %d\n", c.model_type, c.n_layers, c.hidden,
            c.intermediate);
    fprintf(out, "attention        %d heads, %d kv heads%s, head_dim %d\n", c.n_heads, c.n_kv_heads,
            c.n_kv_heads != c.n_heads ? " (grouped-query)" : "", c.head_dim);
    fprintf(out, "vocabulary       %d\n", c.vocab);
    fprintf(out, "rms_norm_eps     %g\n", c.rms_eps);
    if (c.rope_llama3)
        fprintf(out, "rope             theta %g, llama3 scaling (factor %g, low %g, high %g, original %d)\n",
                c.rope_theta, c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_orig_max_pos);
    else
        fprintf(out, "rope             theta %g\n", c.rope_theta);
    fprintf(out, "embeddings       %s\n", c.tie_embeddings ? "tied (lm_head = embed_tokens)" : "separate lm_head");
    fprintf(out, "parameters       %s (%s in the 7 linear types)\n", sp, sl);
    fprintf(out, "size as bf16     %s\n", sb);
    fprintf(out, "size as NF4      %s (linears NF4 with double quantization, the rest 16-bit)\n", sn);
    if (have_weights) {
        mosft_fmt_bytes(sst, sizeof sst, (double)stored_bytes);
        char sc[32];
        mosft_fmt_count(sc, sizeof sc, (double)stored);
        fprintf(out, "weights          %d file%s, %d tensors, %s on disk%s\n", set.n_files, set.n_files == 1 ? "" : "s",
                n_tensors, sst, prequant ? ", pre-quantized bnb-4bit" : "");
        if (!prequant && stored != params)
            fprintf(out, "warning          the checkpoint holds %s parameters, the config describes %s\n", sc, sp);
        st_set_close(&set);
    } else {
        fprintf(out, "weights          none found (config only)\n");
    }
    char *tp = path_join(dir, "tokenizer.json");
    if (file_exists(tp)) {
        tokenizer *tok = NULL;
        if (tokenizer_load(&tok, tp) == MOSFT_OK) {
            fprintf(out, "tokenizer        %s (%d tokens, bos %d, eos %d)\n", tp, tokenizer_vocab_size(tok),
                    tokenizer_bos_id(tok), tokenizer_eos_id(tok));
            tokenizer_free(tok);
        } else {
            fprintf(out, "tokenizer        %s (cannot be loaded: %s)\n", tp, mosft_error());
            mosft_error_clear();
        }
    } else {
        fprintf(out, "tokenizer        not found (give tokenizer.path in the config)\n");
    }
    free(tp);
    return MOSFT_OK;
}

int info_adapter(const char *path, FILE *out) {
    (void)out;
    return mosft_fail(MOSFT_ERR_RUNTIME, "%s: mosft info on an adapter: not implemented yet (issue 5)", path);
}

int info_config(const mosft_config *cfg, FILE *out) {
    (void)out;
    return mosft_fail(MOSFT_ERR_RUNTIME, "%s: mosft info on a config: not implemented yet (issue 5)",
                      cfg->source_path);
}
