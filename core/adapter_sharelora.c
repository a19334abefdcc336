// adapter_sharelora.c: ShareLoRA (Song et al., arXiv 2406.10785; shared/docs/MOS.md section 5.4): a
// LoRA whose A, B or both are shared by all layers of a linear type. adapter.sharelora_share:
//   "A"    sharelora.{t}.A [r][d_in] shared,  sharelora.layers.{i}.{t}.B [d_out][r] per layer (the
//          paper's LLaMA code path)
//   "B"    sharelora.layers.{i}.{t}.A per layer, sharelora.{t}.B shared
//   "AB"   sharelora.{t}.A and sharelora.{t}.B shared: every layer of a type has the same Delta W
//   "qkv"  sharelora.qkv.A [r][hidden]: one A for the q, k and v projections of every layer (they all
//          read the hidden state); o, gate, up and down share A per type as in "A"; B per layer
//          everywhere. The paper's text names the variant without its scoping ([INF] in the spec):
//          this is the reading that keeps the rest of the model at the paper's default, ShareA.
//   y += (alpha / r) B A dropout(x), as LoRA.
// Init: a shared A ~ N(0, (1/r)^2) (ShareLoRA's normal_(std = 1/r)), fp32, from the stream
// (RNG_INIT, seed, t, 2) (t = 7 for the qkv A); a per-layer A is LoRA's (U(+-1/sqrt(d_in)),
// bf16-rounded, the same stream and positions as adapter_lora.c, so ShareB's A equals LoRA's A); every
// B = 0 (a shared B in the reference is the first layer's LoRA B, which LoRA initializes to 0).
// Trainable (S_in = sum_t d_in, S_out = sum_t d_out over the adapted types):
//   A: r S_in + L r S_out      B: L r S_in + r S_out      AB: r (S_in + S_out)
//   qkv: r hidden (once for q, k, v) + r sum_{t not q,k,v} d_in + L r S_out
// Llama-2-7B: ShareA 1,395,456 r, ShareB 1,181,184 r, ShareAB 78,080 r.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
#include "core/adapter_init.h"
#include "core/common.h"

#define SHARE_QKV_GROUP MOD_COUNT  // the stream id of the qkv A

typedef struct {
    int share_a, share_b, qkv;
    int *a_of, *b_of;  // [L][MOD_COUNT] tensor index of the A / B that (layer, type) uses, -1 if not adapted
} share_impl;

static int share_parse(const char *s, int *share_a, int *share_b, int *qkv) {
    *share_a = *share_b = *qkv = 0;
    if (!strcmp(s, "A")) *share_a = 1;
    else if (!strcmp(s, "B")) *share_b = 1;
    else if (!strcmp(s, "AB")) *share_a = *share_b = 1;
    else if (!strcmp(s, "qkv")) *share_a = *qkv = 1;
    else return 0;
    return 1;
}

static inline int is_qkv(int t) { return t == MOD_Q || t == MOD_K || t == MOD_V; }

static int share_check(const adapter_spec *s, const llama_config *m) {
    int sa, sb, q;
    if (!share_parse(s->sharelora_share, &sa, &sb, &q))
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.sharelora_share: expected one of \"A\", \"B\", \"AB\", \"qkv\", got \"%s\"",
                          s->sharelora_share);
    return MOSFT_OK;
}

static int64_t share_count_params(const adapter_spec *s, const llama_config *m) {
    int sa, sb, qkv;
    if (!share_parse(s->sharelora_share, &sa, &sb, &qkv)) return 0;
    int64_t n = 0, r = s->r, L = m->n_layers;
    int qkv_counted = 0;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        if (qkv && is_qkv(t)) {
            if (!qkv_counted) n += r * di;  // d_in = hidden for q, k and v
            qkv_counted = 1;
        } else {
            n += (sa ? 1 : L) * r * di;
        }
        n += (sb ? 1 : L) * r * dout;
    }
    return n;
}

static int share_init(adapter *a) {
    const adapter_spec *s = &a->spec;
    const llama_config *m = &a->model;
    int rc = share_check(s, m);
    if (rc) return rc;
    int L = m->n_layers, r = s->r;
    a->rank = r;
    a->scaling = (float)(s->alpha / r);
    share_impl *im = xcalloc(1, sizeof *im);
    a->impl = im;
    share_parse(s->sharelora_share, &im->share_a, &im->share_b, &im->qkv);
    im->a_of = xmalloc(sizeof(int) * (size_t)L * MOD_COUNT);
    im->b_of = xmalloc(sizeof(int) * (size_t)L * MOD_COUNT);
    for (int e = 0; e < L * MOD_COUNT; e++) im->a_of[e] = im->b_of[e] = -1;
    // Shared tensors first (one per type, or the qkv A), then the per-layer ones layer-major.
    int sh_a[MOD_COUNT], sh_b[MOD_COUNT], qkv_a = -1;
    for (int t = 0; t < MOD_COUNT; t++) {
        sh_a[t] = sh_b[t] = -1;
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        char name[ADAPTER_NAME_MAX];
        if (im->qkv && is_qkv(t)) {
            if (qkv_a < 0) qkv_a = adapter_add_tensor(a, "sharelora.qkv.A", 2, (int64_t[]){r, di});
            sh_a[t] = qkv_a;
        } else if (im->share_a) {
            snprintf(name, sizeof name, "sharelora.%s.A", k_module_names[t]);
            sh_a[t] = adapter_add_tensor(a, name, 2, (int64_t[]){r, di});
        }
        if (im->share_b) {
            snprintf(name, sizeof name, "sharelora.%s.B", k_module_names[t]);
            sh_b[t] = adapter_add_tensor(a, name, 2, (int64_t[]){dout, r});
        }
    }
    for (int i = 0; i < L; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            if (!s->targets[t]) continue;
            int di, dout;
            llama_module_dims(m, t, &di, &dout);
            char name[ADAPTER_NAME_MAX];
            int k = i * MOD_COUNT + t;
            im->a_of[k] = sh_a[t];
            im->b_of[k] = sh_b[t];
            if (sh_a[t] < 0) {
                snprintf(name, sizeof name, "sharelora.layers.%d.%s.A", i, k_module_names[t]);
                im->a_of[k] = adapter_add_tensor(a, name, 2, (int64_t[]){r, di});
            }
            if (sh_b[t] < 0) {
                snprintf(name, sizeof name, "sharelora.layers.%d.%s.B", i, k_module_names[t]);
                im->b_of[k] = adapter_add_tensor(a, name, 2, (int64_t[]){dout, r});
            }
        }
    adapter_alloc_params(a);
    if (a->loading) return MOSFT_OK;
    // Every B stays 0. Shared A: N(0, (1/r)^2); per-layer A: LoRA's.
    if (qkv_a >= 0)
        adapter_init_normal(adapter_tensor_data(a, &a->tensors[qkv_a]), a->tensors[qkv_a].numel,
                            rng_key(RNG_INIT, s->seed, SHARE_QKV_GROUP, 2, 0), 0, 1.0 / r);
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        if (sh_a[t] >= 0) {
            if (sh_a[t] != qkv_a)
                adapter_init_normal(adapter_tensor_data(a, &a->tensors[sh_a[t]]), (size_t)r * di,
                                    rng_key(RNG_INIT, s->seed, (uint64_t)t, 2, 0), 0, 1.0 / r);
            continue;
        }
        uint64_t key = rng_key(RNG_INIT, s->seed, (uint64_t)t, 0, 0);
        size_t per = (size_t)r * di;
        for (int i = 0; i < L; i++)
            adapter_init_lora_uniform(adapter_tensor_data(a, &a->tensors[im->a_of[i * MOD_COUNT + t]]), per, key,
                                      (uint64_t)i * per, 1.0 / sqrt((double)di));
    }
    return MOSFT_OK;
}

static int share_attach(adapter *a) { return MOSFT_OK; }

static void share_build(const adapter *a, int layer, int module, float *A, float *B) {
    const share_impl *im = a->impl;
    MOSFT_ASSERT(layer >= 0 && layer < a->model.n_layers);
    int k = layer * MOD_COUNT + module;
    MOSFT_ASSERT(im->a_of[k] >= 0 && im->b_of[k] >= 0);
    const adapter_tensor *ta = &a->tensors[im->a_of[k]], *tb = &a->tensors[im->b_of[k]];
    memcpy(A, adapter_tensor_data(a, ta), sizeof(float) * ta->numel);
    memcpy(B, adapter_tensor_data(a, tb), sizeof(float) * tb->numel);
}

// A shared factor sums the gradients of every layer (and, for the qkv A, of q, k and v) that uses it,
// in the order the engine calls: deterministic.
static void share_scatter(const adapter *a, int layer, int module, const float *gA, const float *gB, float *grad) {
    const share_impl *im = a->impl;
    MOSFT_ASSERT(layer >= 0 && layer < a->model.n_layers);
    int k = layer * MOD_COUNT + module;
    MOSFT_ASSERT(im->a_of[k] >= 0 && im->b_of[k] >= 0);
    const adapter_tensor *ta = &a->tensors[im->a_of[k]], *tb = &a->tensors[im->b_of[k]];
    float *ga = grad + ta->offset, *gb = grad + tb->offset;
    for (size_t e = 0; e < ta->numel; e++) ga[e] += gA[e];
    for (size_t e = 0; e < tb->numel; e++) gb[e] += gB[e];
}

static void share_free_impl(adapter *a) {
    share_impl *im = a->impl;
    if (im) {
        free(im->a_of);
        free(im->b_of);
    }
    free(im);
    a->impl = NULL;
}

const adapter_ops adapter_ops_sharelora = {
    .method = "sharelora",
    .routed = 0,
    .init = share_init,
    .attach = share_attach,
    .build = share_build,
    .scatter = share_scatter,
    .free_impl = share_free_impl,
    .count_params = share_count_params,
    .check = share_check,
};
