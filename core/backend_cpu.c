// backend_cpu.c: the CPU reference backend: the whole LLaMA training step in plain fp32 C, built from
// the per-op kernels of core/ops_cpu.h. Every other backend is held to this one.
//
// One micro-batch (B sequences of S tokens, T = B*S rows):
//   x = embed(ids)
//   per layer l:  h1 = rmsnorm(x); q,k,v = lin(h1); rope(q,k); att = attention(q,k,v)
//                 x = x + lin_o(att); h2 = rmsnorm(x); a = silu(lin_g(h2)) * lin_u(h2); x = x + lin_d(a)
//   loss = CE(lm_head(rmsnorm(x)), labels shifted by one)
// where lin_t(in) = in W_t^T (frozen base, NF4 dequantized or fp32) + adapter_t(in).
// Backward computes input gradients through every op (no gradient for frozen weights) and the
// adapter's gradients into one buffer. Recompute: "none" keeps every layer's activations; "full" (and
// "partial", the same on CPU) keeps only each layer's input and recomputes the layer in backward,
// with the same dropout masks (they are a function of the step, micro-batch, layer and module).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
#include "core/backend.h"
#include "core/common.h"
#include "core/ops_cpu.h"
#include "core/rng.h"

// Activations of one layer for one micro-batch.
typedef struct {
    float *x_in;   // [T][C] layer input (residual stream)
    float *h1;     // [T][C] input_layernorm(x_in)
    float *rstd1;  // [T]
    float *q;      // [T][Hq*D] after rope
    float *k;      // [T][Hkv*D] after rope
    float *v;      // [T][Hkv*D]
    float *att;    // [T][Hq*D] attention output (input of o_proj)
    float *x_mid;  // [T][C] x_in + o
    float *h2;     // [T][C] post_attention_layernorm(x_mid)
    float *rstd2;  // [T]
    float *g;      // [T][I] gate
    float *u;      // [T][I] up
    float *a;      // [T][I] silu(g) * u (input of down_proj)
} layer_acts;

typedef struct {
    const llama_model *m;
    int T_cap;          // activations are sized for this many rows
    layer_acts *acts;   // [L] (recompute none) or [1] + saved inputs (full)
    float **x_saved;    // [L] layer inputs [T][C] (recompute full)
    int full_recompute;
    float *x_final;     // [T][C] last layer output
    float *xf;          // [T][C] final norm output
    float *rstd_f;      // [T]
    float *gx, *gtmp;   // [T][C] gradients of the residual stream
    float *gbig1, *gbig2, *gbig3;  // [T][max(Hq*D, I)] scratch gradients
    float *gq, *gk, *gv;           // [T][Hq*D], [T][Hkv*D], [T][Hkv*D]
    float *mask;        // [T][max d_in] dropout multipliers
    float *ad_tmp;      // [T][max d_out] routed adapters: gxd scratch
    int32_t *pos;       // [T]
    int32_t *targets;   // [T]
    float *wbuf;        // [max d_out * d_in] dequantized weight
    float *inv_freq;    // [D/2]
    // adapter factors, rebuilt when the parameters change
    float **A_all, **B_all;  // [L*MOD]: A [r][d_in], B [d_out][r] of each adapted (layer, module)
    float *gA, *gB;     // [r][max d_in], [max d_out][r]
    int built;          // factors match the current params
    float *grad;        // [n_params]
    float *mom1, *mom2; // [n_params]
    float *logits_out;  // [T][V] when a caller asks for logits (forward_logits), else NULL
    const int32_t *tok_mask;  // [T] the current micro-batch's attention mask (routed adapters skip padding)
} cpu_impl;

static float **factor_A(cpu_impl *c, int l, int m) { return &c->A_all[l * MOD_COUNT + m]; }
static float **factor_B(cpu_impl *c, int l, int m) { return &c->B_all[l * MOD_COUNT + m]; }

static int max_width(const llama_config *cfg) {
    int w = cfg->hidden;
    if (cfg->intermediate > w) w = cfg->intermediate;
    if (cfg->n_heads * cfg->head_dim > w) w = cfg->n_heads * cfg->head_dim;
    return w;
}

static void acts_alloc(layer_acts *a, int64_t T, const llama_config *cfg, int with_input) {
    int64_t C = cfg->hidden, Q = (int64_t)cfg->n_heads * cfg->head_dim, KV = (int64_t)cfg->n_kv_heads * cfg->head_dim,
            I = cfg->intermediate;
    a->x_in = with_input ? xmalloc(sizeof(float) * T * C) : NULL;
    a->h1 = xmalloc(sizeof(float) * T * C);
    a->rstd1 = xmalloc(sizeof(float) * T);
    a->q = xmalloc(sizeof(float) * T * Q);
    a->k = xmalloc(sizeof(float) * T * KV);
    a->v = xmalloc(sizeof(float) * T * KV);
    a->att = xmalloc(sizeof(float) * T * Q);
    a->x_mid = xmalloc(sizeof(float) * T * C);
    a->h2 = xmalloc(sizeof(float) * T * C);
    a->rstd2 = xmalloc(sizeof(float) * T);
    a->g = xmalloc(sizeof(float) * T * I);
    a->u = xmalloc(sizeof(float) * T * I);
    a->a = xmalloc(sizeof(float) * T * I);
}

static void acts_free(layer_acts *a) {
    free(a->x_in);
    free(a->h1);
    free(a->rstd1);
    free(a->q);
    free(a->k);
    free(a->v);
    free(a->att);
    free(a->x_mid);
    free(a->h2);
    free(a->rstd2);
    free(a->g);
    free(a->u);
    free(a->a);
    memset(a, 0, sizeof *a);
}

static void free_activations(cpu_impl *c) {
    int L = c->m->cfg.n_layers;
    if (c->acts) {
        int n = c->full_recompute ? 1 : L;
        for (int l = 0; l < n; l++) acts_free(&c->acts[l]);
        free(c->acts);
        c->acts = NULL;
    }
    if (c->x_saved) {
        for (int l = 0; l < L; l++) free(c->x_saved[l]);
        free(c->x_saved);
        c->x_saved = NULL;
    }
    free(c->x_final);
    free(c->xf);
    free(c->rstd_f);
    free(c->gx);
    free(c->gtmp);
    free(c->gbig1);
    free(c->gbig2);
    free(c->gbig3);
    free(c->gq);
    free(c->gk);
    free(c->gv);
    free(c->mask);
    free(c->ad_tmp);
    free(c->pos);
    free(c->targets);
    c->x_final = c->xf = c->rstd_f = c->gx = c->gtmp = c->gbig1 = c->gbig2 = c->gbig3 = NULL;
    c->gq = c->gk = c->gv = c->mask = c->ad_tmp = NULL;
    c->pos = c->targets = NULL;
    c->T_cap = 0;
}

static void ensure_activations(cpu_impl *c, int64_t T) {
    if (T <= c->T_cap) return;
    free_activations(c);
    const llama_config *cfg = &c->m->cfg;
    int L = cfg->n_layers;
    int64_t C = cfg->hidden, W = max_width(cfg), KV = (int64_t)cfg->n_kv_heads * cfg->head_dim,
            Q = (int64_t)cfg->n_heads * cfg->head_dim;
    if (c->full_recompute) {
        c->acts = xcalloc(1, sizeof(layer_acts));
        acts_alloc(&c->acts[0], T, cfg, 0);
        c->x_saved = xcalloc((size_t)L, sizeof(float *));
        for (int l = 0; l < L; l++) c->x_saved[l] = xmalloc(sizeof(float) * T * C);
    } else {
        c->acts = xcalloc((size_t)L, sizeof(layer_acts));
        for (int l = 0; l < L; l++) acts_alloc(&c->acts[l], T, cfg, 1);
    }
    c->x_final = xmalloc(sizeof(float) * T * C);
    c->xf = xmalloc(sizeof(float) * T * C);
    c->rstd_f = xmalloc(sizeof(float) * T);
    c->gx = xmalloc(sizeof(float) * T * C);
    c->gtmp = xmalloc(sizeof(float) * T * C);
    c->gbig1 = xmalloc(sizeof(float) * T * W);
    c->gbig2 = xmalloc(sizeof(float) * T * W);
    c->gbig3 = xmalloc(sizeof(float) * T * W);
    c->gq = xmalloc(sizeof(float) * T * Q);
    c->gk = xmalloc(sizeof(float) * T * KV);
    c->gv = xmalloc(sizeof(float) * T * KV);
    c->mask = xmalloc(sizeof(float) * T * W);
    c->ad_tmp = xmalloc(sizeof(float) * T * W);
    c->pos = xmalloc(sizeof(int32_t) * T);
    c->targets = xmalloc(sizeof(int32_t) * T);
    c->T_cap = (int)T;
}

// ---- adapters ------------------------------------------------------------------------------------

static void build_factors(backend *be) {
    cpu_impl *c = be->impl;
    adapter *ad = be->ad;
    if (c->built || ad->ops->routed) return;
    const llama_config *cfg = &c->m->cfg;
    for (int l = 0; l < cfg->n_layers; l++)
        for (int m = 0; m < MOD_COUNT; m++)
            if (adapter_targets(ad, m)) ad->ops->build(ad, l, m, *factor_A(c, l, m), *factor_B(c, l, m));
    c->built = 1;
}

static uint64_t dropout_key(const dropout_ctx *dc, int l, int m) {
    return rng_key(RNG_DROPOUT, dc->seed, (uint64_t)dc->step, (uint64_t)dc->micro, (uint64_t)(l * 8 + m));
}

// The dropout multipliers of (l, m) for this micro-batch into c->mask, or NULL (no dropout).
static const float *dropout_mask(backend *be, const dropout_ctx *dc, int l, int m, int64_t T, int d_in) {
    if (!dc || be->dropout <= 0.0f) return NULL;
    cpu_impl *c = be->impl;
    adapter_dropout_mask(dropout_key(dc, l, m), be->dropout, (size_t)(T * d_in), c->mask);
    return c->mask;
}

// y[T][d_out] (+)= in[T][d_in] W^T + adapter(in)
static void linear_forward(backend *be, int l, int m, const float *in, float *y, int64_t T, const dropout_ctx *dc,
                           int accumulate) {
    cpu_impl *c = be->impl;
    const base_linear *bl = &c->m->layers[l].lin[m];
    const float *W = bl->w;
    if (bl->quantized) {
        base_linear_weight(bl, c->wbuf);
        W = c->wbuf;
    }
    matmul_forward_cpu(y, in, W, T, bl->d_in, bl->d_out, accumulate);
    adapter *ad = be->ad;
    if (!adapter_targets(ad, m)) return;
    const float *mask = dropout_mask(be, dc, l, m, T, bl->d_in);
    if (!ad->ops->routed) {
        adapter_lowrank_forward_cpu(T, bl->d_in, bl->d_out, ad->rank, ad->scaling, in, mask, *factor_A(c, l, m),
                                    *factor_B(c, l, m), y, NULL);
    } else {
        const float *xd = in;
        float *tmp = NULL;
        if (mask) {
            tmp = xmalloc(sizeof(float) * (size_t)(T * bl->d_in));
            for (int64_t i = 0; i < T * bl->d_in; i++) tmp[i] = in[i] * mask[i];
            xd = tmp;
        }
        ad->ops->forward(ad, l, m, xd, T, y, dc != NULL, dc ? dropout_key(dc, l, m) ^ 0x5157ull : 0, c->tok_mask);
        free(tmp);
    }
}

// gin[T][d_in] += gy W + adapter backward; adapter gradients into c->grad.
static void linear_backward(backend *be, int l, int m, const float *in, const float *gy, float *gin, int64_t T,
                            const dropout_ctx *dc) {
    cpu_impl *c = be->impl;
    const base_linear *bl = &c->m->layers[l].lin[m];
    const float *W = bl->w;
    if (bl->quantized) {
        base_linear_weight(bl, c->wbuf);
        W = c->wbuf;
    }
    matmul_backward_input_cpu(gin, gy, W, T, bl->d_in, bl->d_out);
    adapter *ad = be->ad;
    if (!adapter_targets(ad, m)) return;
    const float *mask = dropout_mask(be, dc, l, m, T, bl->d_in);
    if (!ad->ops->routed) {
        adapter_lowrank_backward_cpu(T, bl->d_in, bl->d_out, ad->rank, ad->scaling, in, mask, *factor_A(c, l, m),
                                     *factor_B(c, l, m), gy, gin, c->gA, c->gB);
        ad->ops->scatter(ad, l, m, c->gA, c->gB, c->grad);
    } else {
        int64_t n = T * bl->d_in;
        float *xd = xmalloc(sizeof(float) * (size_t)n);
        for (int64_t i = 0; i < n; i++) xd[i] = mask ? in[i] * mask[i] : in[i];
        memset(c->ad_tmp, 0, sizeof(float) * (size_t)n);
        ad->ops->backward(ad, l, m, xd, gy, T, c->ad_tmp, c->grad, dc != NULL, dc ? dropout_key(dc, l, m) ^ 0x5157ull : 0,
                          c->tok_mask);
        for (int64_t i = 0; i < n; i++) gin[i] += mask ? c->ad_tmp[i] * mask[i] : c->ad_tmp[i];
        free(xd);
    }
}

// ---- the model --------------------------------------------------------------------------------------

// One layer forward: x_in [T][C] -> x_out [T][C]; intermediates into `a`.
static void layer_forward(backend *be, int l, const float *x_in, float *x_out, layer_acts *a, const micro_batch *mb,
                          const dropout_ctx *dc) {
    cpu_impl *c = be->impl;
    const llama_config *cfg = &c->m->cfg;
    const llama_layer *ly = &c->m->layers[l];
    int64_t T = (int64_t)mb->B * mb->S, C = cfg->hidden;
    int Hq = cfg->n_heads, Hkv = cfg->n_kv_heads, D = cfg->head_dim;
    float eps = (float)cfg->rms_eps;
    rmsnorm_forward_cpu(a->h1, a->rstd1, x_in, ly->attn_norm, T, (int)C, eps);
    linear_forward(be, l, MOD_Q, a->h1, a->q, T, dc, 0);
    linear_forward(be, l, MOD_K, a->h1, a->k, T, dc, 0);
    linear_forward(be, l, MOD_V, a->h1, a->v, T, dc, 0);
    rope_forward_cpu(a->q, c->pos, c->inv_freq, T, Hq, D);
    rope_forward_cpu(a->k, c->pos, c->inv_freq, T, Hkv, D);
    attention_forward_cpu(a->att, a->q, a->k, a->v, mb->attn_mask, mb->B, mb->S, Hq, Hkv, D);
    memcpy(a->x_mid, x_in, sizeof(float) * (size_t)(T * C));
    linear_forward(be, l, MOD_O, a->att, a->x_mid, T, dc, 1);  // residual: x_mid = x_in + o(att)
    rmsnorm_forward_cpu(a->h2, a->rstd2, a->x_mid, ly->mlp_norm, T, (int)C, eps);
    linear_forward(be, l, MOD_GATE, a->h2, a->g, T, dc, 0);
    linear_forward(be, l, MOD_UP, a->h2, a->u, T, dc, 0);
    swiglu_forward_cpu(a->a, a->g, a->u, T * cfg->intermediate);
    if (x_out != a->x_mid) memcpy(x_out, a->x_mid, sizeof(float) * (size_t)(T * C));
    linear_forward(be, l, MOD_DOWN, a->a, x_out, T, dc, 1);  // residual: x_out = x_mid + down(a)
}

// One layer backward: c->gx holds dL/dx_out on entry and dL/dx_in on exit.
static void layer_backward(backend *be, int l, const float *x_in, layer_acts *a, const micro_batch *mb,
                           const dropout_ctx *dc) {
    cpu_impl *c = be->impl;
    const llama_config *cfg = &c->m->cfg;
    const llama_layer *ly = &c->m->layers[l];
    int64_t T = (int64_t)mb->B * mb->S, C = cfg->hidden, I = cfg->intermediate;
    int Hq = cfg->n_heads, Hkv = cfg->n_kv_heads, D = cfg->head_dim;
    int64_t Q = (int64_t)Hq * D, KV = (int64_t)Hkv * D;
    float eps = (float)cfg->rms_eps;
    // MLP: x_out = x_mid + down(silu(gate(h2)) * up(h2))
    float *ga = c->gbig1, *gg = c->gbig2, *gu = c->gbig3;
    memset(ga, 0, sizeof(float) * (size_t)(T * I));
    linear_backward(be, l, MOD_DOWN, a->a, c->gx, ga, T, dc);
    memset(gg, 0, sizeof(float) * (size_t)(T * I));
    memset(gu, 0, sizeof(float) * (size_t)(T * I));
    swiglu_backward_cpu(gg, gu, ga, a->g, a->u, T * I);
    float *gh2 = c->gtmp;
    memset(gh2, 0, sizeof(float) * (size_t)(T * C));
    linear_backward(be, l, MOD_GATE, a->h2, gg, gh2, T, dc);
    linear_backward(be, l, MOD_UP, a->h2, gu, gh2, T, dc);
    rmsnorm_backward_cpu(c->gx, gh2, a->x_mid, ly->mlp_norm, a->rstd2, T, (int)C, eps);  // gx = dL/dx_mid
    // Attention: x_mid = x_in + o(attention(rope(q(h1)), rope(k(h1)), v(h1)))
    float *gatt = c->gbig1;
    memset(gatt, 0, sizeof(float) * (size_t)(T * Q));
    linear_backward(be, l, MOD_O, a->att, c->gx, gatt, T, dc);
    memset(c->gq, 0, sizeof(float) * (size_t)(T * Q));
    memset(c->gk, 0, sizeof(float) * (size_t)(T * KV));
    memset(c->gv, 0, sizeof(float) * (size_t)(T * KV));
    attention_backward_cpu(c->gq, c->gk, c->gv, gatt, a->q, a->k, a->v, mb->attn_mask, mb->B, mb->S, Hq, Hkv, D);
    rope_backward_cpu(c->gq, c->pos, c->inv_freq, T, Hq, D);
    rope_backward_cpu(c->gk, c->pos, c->inv_freq, T, Hkv, D);
    float *gh1 = c->gtmp;
    memset(gh1, 0, sizeof(float) * (size_t)(T * C));
    linear_backward(be, l, MOD_Q, a->h1, c->gq, gh1, T, dc);
    linear_backward(be, l, MOD_K, a->h1, c->gk, gh1, T, dc);
    linear_backward(be, l, MOD_V, a->h1, c->gv, gh1, T, dc);
    rmsnorm_backward_cpu(c->gx, gh1, x_in, ly->attn_norm, a->rstd1, T, (int)C, eps);  // gx = dL/dx_in
}

static void prepare_batch(cpu_impl *c, const micro_batch *mb) {
    int64_t T = (int64_t)mb->B * mb->S;
    ensure_activations(c, T);
    for (int b = 0; b < mb->B; b++)
        for (int t = 0; t < mb->S; t++) {
            int64_t i = (int64_t)b * mb->S + t;
            c->pos[i] = t;
            c->targets[i] = t + 1 < mb->S ? mb->labels[i + 1] : OPS_IGNORE_INDEX;
        }
}

// Forward through all layers; returns the loss sum. With gradients: backward too.
static int run_step(backend *be, const micro_batch *mb, float loss_scale, const dropout_ctx *dc, int backward,
                    double *loss_sum, int64_t *n_tokens) {
    cpu_impl *c = be->impl;
    int rc = backend_check_batch(be, mb);
    if (rc) return rc;
    const llama_model *m = c->m;
    const llama_config *cfg = &m->cfg;
    int64_t T = (int64_t)mb->B * mb->S, C = cfg->hidden;
    int L = cfg->n_layers;
    prepare_batch(c, mb);
    c->tok_mask = mb->attn_mask;
    build_factors(be);
    // forward
    float *x = c->full_recompute ? c->x_saved[0] : c->acts[0].x_in;
    embedding_forward_cpu(x, mb->input_ids, m->embed, T, (int)C, cfg->vocab);
    for (int l = 0; l < L; l++) {
        layer_acts *a = c->full_recompute ? &c->acts[0] : &c->acts[l];
        const float *x_in = c->full_recompute ? c->x_saved[l] : a->x_in;
        float *x_out = l + 1 < L ? (c->full_recompute ? c->x_saved[l + 1] : c->acts[l + 1].x_in) : c->x_final;
        layer_forward(be, l, x_in, x_out, a, mb, dc);
    }
    rmsnorm_forward_cpu(c->xf, c->rstd_f, c->x_final, m->final_norm, T, (int)C, (float)cfg->rms_eps);
    float *gxf = NULL;
    if (backward) {
        gxf = c->gtmp;
        memset(gxf, 0, sizeof(float) * (size_t)(T * C));
    }
    *loss_sum = lmhead_ce_forward_backward_cpu(c->xf, m->lm_head, c->targets, T, (int)C, cfg->vocab, loss_scale, gxf,
                                               c->logits_out, n_tokens);
    if (!backward) return MOSFT_OK;
    // backward
    memset(c->gx, 0, sizeof(float) * (size_t)(T * C));
    rmsnorm_backward_cpu(c->gx, gxf, c->x_final, m->final_norm, c->rstd_f, T, (int)C, (float)cfg->rms_eps);
    for (int l = L - 1; l >= 0; l--) {
        layer_acts *a;
        const float *x_in;
        if (c->full_recompute) {
            a = &c->acts[0];
            x_in = c->x_saved[l];
            float *scratch = c->x_final;  // the layer output is not needed again: reuse its buffer
            layer_forward(be, l, x_in, scratch, a, mb, dc);
        } else {
            a = &c->acts[l];
            x_in = a->x_in;
        }
        layer_backward(be, l, x_in, a, mb, dc);
    }
    return MOSFT_OK;
}

// ---- ops table ----------------------------------------------------------------------------------------

static int cpu_forward_backward(backend *be, const micro_batch *mb, float loss_scale, const dropout_ctx *dc,
                                double *loss_sum, int64_t *n_tokens) {
    return run_step(be, mb, loss_scale, dc, 1, loss_sum, n_tokens);
}

static int cpu_forward_loss(backend *be, const micro_batch *mb, double *loss_sum, int64_t *n_tokens) {
    return run_step(be, mb, 0.0f, NULL, 0, loss_sum, n_tokens);
}

static int cpu_forward_logits(backend *be, const micro_batch *mb, float *logits) {
    cpu_impl *c = be->impl;
    double s;
    int64_t n;
    c->logits_out = logits;
    int rc = run_step(be, mb, 0.0f, NULL, 0, &s, &n);
    c->logits_out = NULL;
    return rc;
}

static double cpu_grad_norm(backend *be) {
    cpu_impl *c = be->impl;
    return sqrt(global_norm_sq_cpu(c->grad, (int64_t)be->ad->n_params));
}

static void cpu_zero_grad(backend *be) {
    cpu_impl *c = be->impl;
    memset(c->grad, 0, sizeof(float) * be->ad->n_params);
}

static void cpu_optimizer_step(backend *be, float lr, float grad_scale, int64_t t) {
    cpu_impl *c = be->impl;
    size_t n = be->ad->n_params;
    if (grad_scale != 1.0f)
        for (size_t i = 0; i < n; i++) c->grad[i] *= grad_scale;
    adamw_update_cpu(be->ad->params, c->grad, c->mom1, c->mom2, (int64_t)n, lr, be->beta1, be->beta2, be->eps,
                     be->weight_decay, t);
    c->built = 0;
    cpu_zero_grad(be);
}

static void cpu_sync_to_adapter(backend *be) { (void)be; }  // params live in the adapter

static void cpu_get_moments(backend *be, float *m, float *v) {
    cpu_impl *c = be->impl;
    memcpy(m, c->mom1, sizeof(float) * be->ad->n_params);
    memcpy(v, c->mom2, sizeof(float) * be->ad->n_params);
}

static void cpu_set_state(backend *be, const float *params, const float *m, const float *v) {
    cpu_impl *c = be->impl;
    size_t n = be->ad->n_params;
    if (params && params != be->ad->params) memcpy(be->ad->params, params, sizeof(float) * n);
    if (m) memcpy(c->mom1, m, sizeof(float) * n);
    if (v) memcpy(c->mom2, v, sizeof(float) * n);
    c->built = 0;
}

static void cpu_get_grads(backend *be, float *g) {
    cpu_impl *c = be->impl;
    memcpy(g, c->grad, sizeof(float) * be->ad->n_params);
}

static double weights_bytes(const llama_model *m) {
    const llama_config *cfg = &m->cfg;
    double b = 4.0 * (double)cfg->vocab * cfg->hidden * (cfg->tie_embeddings ? 1 : 2);
    b += 4.0 * (double)cfg->hidden * (2 * cfg->n_layers + 1);
    for (int l = 0; l < cfg->n_layers; l++)
        for (int mm = 0; mm < MOD_COUNT; mm++) {
            const base_linear *bl = &m->layers[l].lin[mm];
            b += bl->quantized ? (double)nf4_bytes(&bl->q) : 4.0 * bl->d_in * bl->d_out;
        }
    return b;
}

static void cpu_memory_plan(backend *be, int B, int S, mem_plan *p) {
    cpu_impl *c = be->impl;
    const llama_config *cfg = &c->m->cfg;
    double T = (double)B * S, C = cfg->hidden, I = cfg->intermediate, Q = (double)cfg->n_heads * cfg->head_dim,
           KV = (double)cfg->n_kv_heads * cfg->head_dim;
    double per_layer = 4.0 * T * (4 * C + 2 * Q + 2 * KV + 3 * I + 2);
    memset(p, 0, sizeof *p);
    p->weights = weights_bytes(c->m);
    double buf = 0;
    for (int i = 0; i < be->ad->n_buffers; i++) buf += (double)be->ad->buffers[i].nbytes;
    p->adapter = 16.0 * (double)be->ad->n_params + buf;
    p->activations = c->full_recompute ? 4.0 * T * C * cfg->n_layers + per_layer : per_layer * cfg->n_layers;
    double W = max_width(cfg), maxw = 0;
    for (int mm = 0; mm < MOD_COUNT; mm++) {
        int di, dout;
        llama_module_dims(cfg, mm, &di, &dout);
        if ((double)di * dout > maxw) maxw = (double)di * dout;
    }
    p->workspace = 4.0 * (maxw + T * (5 * C + 5 * W + 2 * Q + 2 * KV)) + 64.0 * 1024 * 1024;
    p->total = p->weights + p->adapter + p->activations + p->workspace;
    snprintf(p->device, sizeof p->device, "CPU (host memory, %d threads)", ops_cpu_threads());
}

static void cpu_destroy(backend *be) {
    cpu_impl *c = be->impl;
    if (c) {
        free_activations(c);
        if (c->A_all) {
            int n = c->m->cfg.n_layers * MOD_COUNT;
            for (int i = 0; i < n; i++) {
                free(c->A_all[i]);
                free(c->B_all[i]);
            }
        }
        free(c->A_all);
        free(c->B_all);
        free(c->gA);
        free(c->gB);
        free(c->grad);
        free(c->mom1);
        free(c->mom2);
        free(c->wbuf);
        free(c->inv_freq);
        free(c);
    }
    free(be);
}

static const backend_ops k_cpu_ops = {
    .name = "cpu",
    .memory_plan = cpu_memory_plan,
    .forward_backward = cpu_forward_backward,
    .forward_loss = cpu_forward_loss,
    .forward_logits = cpu_forward_logits,
    .grad_norm = cpu_grad_norm,
    .optimizer_step = cpu_optimizer_step,
    .zero_grad = cpu_zero_grad,
    .sync_to_adapter = cpu_sync_to_adapter,
    .get_moments = cpu_get_moments,
    .set_state = cpu_set_state,
    .get_grads = cpu_get_grads,
    .destroy = cpu_destroy,
};

int backend_cpu_create(backend **out, const llama_model *model, adapter *ad, const backend_opts *opt) {
    backend *be = xcalloc(1, sizeof(backend));
    cpu_impl *c = xcalloc(1, sizeof(cpu_impl));
    be->ops = &k_cpu_ops;
    be->impl = c;
    be->ad = ad;
    be->cfg = model->cfg;
    snprintf(be->recompute, sizeof be->recompute, "%s", opt->recompute ? opt->recompute : "none");
    be->dropout = (float)ad->spec.dropout;
    be->beta1 = opt->beta1;
    be->beta2 = opt->beta2;
    be->eps = opt->eps;
    be->weight_decay = opt->weight_decay;
    snprintf(be->device_name, sizeof be->device_name, "CPU");
    if (opt->threads > 0) ops_cpu_set_threads(opt->threads);
    c->m = model;
    c->full_recompute = strcmp(be->recompute, "none") != 0;
    const llama_config *cfg = &model->cfg;
    int L = cfg->n_layers, W = max_width(cfg);
    size_t maxw = 0;
    for (int m = 0; m < MOD_COUNT; m++) {
        int di, dout;
        llama_module_dims(cfg, m, &di, &dout);
        if ((size_t)di * (size_t)dout > maxw) maxw = (size_t)di * (size_t)dout;
    }
    c->wbuf = xmalloc(sizeof(float) * maxw);
    double *invd = xmalloc(sizeof(double) * (size_t)(cfg->head_dim / 2));
    llama_rope_inv_freq(cfg, invd);
    c->inv_freq = xmalloc(sizeof(float) * (size_t)(cfg->head_dim / 2));
    for (int i = 0; i < cfg->head_dim / 2; i++) c->inv_freq[i] = (float)invd[i];
    free(invd);
    c->A_all = xcalloc((size_t)(L * MOD_COUNT), sizeof(float *));
    c->B_all = xcalloc((size_t)(L * MOD_COUNT), sizeof(float *));
    if (!ad->ops->routed) {
        int r = ad->rank;
        for (int l = 0; l < L; l++)
            for (int m = 0; m < MOD_COUNT; m++) {
                if (!adapter_targets(ad, m)) continue;
                int di, dout;
                llama_module_dims(cfg, m, &di, &dout);
                *factor_A(c, l, m) = xmalloc(sizeof(float) * (size_t)r * (size_t)di);
                *factor_B(c, l, m) = xmalloc(sizeof(float) * (size_t)dout * (size_t)r);
            }
        c->gA = xmalloc(sizeof(float) * (size_t)r * (size_t)W);
        c->gB = xmalloc(sizeof(float) * (size_t)W * (size_t)r);
    }
    c->grad = xcalloc(ad->n_params, sizeof(float));
    c->mom1 = xcalloc(ad->n_params, sizeof(float));
    c->mom2 = xcalloc(ad->n_params, sizeof(float));
    *out = be;
    return MOSFT_OK;
}

void backend_destroy(backend *be) {
    if (be) be->ops->destroy(be);
}
