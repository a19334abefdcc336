// adapter.c: the adapter object (see adapter.h): the method registry, creation and bookkeeping of
// the trainable tensor views and frozen buffers, the base-model fingerprint, and the engine's
// low-rank math on CPU (the fp32 reference every backend is compared with).
#include "core/adapter.h"
#include "core/ops_cpu.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/rng.h"

// ---- registry ----------------------------------------------------------------------------------

extern const adapter_ops adapter_ops_mos;
extern const adapter_ops adapter_ops_lora;
extern const adapter_ops adapter_ops_prolora;
extern const adapter_ops adapter_ops_vera;
extern const adapter_ops adapter_ops_tied_lora;
extern const adapter_ops adapter_ops_sharelora;
extern const adapter_ops adapter_ops_sira;

// One line per method. A static library only links the objects something references, so the
// methods are named here rather than self-registering from constructors.
static const adapter_ops *const k_methods[] = {&adapter_ops_mos,       &adapter_ops_lora,      &adapter_ops_prolora,
                                               &adapter_ops_vera,      &adapter_ops_tied_lora, &adapter_ops_sharelora,
                                               &adapter_ops_sira};

const adapter_ops *adapter_ops_find(const char *method) {
    for (size_t i = 0; i < sizeof k_methods / sizeof k_methods[0]; i++)
        if (!strcmp(k_methods[i]->method, method)) return k_methods[i];
    return NULL;
}

static int unknown_method(const char *method) {
    char avail[128] = "";
    for (size_t i = 0; i < sizeof k_methods / sizeof k_methods[0]; i++) {
        if (i) strncat(avail, ", ", sizeof avail - strlen(avail) - 1);
        strncat(avail, k_methods[i]->method, sizeof avail - strlen(avail) - 1);
    }
    return mosft_fail(MOSFT_ERR_INPUT, "adapter.method: expected one of the methods this build implements (%s), got \"%s\"",
                      avail, method);
}

// ---- spec --------------------------------------------------------------------------------------

void adapter_spec_from_config(adapter_spec *s, const mosft_config *c) {
    memset(s, 0, sizeof *s);
    snprintf(s->method, sizeof s->method, "%s", c->adapter.method);
    s->r = c->adapter.r;
    s->equiv_rank = c->adapter.equiv_rank;
    s->private_rank = c->adapter.private_rank;
    s->shards = c->adapter.shards;
    s->alpha = c->adapter.alpha;
    s->dropout = c->adapter.dropout;
    memcpy(s->targets, c->adapter.targets, sizeof s->targets);
    s->seed = c->adapter.seed;
    s->pair_dissociation = c->adapter.pair_dissociation;
    s->pure_sharing = c->adapter.pure_sharing;
    s->subset_selection = c->adapter.subset_selection;
    s->scale_mean = c->adapter.scale_mean;
    s->scale_std = c->adapter.scale_std;
    s->prolora_unshared_r = c->adapter.prolora_unshared_r;
    s->prolora_reduce_a = c->adapter.prolora_reduce_a;
    s->prolora_reduce_b = c->adapter.prolora_reduce_b;
    s->vera_d_initial = c->adapter.vera_d_initial;
    s->vera_projection_seed = c->adapter.vera_projection_seed;
    snprintf(s->tied_lora_trainable, sizeof s->tied_lora_trainable, "%s", c->adapter.tied_lora_trainable);
    snprintf(s->sharelora_share, sizeof s->sharelora_share, "%s", c->adapter.sharelora_share);
    s->sira_experts = c->adapter.sira_experts;
    s->sira_top_k = c->adapter.sira_top_k;
    s->sira_capacity_factor = c->adapter.sira_capacity_factor;
    s->sira_expert_dropout = c->adapter.sira_expert_dropout;
}

// The common keys and the method's own (a knob of another method means nothing here, and is left
// out so that a file shows only what shaped its adapter; a reader fills the rest with defaults).
char *adapter_spec_to_json(const adapter_spec *s) {
    const char *m = s->method;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "method", m);
    cJSON_AddNumberToObject(o, "r", s->r);
    cJSON_AddNumberToObject(o, "alpha", s->alpha);
    cJSON_AddNumberToObject(o, "dropout", s->dropout);
    cJSON *t = cJSON_AddArrayToObject(o, "targets");
    for (int k = 0; k < MOD_COUNT; k++)
        if (s->targets[k]) cJSON_AddItemToArray(t, cJSON_CreateString(k_module_names[k]));
    cJSON_AddNumberToObject(o, "seed", (double)s->seed);  // the config keeps seeds below 2^53
    if (!strcmp(m, "mos")) {
        cJSON_AddNumberToObject(o, "equiv_rank", s->equiv_rank);
        cJSON_AddNumberToObject(o, "private_rank", s->private_rank);
        cJSON_AddNumberToObject(o, "shards", s->shards);
        cJSON_AddBoolToObject(o, "pair_dissociation", s->pair_dissociation);
        cJSON_AddBoolToObject(o, "pure_sharing", s->pure_sharing);
        cJSON_AddBoolToObject(o, "subset_selection", s->subset_selection);
        cJSON_AddNumberToObject(o, "scale_mean", s->scale_mean);
        cJSON_AddNumberToObject(o, "scale_std", s->scale_std);
    } else if (!strcmp(m, "prolora")) {
        cJSON_AddNumberToObject(o, "prolora_unshared_r", s->prolora_unshared_r);
        cJSON_AddNumberToObject(o, "prolora_reduce_a", s->prolora_reduce_a);
        cJSON_AddNumberToObject(o, "prolora_reduce_b", s->prolora_reduce_b);
    } else if (!strcmp(m, "vera")) {
        cJSON_AddNumberToObject(o, "vera_d_initial", s->vera_d_initial);
        cJSON_AddNumberToObject(o, "vera_projection_seed", (double)s->vera_projection_seed);
    } else if (!strcmp(m, "tied_lora")) {
        cJSON_AddStringToObject(o, "tied_lora_trainable", s->tied_lora_trainable);
    } else if (!strcmp(m, "sharelora")) {
        cJSON_AddStringToObject(o, "sharelora_share", s->sharelora_share);
    } else if (!strcmp(m, "sira")) {
        cJSON_AddNumberToObject(o, "sira_experts", s->sira_experts);
        cJSON_AddNumberToObject(o, "sira_top_k", s->sira_top_k);
        cJSON_AddNumberToObject(o, "sira_capacity_factor", s->sira_capacity_factor);
        cJSON_AddNumberToObject(o, "sira_expert_dropout", s->sira_expert_dropout);
    }
    char *json = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    char *out = xstrdup(json);
    cJSON_free(json);
    return out;
}

void adapter_targets_str(const adapter_spec *s, char *out, size_t n) {
    size_t o = 0;
    out[0] = 0;
    for (int m = 0; m < MOD_COUNT; m++) {
        if (!s->targets[m]) continue;
        int w = snprintf(out + o, o < n ? n - o : 0, "%s%s_proj", o ? "," : "", k_module_names[m]);
        if (w > 0) o += (size_t)w;
    }
}

static int spec_check_common(const adapter_spec *s, const llama_config *m) {
    int any = 0;
    for (int t = 0; t < MOD_COUNT; t++) any |= s->targets[t] != 0;
    if (!any) return mosft_fail(MOSFT_ERR_INPUT, "adapter.targets: expected at least one of q, k, v, o, gate, up, down, got none");
    if (s->r < 1) return mosft_fail(MOSFT_ERR_INPUT, "adapter.r: expected an integer >= 1, got %d", s->r);
    if (!(s->alpha > 0)) return mosft_fail(MOSFT_ERR_INPUT, "adapter.alpha: expected a number > 0, got %g", s->alpha);
    if (!(s->dropout >= 0 && s->dropout < 1))
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.dropout: expected a number in [0, 1), got %g", s->dropout);
    if (m->n_layers < 1 || m->hidden < 1 || m->intermediate < 1 || m->n_heads < 1 || m->n_kv_heads < 1 ||
        m->head_dim < 1)
        return mosft_fail(MOSFT_ERR_INPUT, "base model: expected positive dimensions, got hidden %d, intermediate %d, "
                                           "%d layers, %d heads, %d kv heads, head_dim %d",
                          m->hidden, m->intermediate, m->n_layers, m->n_heads, m->n_kv_heads, m->head_dim);
    return MOSFT_OK;
}

int adapter_spec_check(const adapter_spec *s, const llama_config *m) {
    const adapter_ops *ops = adapter_ops_find(s->method);
    if (!ops) return unknown_method(s->method);
    int rc = spec_check_common(s, m);
    if (rc) return rc;
    return ops->check ? ops->check(s, m) : MOSFT_OK;
}

int64_t adapter_param_count(const adapter_spec *s, const llama_config *m) {
    const adapter_ops *ops = adapter_ops_find(s->method);
    return ops ? ops->count_params(s, m) : -1;
}

// ---- fingerprint -------------------------------------------------------------------------------

// The base model as adapter.mos records it: the dimensions that fix every adapted shape, and the HF
// names of the adapted weights ({i} = layer). Written with HF config.json key names.
static void fingerprint_make(const llama_config *m, const adapter_spec *s, char *out, size_t n) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "model_type", m->model_type[0] ? m->model_type : "llama");
    cJSON_AddNumberToObject(o, "hidden_size", m->hidden);
    cJSON_AddNumberToObject(o, "intermediate_size", m->intermediate);
    cJSON_AddNumberToObject(o, "num_hidden_layers", m->n_layers);
    cJSON_AddNumberToObject(o, "num_attention_heads", m->n_heads);
    cJSON_AddNumberToObject(o, "num_key_value_heads", m->n_kv_heads);
    cJSON_AddNumberToObject(o, "head_dim", m->head_dim);
    cJSON_AddNumberToObject(o, "vocab_size", m->vocab);
    cJSON *t = cJSON_AddArrayToObject(o, "tensors");
    for (int k = 0; k < MOD_COUNT; k++) {
        if (!s->targets[k]) continue;
        char name[96];
        snprintf(name, sizeof name, "model.layers.{i}.%s.weight", k_module_hf[k]);
        cJSON_AddItemToArray(t, cJSON_CreateString(name));
    }
    char *json = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    MOSFT_ASSERT(strlen(json) < n);
    snprintf(out, n, "%s", json);
    cJSON_free(json);
}

void adapter_set_base_model_name(adapter *a, const char *name) {
    snprintf(a->base_model_name, sizeof a->base_model_name, "%s", name ? name : "");
}

// ---- creation ----------------------------------------------------------------------------------

static int create(adapter **out, const adapter_spec *spec, const llama_config *model, int loading) {
    *out = NULL;
    int rc = adapter_spec_check(spec, model);
    if (rc) return rc;
    adapter *a = xcalloc(1, sizeof *a);
    a->ops = adapter_ops_find(spec->method);
    a->spec = *spec;
    a->model = *model;
    a->loading = loading;
    fingerprint_make(model, spec, a->model_fingerprint, sizeof a->model_fingerprint);
    rc = a->ops->init(a);
    a->loading = 0;
    if (rc) {
        adapter_free(a);
        return rc;
    }
    if (!a->params) adapter_alloc_params(a);
    MOSFT_ASSERT(a->rank >= 1 && a->scaling > 0);
    *out = a;
    return MOSFT_OK;
}

int adapter_create(adapter **out, const adapter_spec *spec, const llama_config *model) {
    return create(out, spec, model, 0);
}

int adapter_create_layout(adapter **out, const adapter_spec *spec, const llama_config *model) {
    return create(out, spec, model, 1);
}

void adapter_free(adapter *a) {
    if (!a) return;
    if (a->ops && a->ops->free_impl) a->ops->free_impl(a);
    free(a->params);
    free(a->tensors);
    for (int i = 0; i < a->n_buffers; i++) free(a->buffers[i].data);
    free(a->buffers);
    free(a);
}

static size_t shape_numel(int ndim, const int64_t *shape) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++) {
        MOSFT_ASSERT(shape[i] >= 0);
        n *= (size_t)shape[i];
    }
    return n;
}

int adapter_add_tensor(adapter *a, const char *name, int ndim, const int64_t *shape) {
    MOSFT_ASSERT(!a->params && ndim >= 1 && ndim <= 4 && strlen(name) < ADAPTER_NAME_MAX);
    a->tensors = xrealloc(a->tensors, sizeof(adapter_tensor) * (size_t)(a->n_tensors + 1));
    adapter_tensor *t = &a->tensors[a->n_tensors];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    t->numel = shape_numel(ndim, shape);
    t->offset = a->n_params;  // packed: the optimizer and the all-reduce see one contiguous buffer
    a->n_params += t->numel;
    return a->n_tensors++;
}

int adapter_add_buffer(adapter *a, const char *name, mosft_dtype dtype, int ndim, const int64_t *shape) {
    MOSFT_ASSERT(ndim >= 1 && ndim <= 4 && strlen(name) < ADAPTER_NAME_MAX);
    a->buffers = xrealloc(a->buffers, sizeof(adapter_buffer) * (size_t)(a->n_buffers + 1));
    adapter_buffer *b = &a->buffers[a->n_buffers];
    memset(b, 0, sizeof *b);
    snprintf(b->name, sizeof b->name, "%s", name);
    b->dtype = dtype;
    b->ndim = ndim;
    memcpy(b->shape, shape, sizeof(int64_t) * (size_t)ndim);
    b->nbytes = shape_numel(ndim, shape) * dtype_size(dtype);
    b->data = xcalloc(b->nbytes ? b->nbytes : 1, 1);
    return a->n_buffers++;
}

void adapter_alloc_params(adapter *a) {
    MOSFT_ASSERT(!a->params);
    a->params = xcalloc(a->n_params ? a->n_params : 1, sizeof(float));
}

adapter_tensor *adapter_find_tensor(const adapter *a, const char *name) {
    for (int i = 0; i < a->n_tensors; i++)
        if (!strcmp(a->tensors[i].name, name)) return &a->tensors[i];
    return NULL;
}

adapter_buffer *adapter_find_buffer(const adapter *a, const char *name) {
    for (int i = 0; i < a->n_buffers; i++)
        if (!strcmp(a->buffers[i].name, name)) return &a->buffers[i];
    return NULL;
}

// ---- one adapted linear on CPU -------------------------------------------------------------------

void adapter_forward_cpu(const adapter *a, int layer, int module, int64_t T, const float *x, const float *mask,
                         float *y, int training, uint64_t key) {
    int di, dout, r = a->rank;
    llama_module_dims(&a->model, module, &di, &dout);
    MOSFT_ASSERT(a->spec.targets[module] && layer >= 0 && layer < a->model.n_layers);
    if (a->ops->routed) {
        // The method computes its branch from the dropped-out input itself.
        float *xd = xmalloc(sizeof(float) * (size_t)(T * di));  // [T][d_in]
        for (int64_t e = 0; e < T * di; e++) xd[e] = mask ? x[e] * mask[e] : x[e];
        a->ops->forward(a, layer, module, xd, T, y, training, key, NULL);
        free(xd);
        return;
    }
    float *A = xmalloc(sizeof(float) * (size_t)r * di);    // [r][d_in]
    float *B = xmalloc(sizeof(float) * (size_t)dout * r);  // [d_out][r]
    a->ops->build(a, layer, module, A, B);
    adapter_lowrank_forward_cpu(T, di, dout, r, a->scaling, x, mask, A, B, y, NULL);
    free(A);
    free(B);
}

void adapter_backward_cpu(const adapter *a, int layer, int module, int64_t T, const float *x, const float *mask,
                          const float *gy, float *gx, float *grad, int training, uint64_t key) {
    int di, dout, r = a->rank;
    llama_module_dims(&a->model, module, &di, &dout);
    MOSFT_ASSERT(a->spec.targets[module] && layer >= 0 && layer < a->model.n_layers);
    if (a->ops->routed) {
        float *xd = xmalloc(sizeof(float) * (size_t)(T * di));              // [T][d_in]
        float *gxd = xcalloc((size_t)(T * di), sizeof(float));              // [T][d_in]
        for (int64_t e = 0; e < T * di; e++) xd[e] = mask ? x[e] * mask[e] : x[e];
        a->ops->backward(a, layer, module, xd, gy, T, gxd, grad, training, key, NULL);
        for (int64_t e = 0; e < T * di; e++) gx[e] += mask ? gxd[e] * mask[e] : gxd[e];
        free(xd);
        free(gxd);
        return;
    }
    float *A = xmalloc(sizeof(float) * (size_t)r * di), *B = xmalloc(sizeof(float) * (size_t)dout * r);
    float *gA = xmalloc(sizeof(float) * (size_t)r * di), *gB = xmalloc(sizeof(float) * (size_t)dout * r);
    a->ops->build(a, layer, module, A, B);
    adapter_lowrank_backward_cpu(T, di, dout, r, a->scaling, x, mask, A, B, gy, gx, gA, gB);
    a->ops->scatter(a, layer, module, gA, gB, grad);
    free(A);
    free(B);
    free(gA);
    free(gB);
}

// ---- the engine's low-rank math on CPU ---------------------------------------------------------
// Products through gemm_cpu (fp32, each output summed in ascending order, deterministic for any
// thread count): this is the reference the CUDA kernels are held to.

// xd = x * mask into buf (or x itself without dropout).
static const float *masked_input(const float *x, const float *mask, int64_t n, float **buf) {
    if (!mask) return x;
    *buf = xmalloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) (*buf)[i] = x[i] * mask[i];
    return *buf;
}

void adapter_lowrank_forward_cpu(int64_t T, int d_in, int d_out, int r, float s, const float *x, const float *mask,
                                 const float *A, const float *B, float *y, float *h_out) {
    float *xbuf = NULL;
    const float *xd = masked_input(x, mask, T * d_in, &xbuf);     // [T][d_in]
    float *h = xmalloc(sizeof(float) * (size_t)(T * r));          // [T][r]
    gemm_cpu(0, 1, T, r, d_in, xd, d_in, A, d_in, h, r, 0);      // h = xd A^T
    if (h_out) memcpy(h_out, h, sizeof(float) * (size_t)(T * r));
    for (int64_t i = 0; i < T * r; i++) h[i] *= s;
    gemm_cpu(0, 1, T, d_out, r, h, r, B, r, y, d_out, 1);        // y += (s h) B^T
    free(h);
    free(xbuf);
}

void adapter_lowrank_backward_cpu(int64_t T, int d_in, int d_out, int r, float s, const float *x, const float *mask,
                                  const float *A, const float *B, const float *gy, float *gx, float *gA, float *gB) {
    float *xbuf = NULL;
    const float *xd = masked_input(x, mask, T * d_in, &xbuf);     // [T][d_in]
    float *h = xmalloc(sizeof(float) * (size_t)(T * r));          // [T][r] recomputed s * xd A^T
    float *gh = xmalloc(sizeof(float) * (size_t)(T * r));         // [T][r] s * gy B
    gemm_cpu(0, 1, T, r, d_in, xd, d_in, A, d_in, h, r, 0);
    for (int64_t i = 0; i < T * r; i++) h[i] *= s;
    gemm_cpu(1, 0, d_out, r, T, gy, d_out, h, r, gB, r, 0);      // gB = gy^T (s h)
    gemm_cpu(0, 0, T, r, d_out, gy, d_out, B, r, gh, r, 0);      // gh = gy B
    for (int64_t i = 0; i < T * r; i++) gh[i] *= s;
    gemm_cpu(1, 0, r, d_in, T, gh, r, xd, d_in, gA, d_in, 0);    // gA = gh^T xd
    if (mask) {  // gx += (gh A) * mask: dropout's multiplier applies on the way back too
        float *g = xbuf;  // reuse: xd is no longer needed
        gemm_cpu(0, 0, T, d_in, r, gh, r, A, d_in, g, d_in, 0);
        for (int64_t i = 0; i < T * d_in; i++) gx[i] += g[i] * mask[i];
    } else {
        gemm_cpu(0, 0, T, d_in, r, gh, r, A, d_in, gx, d_in, 1);
    }
    free(h);
    free(gh);
    free(xbuf);
}

void adapter_dropout_mask(uint64_t key, float p, size_t n, float *mask) {
    if (p <= 0) {
        for (size_t i = 0; i < n; i++) mask[i] = 1.0f;
        return;
    }
    uint32_t thr = rng_dropout_threshold16(p);
    float keep = 1.0f / (1.0f - p);
    // Element i is half i % 8 of Philox block i / 8 (rng_keep16): one block gives eight elements.
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint32_t o[4];
        rng_philox4(key, i >> 3, o);
        for (int l = 0; l < 8; l++) mask[i + l] = rng_half16(o, l) >= thr ? keep : 0.0f;
    }
    for (; i < n; i++) mask[i] = rng_keep16(key, i, thr) ? keep : 0.0f;
}

int adapter_check_buffers_finite(adapter *a) {
    for (int b = 0; b < a->n_buffers; b++) {
        const float *p = (const float *)a->buffers[b].data;
        size_t n = a->buffers[b].nbytes / sizeof(float);
        for (size_t e = 0; e < n; e++)
            if (!isfinite(p[e]))
                return mosft_fail(MOSFT_ERR_INPUT, "%s: entry %zu: expected a finite value, got %g", a->buffers[b].name, e,
                                  (double)p[e]);
    }
    return MOSFT_OK;
}
