// model.c: loading a HF LLaMA checkpoint into the CPU backend's frozen base (see model.h).
//
// Tensor by tensor: each stored tensor is checked against the shape config.json implies, converted
// to fp32 (and rounded to bf16 in NF4 mode, as HF loads with torch_dtype=bfloat16), and each linear is
// quantized right away, so at most one fp32 linear is alive beside the model being built.
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/dtype.h"
#include "core/model.h"
#include "core/nf4.h"
#include "core/safetensors.h"

// Where a missing tensor should have been: the index file, the single file, or the folder.
static const char *set_where(const st_set *s) { return s->n_files == 1 ? s->files[0].path : s->dir; }

static int is_float_dtype(mosft_dtype t) { return t == MOSFT_F32 || t == MOSFT_BF16 || t == MOSFT_F16 || t == MOSFT_F64; }

int llama_quantization_parse(const char *quantization, int *nf4) {
    if (!strcmp(quantization, "nf4"))
        *nf4 = 1;
    else if (!strcmp(quantization, "none"))
        *nf4 = 0;
    else
        return mosft_fail(MOSFT_ERR_INPUT, "model.quantization: expected \"nf4\" or \"none\", got \"%s\"", quantization);
    return MOSFT_OK;
}

int llama_find_float_tensor(const st_set *s, const char *name, int ndim, const int64_t *shape, const st_tensor **out) {
    *out = NULL;
    char want[64], got[128];
    st_shape_str(want, sizeof want, ndim, shape);
    const st_file *f = NULL;
    const st_tensor *t = st_set_find(s, name, &f);
    if (!t)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected a tensor of shape %s (from config.json), got nothing",
                          set_where(s), name, want);
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (!ok) {
        st_shape_str(got, sizeof got, t->ndim, t->shape);
        return mosft_fail_hint(MOSFT_ERR_INPUT, "does config.json belong to these weights?",
                               "%s: %s: expected shape %s (from config.json), got %s", f->path, name, want, got);
    }
    if (!is_float_dtype(t->dtype))
        return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected a float tensor (F32, BF16, F16), got %s", f->path, name,
                          dtype_name(t->dtype));
    *out = t;
    return MOSFT_OK;
}

// The stored tensor `name` with exactly `shape`, as a new fp32 array; bf16-rounded when `round_bf16`.
static int load_f32(const st_set *s, const char *name, int ndim, const int64_t *shape, int round_bf16, float **out) {
    *out = NULL;
    const st_tensor *t;
    int rc = llama_find_float_tensor(s, name, ndim, shape, &t);
    if (rc) return rc;
    float *w = xmalloc(sizeof(float) * (size_t)t->numel);
    st_tensor_to_f32(t, w);
    if (round_bf16)
        for (int64_t i = 0; i < t->numel; i++) w[i] = bf16_round(w[i]);
    *out = w;
    return MOSFT_OK;
}

// One linear: a pre-quantized bnb-4bit weight as it is, else the stored float weight (quantized in
// NF4 mode, kept in fp32 otherwise).
static int load_linear(const st_set *s, const char *name, int d_in, int d_out, int nf4, int double_quant,
                       base_linear *l) {
    memset(l, 0, sizeof *l);
    l->d_in = d_in;
    l->d_out = d_out;
    int found = 0;
    int rc = nf4_read_bnb(s, name, &l->q, &found);
    if (rc) return rc;
    if (found) {
        if (l->q.rows != d_out || l->q.cols != d_in) {
            const st_file *f = NULL;
            char sn[320];
            snprintf(sn, sizeof sn, "%s.quant_state.bitsandbytes__nf4", name);
            st_set_find(s, sn, &f);
            rc = mosft_fail_hint(MOSFT_ERR_INPUT, "does config.json belong to these weights?",
                                 "%s: %s: expected shape [%d, %d] (from config.json), got [%lld, %lld]",
                                 f ? f->path : set_where(s), name, d_out, d_in, (long long)l->q.rows,
                                 (long long)l->q.cols);
            nf4_free(&l->q);
            return rc;
        }
        if (nf4) {
            l->quantized = 1;
        } else {  // "none" asked of a 4-bit checkpoint: the best there is, its bf16 dequantization
            l->w = xmalloc(sizeof(float) * (size_t)d_in * (size_t)d_out);
            base_linear_weight(&(base_linear){.d_in = d_in, .d_out = d_out, .q = l->q, .quantized = 1}, l->w);
            nf4_free(&l->q);
        }
        return MOSFT_OK;
    }
    int64_t shape[2] = {d_out, d_in};
    float *w;
    if ((rc = load_f32(s, name, 2, shape, nf4, &w))) return rc;
    if (nf4) {
        nf4_quantize(w, d_out, d_in, double_quant, &l->q);
        l->quantized = 1;
        free(w);
    } else {
        l->w = w;
    }
    return MOSFT_OK;
}

int llama_model_load(llama_model *m, const char *dir, const char *quantization, int double_quant) {
    memset(m, 0, sizeof *m);
    int nf4;
    int rc = llama_quantization_parse(quantization, &nf4);
    if (rc) return rc;
    if ((rc = llama_config_load(&m->cfg, dir))) return rc;
    st_set s;
    if ((rc = st_set_open(&s, dir))) {
        st_set_close(&s);
        return rc;
    }
    double t0 = mosft_now();
    const llama_config *c = &m->cfg;
    int64_t emb_shape[2] = {c->vocab, c->hidden}, norm_shape[1] = {c->hidden};
    m->quantized = nf4;
    char name[256];
    if ((rc = load_f32(&s, "model.embed_tokens.weight", 2, emb_shape, nf4, &m->embed))) goto fail;
    m->layers = xcalloc((size_t)c->n_layers, sizeof(llama_layer));
    for (int i = 0; i < c->n_layers; i++) {
        llama_layer *L = &m->layers[i];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", i);
        if ((rc = load_f32(&s, name, 1, norm_shape, nf4, &L->attn_norm))) goto fail;
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", i);
        if ((rc = load_f32(&s, name, 1, norm_shape, nf4, &L->mlp_norm))) goto fail;
        for (int mod = 0; mod < MOD_COUNT; mod++) {
            int d_in, d_out;
            llama_module_dims(c, mod, &d_in, &d_out);
            llama_linear_name(name, sizeof name, i, mod);
            if ((rc = load_linear(&s, name, d_in, d_out, nf4, double_quant, &L->lin[mod]))) goto fail;
        }
    }
    // A checkpoint deeper than its config would silently lose layers.
    snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", c->n_layers);
    if (st_set_find(&s, name, NULL)) {
        rc = mosft_fail_hint(MOSFT_ERR_INPUT, "does config.json belong to these weights?",
                             "%s: %s: expected %d layers (num_hidden_layers in config.json), got a tensor of layer %d",
                             set_where(&s), name, c->n_layers, c->n_layers);
        goto fail;
    }
    if ((rc = load_f32(&s, "model.norm.weight", 1, norm_shape, nf4, &m->final_norm))) goto fail;
    // Tied embeddings: HF uses embed_tokens as the output projection (a stored lm_head is ignored).
    if (c->tie_embeddings) {
        m->lm_head = m->embed;
    } else if ((rc = load_f32(&s, "lm_head.weight", 2, emb_shape, nf4, &m->lm_head))) {
        goto fail;
    }
    mosft_logv("loaded %s (%s) in %.1f s", dir, nf4 ? "NF4" : "fp32", mosft_now() - t0);
    st_set_close(&s);
    return MOSFT_OK;
fail:
    st_set_close(&s);
    llama_model_free(m);
    return rc;
}

void llama_model_free(llama_model *m) {
    if (!m) return;
    if (m->lm_head != m->embed) free(m->lm_head);
    free(m->embed);
    free(m->final_norm);
    if (m->layers) {
        for (int i = 0; i < m->cfg.n_layers; i++) {
            llama_layer *L = &m->layers[i];
            free(L->attn_norm);
            free(L->mlp_norm);
            for (int mod = 0; mod < MOD_COUNT; mod++) {
                free(L->lin[mod].w);
                nf4_free(&L->lin[mod].q);
            }
        }
        free(m->layers);
    }
    memset(m, 0, sizeof *m);
}

// An NF4 weight as the frozen base of QLoRA sees it: bitsandbytes dequantizes to the compute dtype
// (bf16) before the matmul, so the values are code * absmax rounded to bf16.
void base_linear_weight(const base_linear *l, float *out) {
    size_t n = (size_t)l->d_in * (size_t)l->d_out;
    if (!l->quantized) {
        memcpy(out, l->w, sizeof(float) * n);
        return;
    }
    nf4_dequantize(&l->q, out);
    for (size_t i = 0; i < n; i++) out[i] = bf16_round(out[i]);
}
