// info.c: `mosft info` summaries (see info.h).
#include "core/info.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
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

// ---- adapters -----------------------------------------------------------------------------------

static void print_model_line(FILE *out, const llama_config *m) {
    fprintf(out, "%s: %d layers, hidden %d, intermediate %d, %d heads, %d kv heads, head_dim %d, vocab %d",
            m->model_type[0] ? m->model_type : "llama", m->n_layers, m->hidden, m->intermediate, m->n_heads,
            m->n_kv_heads, m->head_dim, m->vocab);
}

// The method's knobs, and the ablations in effect (MoS).
static void print_spec(FILE *out, const adapter_spec *s, int rank, float scaling) {
    if (!strcmp(s->method, "mos")) {
        fprintf(out, "method           mos (Mixture of Shards)\n");
        fprintf(out, "ranks            r %d, equivalent rank R_v %d, private rank R_p %d, shards per vector l %d\n", rank,
                s->equiv_rank, s->private_rank, s->shards);
        char abl[256] = "";
        if (s->pure_sharing) strcat(abl, "pure sharing, ");
        if (s->subset_selection) strcat(abl, "subset selection, ");
        if (!s->pair_dissociation && !s->subset_selection && !s->pure_sharing) strcat(abl, "no pair dissociation (-pd), ");
        if (s->shards == 1 && !s->pure_sharing && !s->subset_selection) strcat(abl, "no vector sharding (-vs), ");
        if (s->private_rank == 0 && !s->pure_sharing && !s->subset_selection) strcat(abl, "no privatization (-sp), ");
        if (s->scale_std > 0) {
            char t[96];
            snprintf(t, sizeof t, "random scaling (mean %g, std %g), ", s->scale_mean, s->scale_std);
            strcat(abl, t);
        }
        size_t n = strlen(abl);
        if (n) abl[n - 2] = 0;
        fprintf(out, "ablations        %s\n", n ? abl : "none (the full method)");
    } else if (!strcmp(s->method, "prolora")) {
        int rs = rank - s->prolora_unshared_r, sa = rs / s->prolora_reduce_a, sb = rs / s->prolora_reduce_b;
        fprintf(out, "method           prolora (partially rotation-enhanced LoRA)\n");
        fprintf(out, "ranks            r %d, unshared u %d, broadcast reductions m %d (A) n %d (B), rotation strides %d %d\n",
                rank, s->prolora_unshared_r, s->prolora_reduce_a, s->prolora_reduce_b, sa > 1 ? sa : 1, sb > 1 ? sb : 1);
    } else if (!strcmp(s->method, "vera")) {
        fprintf(out, "method           vera (frozen shared random A and B, trained vectors b and d)\n");
        fprintf(out, "rank             r %d, d initial %g, projection seed %llu\n", rank, s->vera_d_initial,
                (unsigned long long)s->vera_projection_seed);
    } else if (!strcmp(s->method, "tied_lora")) {
        fprintf(out, "method           tied_lora (A, B tied across layers, per-layer u, v)\n");
        fprintf(out, "rank             r %d, trainable %s (of vBuA)\n", rank, s->tied_lora_trainable);
    } else if (!strcmp(s->method, "sharelora")) {
        fprintf(out, "method           sharelora (%s shared across layers)\n",
                !strcmp(s->sharelora_share, "qkv") ? "A, one for q, k and v," : s->sharelora_share);
        fprintf(out, "rank             r %d\n", rank);
    } else if (!strcmp(s->method, "sira")) {
        fprintf(out, "method           sira (token-routed mixture of LoRA experts; not exportable as LoRA)\n");
        fprintf(out, "experts          E %d of rank r %d, top-k %d, capacity factor %g, expert dropout %g\n",
                s->sira_experts, rank, s->sira_top_k, s->sira_capacity_factor, s->sira_expert_dropout);
    } else {
        fprintf(out, "method           %s\n", s->method);
        fprintf(out, "rank             r %d\n", rank);
    }
    if (fabs((double)scaling - s->alpha / rank) > 1e-6 * fabs((double)scaling))
        fprintf(out, "scaling          %g (no alpha / r)\n", (double)scaling);
    else
        fprintf(out, "scaling          alpha / r = %g / %d = %g\n", s->alpha, rank, (double)scaling);
    fprintf(out, "dropout          %g (on the adapter input)\n", s->dropout);
    fprintf(out, "seed             %llu\n", (unsigned long long)s->seed);
    char t[128];
    adapter_targets_str(s, t, sizeof t);
    fprintf(out, "targets          %s\n", t);
}

// One row per adapted type: widths and trainable parameters (all layers).
static int64_t print_module_table(FILE *out, const adapter_spec *s, const llama_config *m) {
    fprintf(out, "\n  %-10s %7s %7s %16s\n", "module", "d_in", "d_out", "trainable");
    int64_t total = 0;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        adapter_spec one = *s;
        memset(one.targets, 0, sizeof one.targets);
        one.targets[t] = 1;
        int64_t n = adapter_param_count(&one, m);
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        char sn[32];
        mosft_fmt_count(sn, sizeof sn, (double)n);
        char name[32];
        snprintf(name, sizeof name, "%s_proj", k_module_names[t]);
        fprintf(out, "  %-10s %7d %7d %16s\n", name, di, dout, sn);
        total += n;
    }
    // A tensor shared by several types (ShareLoRA's qkv A) is in each type's own count once.
    int64_t all = adapter_param_count(s, m);
    char st[32];
    if (all != total) {
        mosft_fmt_count(st, sizeof st, (double)(all - total));
        fprintf(out, "  %-10s %7s %7s %16s\n", "shared", "", "", st);
        total = all;
    }
    mosft_fmt_count(st, sizeof st, (double)total);
    fprintf(out, "  %-10s %7s %7s %16s\n\n", "total", "", "", st);
    return total;
}

// Tensors and frozen buffers; a per-layer method (LoRA) is summarized by its first layer.
static void print_layout(FILE *out, const adapter *a) {
    int shown = 0;
    for (int i = 0; i < a->n_tensors; i++) {
        const adapter_tensor *t = &a->tensors[i];
        if (a->n_tensors > 16 && strstr(t->name, "layers.") && !strstr(t->name, "layers.0.")) continue;
        char sh[64];
        st_shape_str(sh, sizeof sh, t->ndim, t->shape);
        fprintf(out, "%-16s %-28s F32  %s\n", shown++ ? "" : "tensors", t->name, sh);
    }
    if (a->n_tensors > 16 && a->model.n_layers > 1)
        fprintf(out, "%-16s ... the same for layers 1..%d (%d tensors in all)\n", "", a->model.n_layers - 1,
                a->n_tensors);
    shown = 0;
    for (int i = 0; i < a->n_buffers; i++) {
        const adapter_buffer *b = &a->buffers[i];
        char sh[64];
        st_shape_str(sh, sizeof sh, b->ndim, b->shape);
        fprintf(out, "%-16s %-28s %-4s %s\n", shown++ ? "" : "frozen", b->name, dtype_name(b->dtype), sh);
    }
}

// LoRA rank with the same trainable budget on this model and these targets.
static void print_lora_comparison(FILE *out, const adapter_spec *s, const llama_config *m, int rank, int64_t total) {
    adapter_spec lora = *s;
    snprintf(lora.method, sizeof lora.method, "lora");
    lora.r = 1;
    int64_t unit = adapter_param_count(&lora, m);
    if (unit <= 0) return;
    char st[32];
    if (total % unit == 0) {
        mosft_fmt_count(st, sizeof st, (double)total);
        fprintf(out, "same budget as   LoRA rank %lld (%s parameters)\n", (long long)(total / unit), st);
    } else {
        fprintf(out, "same budget as   LoRA rank %.2f\n", (double)total / (double)unit);
    }
    if (strcmp(s->method, "lora") != 0 && strcmp(s->method, "sira") != 0) {
        mosft_fmt_count(st, sizeof st, (double)unit * rank);
        fprintf(out, "LoRA at rank %-3d %s parameters (%.1fx this adapter); a PEFT export has this size\n", rank, st,
                (double)unit * rank / (double)total);
    }
}

int info_adapter(const char *path, FILE *out) {
    adapter *a = NULL;
    int rc = adapter_load(&a, path, NULL);
    if (rc) return rc;
    st_file f;
    const char *ver = NULL, *fver = NULL;
    int have_meta = st_open(&f, path) == MOSFT_OK;
    if (!have_meta) st_close(&f);
    if (have_meta) {
        ver = st_meta(&f, "mosft_version");
        fver = st_meta(&f, "format_version");
    }
    char sz[32];
    mosft_fmt_bytes(sz, sizeof sz, (double)file_size(path));
    fprintf(out, "adapter          %s (%s; format mos %s, written by mosft %s)\n", path, sz, fver ? fver : "?",
            ver ? ver : "?");
    print_spec(out, &a->spec, a->rank, a->scaling);
    fprintf(out, "step             %lld\n", (long long)a->step);
    fprintf(out, "base model       %s\n", a->base_model_name[0] ? a->base_model_name : "(name not recorded)");
    fprintf(out, "fingerprint      ");
    print_model_line(out, &a->model);
    fprintf(out, "\n");
    int64_t total = print_module_table(out, &a->spec, &a->model);
    MOSFT_ASSERT(total == (int64_t)a->n_params);
    char st[32], sb[32];
    mosft_fmt_count(st, sizeof st, (double)total);
    mosft_fmt_bytes(sb, sizeof sb, 4.0 * (double)total);
    fprintf(out, "trainable        %s parameters (F32, %s)\n", st, sb);
    print_lora_comparison(out, &a->spec, &a->model, a->rank, total);
    print_layout(out, a);
    if (have_meta) st_close(&f);
    adapter_free(a);
    return MOSFT_OK;
}

int info_config(const mosft_config *cfg, FILE *out) {
    const char *src = cfg->source_path && cfg->source_path[0] ? cfg->source_path : "config";
    if (!cfg->model.path || !cfg->model.path[0])
        return mosft_fail(MOSFT_ERR_INPUT, "%s: model.path: expected the HF model folder (config.json), got \"\"", src);
    llama_config m;
    int rc = llama_config_load(&m, cfg->model.path);
    if (rc) return rc;
    adapter_spec s;
    adapter_spec_from_config(&s, cfg);
    if ((rc = adapter_spec_check(&s, &m))) return mosft_fail_prefix(rc, "%s", src);
    // The layout (nothing drawn) shows the method's normalized spec, tensors and buffers.
    adapter *a = NULL;
    if ((rc = adapter_create_layout(&a, &s, &m))) return mosft_fail_prefix(rc, "%s", src);
    fprintf(out, "config           %s\n", src);
    fprintf(out, "model            %s (", cfg->model.path);
    print_model_line(out, &m);
    fprintf(out, ")\n");
    print_spec(out, &a->spec, a->rank, a->scaling);
    int64_t total = print_module_table(out, &a->spec, &m);
    MOSFT_ASSERT(total == (int64_t)a->n_params);
    char st[32], sb[32], sp[32];
    mosft_fmt_count(st, sizeof st, (double)total);
    mosft_fmt_bytes(sb, sizeof sb, 4.0 * (double)total);
    mosft_fmt_count(sp, sizeof sp, (double)llama_param_count(&m));
    fprintf(out, "trainable        %s parameters (%.4f%% of the model's %s; F32 %s, AdamW state 2x that)\n", st,
            100.0 * (double)total / (double)llama_param_count(&m), sp, sb);
    print_lora_comparison(out, &a->spec, &m, a->rank, total);
    print_layout(out, a);
    adapter_free(a);
    return MOSFT_OK;
}
