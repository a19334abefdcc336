// adapter_lora.c: plain LoRA (Hu et al.) as PEFT builds it: per layer i and adapted type t
//   lora.layers.{i}.{t}.A  F32 [r][d_in]   ~ U(-1/sqrt(d_in), +1/sqrt(d_in)), rounded to bf16
//   lora.layers.{i}.{t}.B  F32 [d_out][r]  = 0
//   y += (alpha / r) * B A dropout(x)
// The A values of type t, all layers concatenated (layer-major), are the stream (RNG_INIT, seed, t, 0)
// that MoS draws PoolA_t from: LoRA is MoS with R_p = R_v = r, bit for bit, from the same seed.
// Tensors are laid out layer-major (layer 0: q.A, q.B, k.A, ...), as PEFT's state dict.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
#include "core/common.h"
#include "core/rng.h"

typedef struct {
    int *a_tensor;  // [L][MOD_COUNT] tensor index of A (B follows it), -1 if not adapted
} lora_impl;

static int64_t lora_count_params(const adapter_spec *s, const llama_config *m) {
    int64_t n = 0;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        n += (int64_t)s->r * m->n_layers * (di + dout);
    }
    return n;
}

static int lora_init(adapter *a) {
    const adapter_spec *s = &a->spec;
    const llama_config *m = &a->model;
    int L = m->n_layers, r = s->r;
    a->rank = r;
    a->scaling = (float)(s->alpha / r);
    lora_impl *im = xcalloc(1, sizeof *im);
    a->impl = im;
    im->a_tensor = xmalloc(sizeof(int) * (size_t)L * MOD_COUNT);
    for (int i = 0; i < L; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            im->a_tensor[i * MOD_COUNT + t] = -1;
            if (!s->targets[t]) continue;
            int di, dout;
            llama_module_dims(m, t, &di, &dout);
            char name[ADAPTER_NAME_MAX];
            snprintf(name, sizeof name, "lora.layers.%d.%s.A", i, k_module_names[t]);
            im->a_tensor[i * MOD_COUNT + t] = adapter_add_tensor(a, name, 2, (int64_t[]){r, di});
            snprintf(name, sizeof name, "lora.layers.%d.%s.B", i, k_module_names[t]);
            adapter_add_tensor(a, name, 2, (int64_t[]){dout, r});
        }
    adapter_alloc_params(a);
    if (a->loading) return MOSFT_OK;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        uint64_t key = rng_key(RNG_INIT, s->seed, (uint64_t)t, 0, 0);
        double bound = 1.0 / sqrt((double)di);
        size_t per = (size_t)r * di;
        for (int i = 0; i < L; i++) {
            float *A = a->params + a->tensors[im->a_tensor[i * MOD_COUNT + t]].offset;  // [r][d_in]
            for (size_t e = 0; e < per; e++)
                A[e] = bf16_round((float)((2.0 * rng_uniform(key, (uint64_t)i * per + e) - 1.0) * bound));
        }
    }
    return MOSFT_OK;
}

static int lora_attach(adapter *a) { return MOSFT_OK; }

static void lora_build(const adapter *a, int layer, int module, float *A, float *B) {
    const lora_impl *im = a->impl;
    int ti = im->a_tensor[layer * MOD_COUNT + module];
    MOSFT_ASSERT(ti >= 0);
    const adapter_tensor *ta = &a->tensors[ti], *tb = &a->tensors[ti + 1];
    memcpy(A, a->params + ta->offset, sizeof(float) * ta->numel);
    memcpy(B, a->params + tb->offset, sizeof(float) * tb->numel);
}

static void lora_scatter(const adapter *a, int layer, int module, const float *gA, const float *gB, float *grad) {
    const lora_impl *im = a->impl;
    int ti = im->a_tensor[layer * MOD_COUNT + module];
    MOSFT_ASSERT(ti >= 0);
    const adapter_tensor *ta = &a->tensors[ti], *tb = &a->tensors[ti + 1];
    float *ga = grad + ta->offset, *gb = grad + tb->offset;
    for (size_t e = 0; e < ta->numel; e++) ga[e] += gA[e];
    for (size_t e = 0; e < tb->numel; e++) gb[e] += gB[e];
}

static void lora_free_impl(adapter *a) {
    lora_impl *im = a->impl;
    if (im) free(im->a_tensor);
    free(im);
    a->impl = NULL;
}

const adapter_ops adapter_ops_lora = {
    .method = "lora",
    .routed = 0,
    .init = lora_init,
    .attach = lora_attach,
    .build = lora_build,
    .scatter = lora_scatter,
    .free_impl = lora_free_impl,
    .count_params = lora_count_params,
    .check = NULL,
};
