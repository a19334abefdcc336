// adapter_tied_lora.c: Tied-LoRA (Renduchintala et al., arXiv 2311.09578; shared/docs/MOS.md 5.3).
//
// Per adapted type t, A and B are tied across all L layers; each layer i scales them with its own
// vectors u_i and v_i:
//   tied_lora.{t}.A  F32 [r][d_in]     shared
//   tied_lora.{t}.B  F32 [d_out][r]    shared
//   tied_lora.{t}.u  F32 [L][r]        row i = u_i
//   tied_lora.{t}.v  F32 [L][d_out]    row i = v_i
//   A_eff = diag(u_i) A,  B_eff = diag(v_i) B,  y += (alpha / r) diag(v_i) B diag(u_i) A dropout(x)
// The formula above has no alpha / r; mosft keeps LoRA's scaling alpha / r (a choice, [INF]) so that a
// Tied-LoRA and a LoRA of the same rank and init take steps of the same size.
// adapter.tied_lora_trainable says which of v, B, u, A train ("vBuA": all, the paper's best): a
// trainable part is a tensor (optimized, in the count), a frozen one a buffer (saved, never drawn
// again). The names are the same either way.
// Init (MOS.md 5.3 [INF]): A ~ U(+-1/sqrt(d_in)) bf16-rounded from LoRA's stream (RNG_INIT, seed, t, 0)
// (Tied-LoRA's A is LoRA's layer-0 A), B = 0, u = v = 1. A frozen B cannot start at 0 (the adapter
// would stay 0 for ever), so a frozen B is drawn like a LoRA A of fan-in r, U(+-1/sqrt(r)), from
// (RNG_INIT, seed, t, 1); then, so that Delta W is still 0 at step 0, the first trainable of v, u, A
// starts at 0 instead (v first: Delta W = diag(v) B diag(u) A, as VeRA zeroes its b).
// Trainable per type, all four trained: r (d_in + d_out) + L (r + d_out).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
#include "core/adapter_init.h"
#include "core/common.h"

enum { TL_A = 0, TL_B, TL_U, TL_V, TL_PARTS };
static const char k_tl_letter[TL_PARTS] = {'A', 'B', 'u', 'v'};

typedef struct {
    int on, d_in, d_out;
    int index[TL_PARTS];  // tensor index (trainable) or buffer index (frozen)
} tied_module;

typedef struct {
    int trainable[TL_PARTS];
    tied_module m[MOD_COUNT];
} tied_impl;

static int tied_parse(const char *s, int trainable[TL_PARTS]) {
    memset(trainable, 0, sizeof(int) * TL_PARTS);
    if (!s[0]) return 0;
    for (const char *p = s; *p; p++) {
        const char *q = memchr(k_tl_letter, *p, TL_PARTS);
        if (!q || trainable[q - k_tl_letter]) return 0;
        trainable[q - k_tl_letter] = 1;
    }
    return 1;
}

static int tied_check(const adapter_spec *s, const llama_config *m) {
    int tr[TL_PARTS];
    if (!tied_parse(s->tied_lora_trainable, tr))
        return mosft_fail(MOSFT_ERR_INPUT,
                          "adapter.tied_lora_trainable: expected distinct letters of \"vBuA\" (the parts that train), got "
                          "\"%s\"",
                          s->tied_lora_trainable);
    return MOSFT_OK;
}

static int64_t tied_count_params(const adapter_spec *s, const llama_config *m) {
    int tr[TL_PARTS];
    if (!tied_parse(s->tied_lora_trainable, tr)) return 0;
    int64_t n = 0, r = s->r, L = m->n_layers;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        n += tr[TL_A] * r * di + tr[TL_B] * r * dout + tr[TL_U] * L * r + tr[TL_V] * L * dout;
    }
    return n;
}

static float *tied_part(const adapter *a, int module, int part) {
    const tied_impl *im = a->impl;
    int idx = im->m[module].index[part];
    return im->trainable[part] ? adapter_tensor_data(a, &a->tensors[idx]) : (float *)a->buffers[idx].data;
}

static int tied_init(adapter *a) {
    const adapter_spec *s = &a->spec;
    const llama_config *m = &a->model;
    int rc = tied_check(s, m);
    if (rc) return rc;
    int L = m->n_layers, r = s->r;
    a->rank = r;
    a->scaling = (float)(s->alpha / r);
    tied_impl *im = xcalloc(1, sizeof *im);
    a->impl = im;
    tied_parse(s->tied_lora_trainable, im->trainable);
    for (int t = 0; t < MOD_COUNT; t++) {
        tied_module *tm = &im->m[t];
        if (!s->targets[t]) continue;
        tm->on = 1;
        llama_module_dims(m, t, &tm->d_in, &tm->d_out);
        int64_t shapes[TL_PARTS][2] = {{r, tm->d_in}, {tm->d_out, r}, {L, r}, {L, tm->d_out}};
        static const char *const part_name[TL_PARTS] = {"A", "B", "u", "v"};
        for (int p = 0; p < TL_PARTS; p++) {
            char name[ADAPTER_NAME_MAX];
            snprintf(name, sizeof name, "tied_lora.%s.%s", k_module_names[t], part_name[p]);
            tm->index[p] = im->trainable[p] ? adapter_add_tensor(a, name, 2, shapes[p])
                                            : adapter_add_buffer(a, name, MOSFT_F32, 2, shapes[p]);
        }
    }
    adapter_alloc_params(a);
    if (a->loading) return MOSFT_OK;
    // The part that starts at 0 so that Delta W = 0 at step 0 (see the top of the file).
    int zero = im->trainable[TL_B] ? TL_B : im->trainable[TL_V] ? TL_V : im->trainable[TL_U] ? TL_U : TL_A;
    for (int t = 0; t < MOD_COUNT; t++) {
        const tied_module *tm = &im->m[t];
        if (!tm->on) continue;
        if (zero != TL_A)
            adapter_init_lora_uniform(tied_part(a, t, TL_A), (size_t)r * tm->d_in,
                                      rng_key(RNG_INIT, s->seed, (uint64_t)t, 0, 0), 0, 1.0 / sqrt((double)tm->d_in));
        if (zero != TL_B)
            adapter_init_lora_uniform(tied_part(a, t, TL_B), (size_t)tm->d_out * r,
                                      rng_key(RNG_INIT, s->seed, (uint64_t)t, 1, 0), 0, 1.0 / sqrt((double)r));
        if (zero != TL_U) adapter_init_fill(tied_part(a, t, TL_U), (size_t)L * r, 1.0f);
        if (zero != TL_V) adapter_init_fill(tied_part(a, t, TL_V), (size_t)L * tm->d_out, 1.0f);
    }
    return MOSFT_OK;
}

static void tied_build(const adapter *a, int layer, int module, float *A, float *B) {
    const tied_module *tm = &((const tied_impl *)a->impl)->m[module];
    MOSFT_ASSERT(tm->on && layer >= 0 && layer < a->model.n_layers);
    int r = a->rank, di = tm->d_in, dout = tm->d_out;
    const float *As = tied_part(a, module, TL_A), *Bs = tied_part(a, module, TL_B);  // [r][d_in], [d_out][r]
    const float *u = tied_part(a, module, TL_U) + (size_t)layer * r;                  // [r]
    const float *v = tied_part(a, module, TL_V) + (size_t)layer * dout;               // [d_out]
    for (int k = 0; k < r; k++)
        for (int c = 0; c < di; c++) A[(size_t)k * di + c] = u[k] * As[(size_t)k * di + c];
    for (int o = 0; o < dout; o++)
        for (int k = 0; k < r; k++) B[(size_t)o * r + k] = v[o] * Bs[(size_t)o * r + k];
}

// A_eff = diag(u) A, B_eff = diag(v) B: gA += diag(u) gA_eff, gu[k] += sum_c gA_eff[k][c] A[k][c],
// gB += diag(v) gB_eff, gv[o] += sum_k gB_eff[o][k] B[o][k]; only the trainable parts.
static void tied_scatter(const adapter *a, int layer, int module, const float *gA, const float *gB, float *grad) {
    const tied_impl *im = a->impl;
    const tied_module *tm = &im->m[module];
    MOSFT_ASSERT(tm->on && layer >= 0 && layer < a->model.n_layers);
    int r = a->rank, di = tm->d_in, dout = tm->d_out;
    const float *As = tied_part(a, module, TL_A), *Bs = tied_part(a, module, TL_B);
    const float *u = tied_part(a, module, TL_U) + (size_t)layer * r;
    const float *v = tied_part(a, module, TL_V) + (size_t)layer * dout;
    if (im->trainable[TL_A]) {
        float *g = grad + a->tensors[tm->index[TL_A]].offset;
        for (int k = 0; k < r; k++)
            for (int c = 0; c < di; c++) g[(size_t)k * di + c] += u[k] * gA[(size_t)k * di + c];
    }
    if (im->trainable[TL_U]) {
        float *g = grad + a->tensors[tm->index[TL_U]].offset + (size_t)layer * r;
        for (int k = 0; k < r; k++) {
            double acc = 0;
            for (int c = 0; c < di; c++) acc += (double)gA[(size_t)k * di + c] * As[(size_t)k * di + c];
            g[k] += (float)acc;
        }
    }
    if (im->trainable[TL_B]) {
        float *g = grad + a->tensors[tm->index[TL_B]].offset;
        for (int o = 0; o < dout; o++)
            for (int k = 0; k < r; k++) g[(size_t)o * r + k] += v[o] * gB[(size_t)o * r + k];
    }
    if (im->trainable[TL_V]) {
        float *g = grad + a->tensors[tm->index[TL_V]].offset + (size_t)layer * dout;
        for (int o = 0; o < dout; o++) {
            double acc = 0;
            for (int k = 0; k < r; k++) acc += (double)gB[(size_t)o * r + k] * Bs[(size_t)o * r + k];
            g[o] += (float)acc;
        }
    }
}

static void tied_free_impl(adapter *a) {
    free(a->impl);
    a->impl = NULL;
}

const adapter_ops adapter_ops_tied_lora = {
    .method = "tied_lora",
    .routed = 0,
    .init = tied_init,
    .attach = adapter_check_buffers_finite,
    .build = tied_build,
    .scatter = tied_scatter,
    .free_impl = tied_free_impl,
    .count_params = tied_count_params,
    .check = tied_check,
};
