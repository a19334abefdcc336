// model_cuda.cu: the frozen base on the device: a HF folder loaded tensor by tensor (quantized to NF4
// on the device, or read pre-quantized from bnb-4bit files), or random weights at a config's shapes
// generated on the device (benchmarks without 13 GB files).
//
// The values match the CPU loader (core/model.c): in NF4 mode every weight is first rounded to bf16
// (HF loads with torch_dtype=bfloat16), linears are quantized bit-identically to core/nf4.c, norms
// stay fp32 (bf16-rounded); embeddings and lm_head are bf16 on the device (exactly the CPU's
// bf16-rounded values in NF4 mode). In "none" mode linears are bf16 (the CPU keeps fp32).
#include <stdlib.h>
#include <string.h>

#include "core/nf4.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "cuda/backend_cuda.cuh"

// Row offset of module `mod` inside its fused weight group, and the group.
static void module_slot(const llama_config *c, int mod, int *grp, int64_t *row0) {
    int64_t Q = (int64_t)c->n_heads * c->head_dim, KV = (int64_t)c->n_kv_heads * c->head_dim;
    switch (mod) {
    case MOD_Q: *grp = GRP_QKV; *row0 = 0; break;
    case MOD_K: *grp = GRP_QKV; *row0 = Q; break;
    case MOD_V: *grp = GRP_QKV; *row0 = Q + KV; break;
    case MOD_O: *grp = GRP_O; *row0 = 0; break;
    case MOD_GATE: *grp = GRP_GU; *row0 = 0; break;
    case MOD_UP: *grp = GRP_GU; *row0 = c->intermediate; break;
    default: *grp = GRP_DOWN; *row0 = 0; break;
    }
}

// Elements of a bf16 group buffer: [d_out + Rp][d_in + Rp] (the adapter's blocks beside the weight).
static int64_t group_numel(const cuda_model *m, int grp) {
    int di, dout;
    cuda_group_dims(&m->cfg, grp, &di, &dout);
    return (int64_t)(dout + m->Rp[grp]) * (di + m->Rp[grp]);
}
static int64_t group_ld(const cuda_model *m, int grp) {
    int di, dout;
    cuda_group_dims(&m->cfg, grp, &di, &dout);
    return di + m->Rp[grp];
}

size_t cuda_model_bytes(const cuda_model *m, int nf4, int double_quant, const int *dq_of) {
    const llama_config *c = &m->cfg;
    size_t b = cuda_align((size_t)c->vocab * c->hidden * 2);
    if (!c->tie_embeddings) b += cuda_align((size_t)c->vocab * c->hidden * 2);
    b += (size_t)(2 * c->n_layers + 1) * cuda_align(sizeof(float) * (size_t)c->hidden);
    for (int l = 0; l < c->n_layers; l++) {
        if (nf4) {
            for (int m = 0; m < MOD_COUNT; m++) {
                int di, dout;
                llama_module_dims(c, m, &di, &dout);
                b += nf4_cuda_bytes((int64_t)di * dout, dq_of ? dq_of[l * MOD_COUNT + m] : double_quant);
            }
        } else {
            for (int g = 0; g < GRP_COUNT; g++) b += cuda_align((size_t)group_numel(m, g) * 2);
        }
    }
    return b;
}

static void alloc_model(cuda_model *m, int nf4, int double_quant, const int *dq_of, cuda_arena *ar) {
    const llama_config *c = &m->cfg;
    m->nf4 = nf4;
    m->embed = (bf16 *)cuda_arena_alloc(ar, (size_t)c->vocab * c->hidden * 2);
    m->lm_head = c->tie_embeddings ? m->embed : (bf16 *)cuda_arena_alloc(ar, (size_t)c->vocab * c->hidden * 2);
    m->final_norm = (float *)cuda_arena_alloc(ar, sizeof(float) * (size_t)c->hidden);
    m->layers = (cuda_layer *)xcalloc((size_t)c->n_layers, sizeof(cuda_layer));
    for (int l = 0; l < c->n_layers; l++) {
        cuda_layer *L = &m->layers[l];
        L->attn_norm = (float *)cuda_arena_alloc(ar, sizeof(float) * (size_t)c->hidden);
        L->mlp_norm = (float *)cuda_arena_alloc(ar, sizeof(float) * (size_t)c->hidden);
        if (nf4) {
            for (int mod = 0; mod < MOD_COUNT; mod++) {
                int di, dout;
                llama_module_dims(c, mod, &di, &dout);
                int dq = dq_of ? dq_of[l * MOD_COUNT + mod] : double_quant;
                void *mem = cuda_arena_alloc(ar, nf4_cuda_bytes((int64_t)di * dout, dq));
                nf4_cuda_layout(&L->q[mod], dout, di, dq, mem);
            }
        } else {
            for (int g = 0; g < GRP_COUNT; g++) L->w[g] = (bf16 *)cuda_arena_alloc(ar, (size_t)group_numel(m, g) * 2);
        }
    }
}

static int64_t max_linear_numel(const llama_config *c) {
    int64_t mx = 0;
    for (int m = 0; m < MOD_COUNT; m++) {
        int di, dout;
        llama_module_dims(c, m, &di, &dout);
        if ((int64_t)di * dout > mx) mx = (int64_t)di * dout;
    }
    return mx;
}

// Device staging for loading: raw bytes, fp32 values, NF4 block scales.
typedef struct {
    void *raw;
    float *f32;
    float *absmax;
    int64_t cap;  // elements
} staging;

static void staging_init(staging *st, const llama_config *c) {
    st->cap = max_linear_numel(c);
    if ((int64_t)c->hidden * 64 > st->cap) st->cap = (int64_t)c->hidden * 64;
    CUDA_CHECK(cudaMalloc(&st->raw, (size_t)st->cap * 8));
    CUDA_CHECK(cudaMalloc((void **)&st->f32, (size_t)st->cap * 4));
    CUDA_CHECK(cudaMalloc((void **)&st->absmax, (size_t)(st->cap / NF4_BLOCK + 1) * 4));
}

static void staging_free(staging *st) {
    cudaFree(st->raw);
    cudaFree(st->f32);
    cudaFree(st->absmax);
}

// st->f32 [rows][cols] -> bf16 rows [row0, row0 + rows) of a group buffer (row stride d_in + Rp).
static void place_bf16(cuda_ctx *ctx, staging *st, cuda_model *m, cuda_layer *L, int grp, int64_t row0, int rows, int cols) {
    int64_t ld = group_ld(m, grp);
    f32_to_bf16_cuda(ctx, st->f32, (bf16 *)st->raw, (int64_t)rows * cols);
    CUDA_CHECK(cudaMemcpy2DAsync(L->w[grp] + row0 * ld, (size_t)ld * 2, st->raw, (size_t)cols * 2, (size_t)cols * 2,
                                 (size_t)rows, cudaMemcpyDeviceToDevice, ctx->stream));
}

void cuda_model_dequantize(cuda_ctx *ctx, cuda_model *dst, const cuda_model *src, cuda_arena *ar) {
    const llama_config *c = &dst->cfg;
    MOSFT_ASSERT(src->nf4);
    alloc_model(dst, 0, 0, NULL, ar);
    size_t emb = (size_t)c->vocab * c->hidden * 2, nrm = sizeof(float) * (size_t)c->hidden;
    CUDA_CHECK(cudaMemcpyAsync(dst->embed, src->embed, emb, cudaMemcpyDeviceToDevice, ctx->stream));
    if (!c->tie_embeddings)
        CUDA_CHECK(cudaMemcpyAsync(dst->lm_head, src->lm_head, emb, cudaMemcpyDeviceToDevice, ctx->stream));
    CUDA_CHECK(cudaMemcpyAsync(dst->final_norm, src->final_norm, nrm, cudaMemcpyDeviceToDevice, ctx->stream));
    for (int l = 0; l < c->n_layers; l++) {
        cuda_layer *D = &dst->layers[l];
        const cuda_layer *S = &src->layers[l];
        CUDA_CHECK(cudaMemcpyAsync(D->attn_norm, S->attn_norm, nrm, cudaMemcpyDeviceToDevice, ctx->stream));
        CUDA_CHECK(cudaMemcpyAsync(D->mlp_norm, S->mlp_norm, nrm, cudaMemcpyDeviceToDevice, ctx->stream));
        for (int mod = 0; mod < MOD_COUNT; mod++) {
            int grp;
            int64_t row0, ld;
            module_slot(c, mod, &grp, &row0);
            ld = group_ld(dst, grp);
            nf4_dequantize_cuda(ctx, &S->q[mod], D->w[grp] + row0 * ld, ld);
        }
    }
    CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
}

// ---- loading a HF folder ------------------------------------------------------------------------

static const char *set_where(const st_set *s) { return s->n_files == 1 ? s->files[0].path : s->dir; }

// Elements [e0, e0 + n) of a stored float tensor into dst (device fp32), optionally bf16-rounded.
static void upload_f32(cuda_ctx *ctx, staging *st, const st_tensor *t, int64_t e0, int64_t n, float *dst, int round) {
    MOSFT_ASSERT(n <= st->cap);
    if (t->dtype == MOSFT_F64) {  // rare: convert on the host
        float *h = (float *)xmalloc(sizeof(float) * (size_t)n);
        dtype_to_f32(MOSFT_F64, (const char *)t->data + e0 * 8, h, (size_t)n);
        if (round)
            for (int64_t i = 0; i < n; i++) h[i] = bf16_round(h[i]);
        CUDA_CHECK(cudaMemcpyAsync(dst, h, sizeof(float) * (size_t)n, cudaMemcpyHostToDevice, ctx->stream));
        free(h);
        return;
    }
    size_t es = dtype_size(t->dtype);
    CUDA_CHECK(cudaMemcpyAsync(st->raw, (const char *)t->data + e0 * (int64_t)es, es * (size_t)n, cudaMemcpyHostToDevice, ctx->stream));
    convert_to_f32_cuda(ctx, st->raw, t->dtype, n, dst, round);
}

// A [rows][cols] float tensor into bf16 on the device, in chunks that fit the staging buffers.
static void upload_bf16(cuda_ctx *ctx, staging *st, const st_tensor *t, bf16 *dst) {
    for (int64_t e0 = 0; e0 < t->numel; e0 += st->cap) {
        int64_t n = t->numel - e0 < st->cap ? t->numel - e0 : st->cap;
        upload_f32(ctx, st, t, e0, n, st->f32, 0);
        f32_to_bf16_cuda(ctx, st->f32, dst + e0, n);
    }
}

int cuda_model_scan(const char *dir, const llama_config *c, int double_quant, int *dq_of) {
    st_set s;
    int rc = st_set_open(&s, dir);
    if (rc) {
        st_set_close(&s);
        return rc;
    }
    char name[256], key[320];
    for (int l = 0; l < c->n_layers; l++)
        for (int m = 0; m < MOD_COUNT; m++) {
            llama_linear_name(name, sizeof name, l, m);
            snprintf(key, sizeof key, "%s.quant_state.bitsandbytes__nf4", name);
            int dq = double_quant;
            if (st_set_find(&s, key, NULL)) {
                snprintf(key, sizeof key, "%s.nested_absmax", name);
                dq = st_set_find(&s, key, NULL) != NULL;
            }
            dq_of[l * MOD_COUNT + m] = dq;
        }
    st_set_close(&s);
    return MOSFT_OK;
}

static int load_linear(cuda_ctx *ctx, cuda_model *m, staging *st, const st_set *s, int l, int mod) {
    const llama_config *c = &m->cfg;
    cuda_layer *L = &m->layers[l];
    int di, dout;
    llama_module_dims(c, mod, &di, &dout);
    char name[256];
    llama_linear_name(name, sizeof name, l, mod);
    int grp;
    int64_t row0;
    module_slot(c, mod, &grp, &row0);
    nf4_tensor ht;
    int found = 0;
    int rc = nf4_read_bnb(s, name, &ht, &found);
    if (rc) return rc;
    if (found) {
        if (ht.rows != dout || ht.cols != di) {
            rc = mosft_fail_hint(MOSFT_ERR_INPUT, "does config.json belong to these weights?",
                                 "%s: %s: expected shape [%d, %d] (from config.json), got [%lld, %lld]", set_where(s), name,
                                 dout, di, (long long)ht.rows, (long long)ht.cols);
            nf4_free(&ht);
            return rc;
        }
        if (m->nf4) {
            MOSFT_ASSERT(L->q[mod].double_quant == ht.double_quant);  // cuda_model_scan planned it
            nf4_upload_cuda(ctx, &L->q[mod], &ht);
        } else {  // "none" of a 4-bit checkpoint: its bf16 dequantization, as the CPU loader
            void *tmp;
            CUDA_CHECK(cudaMalloc(&tmp, nf4_cuda_bytes(ht.numel, ht.double_quant)));
            nf4_cuda_tensor dt;
            nf4_cuda_layout(&dt, dout, di, ht.double_quant, tmp);
            nf4_upload_cuda(ctx, &dt, &ht);
            nf4_dequantize_cuda(ctx, &dt, L->w[grp] + row0 * group_ld(m, grp), group_ld(m, grp));
            CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
            cudaFree(tmp);
        }
        nf4_free(&ht);
        return MOSFT_OK;
    }
    int64_t shape[2] = {dout, di};
    const st_tensor *t;
    if ((rc = llama_find_float_tensor(s, name, 2, shape, &t))) return rc;
    upload_f32(ctx, st, t, 0, t->numel, st->f32, m->nf4);
    if (m->nf4)
        nf4_quantize_cuda(ctx, &L->q[mod], st->f32, st->absmax);
    else
        place_bf16(ctx, st, m, L, grp, row0, dout, di);
    return MOSFT_OK;
}

int cuda_model_load(cuda_ctx *ctx, cuda_model *m, const char *dir, int nf4, int double_quant, cuda_arena *ar) {
    st_set s;
    int rc = st_set_open(&s, dir);
    if (rc) {
        st_set_close(&s);
        return rc;
    }
    const llama_config *c = &m->cfg;
    int *dq_of = (int *)xmalloc(sizeof(int) * (size_t)c->n_layers * MOD_COUNT);
    if ((rc = cuda_model_scan(dir, c, double_quant, dq_of))) {
        free(dq_of);
        st_set_close(&s);
        return rc;
    }
    alloc_model(m, nf4, double_quant, dq_of, ar);
    free(dq_of);
    staging st;
    staging_init(&st, c);
    double t0 = mosft_now();
    int64_t emb_shape[2] = {c->vocab, c->hidden}, norm_shape[1] = {c->hidden};
    const st_tensor *t;
    char name[256];
    if ((rc = llama_find_float_tensor(&s, "model.embed_tokens.weight", 2, emb_shape, &t))) goto out;
    upload_bf16(ctx, &st, t, m->embed);
    for (int l = 0; l < c->n_layers; l++) {
        cuda_layer *L = &m->layers[l];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        if ((rc = llama_find_float_tensor(&s, name, 1, norm_shape, &t))) goto out;
        upload_f32(ctx, &st, t, 0, c->hidden, L->attn_norm, nf4);
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        if ((rc = llama_find_float_tensor(&s, name, 1, norm_shape, &t))) goto out;
        upload_f32(ctx, &st, t, 0, c->hidden, L->mlp_norm, nf4);
        for (int mod = 0; mod < MOD_COUNT; mod++)
            if ((rc = load_linear(ctx, m, &st, &s, l, mod))) goto out;
        CUDA_CHECK(cudaStreamSynchronize(ctx->stream));  // the staging buffers are reused
    }
    snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", c->n_layers);
    if (st_set_find(&s, name, NULL)) {
        rc = mosft_fail_hint(MOSFT_ERR_INPUT, "does config.json belong to these weights?",
                             "%s: %s: expected %d layers (num_hidden_layers in config.json), got a tensor of layer %d",
                             set_where(&s), name, c->n_layers, c->n_layers);
        goto out;
    }
    if ((rc = llama_find_float_tensor(&s, "model.norm.weight", 1, norm_shape, &t))) goto out;
    upload_f32(ctx, &st, t, 0, c->hidden, m->final_norm, nf4);
    if (!c->tie_embeddings) {
        if ((rc = llama_find_float_tensor(&s, "lm_head.weight", 2, emb_shape, &t))) goto out;
        upload_bf16(ctx, &st, t, m->lm_head);
    }
    CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
    mosft_logv("loaded %s onto the GPU (%s) in %.1f s", dir, nf4 ? "NF4" : "bf16", mosft_now() - t0);
out:
    CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
    staging_free(&st);
    st_set_close(&s);
    return rc;
}

// ---- random weights -----------------------------------------------------------------------------

int cuda_model_random(cuda_ctx *ctx, cuda_model *m, const llama_config *cfg, int nf4, int double_quant,
                                 uint64_t seed, cuda_arena *ar) {
    m->cfg = *cfg;
    const llama_config *c = &m->cfg;
    alloc_model(m, nf4, double_quant, NULL, ar);
    staging st;
    staging_init(&st, c);
    int64_t ne = (int64_t)c->vocab * c->hidden;
    for (int64_t e0 = 0; e0 < ne; e0 += st.cap) {  // embedding ~ N(0, 0.02^2)
        int64_t n = ne - e0 < st.cap ? ne - e0 : st.cap;
        fill_normal_f32_cuda(ctx, st.f32, n, rng_key(RNG_INIT, seed, 9000, (uint64_t)e0, 0), 0.02f);
        f32_to_bf16_cuda(ctx, st.f32, m->embed + e0, n);
        if (!c->tie_embeddings) {
            fill_normal_f32_cuda(ctx, st.f32, n, rng_key(RNG_INIT, seed, 9001, (uint64_t)e0, 0), 0.02f);
            f32_to_bf16_cuda(ctx, st.f32, m->lm_head + e0, n);
        }
    }
    float *ones = (float *)xmalloc(sizeof(float) * (size_t)c->hidden);
    for (int i = 0; i < c->hidden; i++) ones[i] = 1.0f;
    CUDA_CHECK(cudaMemcpyAsync(m->final_norm, ones, sizeof(float) * (size_t)c->hidden, cudaMemcpyHostToDevice, ctx->stream));
    for (int l = 0; l < c->n_layers; l++) {
        cuda_layer *L = &m->layers[l];
        CUDA_CHECK(cudaMemcpyAsync(L->attn_norm, ones, sizeof(float) * (size_t)c->hidden, cudaMemcpyHostToDevice, ctx->stream));
        CUDA_CHECK(cudaMemcpyAsync(L->mlp_norm, ones, sizeof(float) * (size_t)c->hidden, cudaMemcpyHostToDevice, ctx->stream));
        for (int mod = 0; mod < MOD_COUNT; mod++) {
            int di, dout, grp;
            int64_t row0;
            llama_module_dims(c, mod, &di, &dout);
            module_slot(c, mod, &grp, &row0);
            int64_t n = (int64_t)di * dout;
            fill_normal_f32_cuda(ctx, st.f32, n, rng_key(RNG_INIT, seed, 9100 + (uint64_t)mod, (uint64_t)l, 0), 0.02f);
            if (nf4) {
                convert_to_f32_cuda(ctx, st.f32, MOSFT_F32, n, st.f32, 1);
                nf4_quantize_cuda(ctx, &L->q[mod], st.f32, st.absmax);
            } else {
                place_bf16(ctx, &st, m, L, grp, row0, dout, di);
            }
        }
    }
    free(ones);
    CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
    staging_free(&st);
    return MOSFT_OK;
}
