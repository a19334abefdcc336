// adapter_prolora.c: PRoLoRA (partially rotation-enhanced low-rank adaptation, Wang et al. 2024), as
// the authors' code builds it (modules/chunkwise_sharing_LoRA.py; shared/docs/MOS.md section 5.1).
//
// Knobs: rank r, unshared rank u (adapter.prolora_unshared_r), broadcast reductions m, n
// (prolora_reduce_a, prolora_reduce_b). With r' = r - u, c_A = ceil(d_in / m), c_B = ceil(d_out / n) and
// the rotation strides s_A = max(floor(r' / m), 1), s_B = max(floor(r' / n), 1), per layer i and type t:
//   prolora.layers.{i}.{t}.A0  F32 [r'][c_A]     shared chunk of A (torch: nn.Linear(c_A, r').weight)
//   prolora.layers.{i}.{t}.B0  F32 [c_B][r']     shared chunk of B (torch: nn.Linear(r', c_B).weight)
//   prolora.layers.{i}.{t}.A_u F32 [u][d_in]     unshared rows of A      (only when u > 0)
//   prolora.layers.{i}.{t}.B_u F32 [u][d_out]    unshared columns of B, stored transposed (u > 0)
// (A0 and B0 are left out when u = r: that is plain LoRA.) The factors, truncated at d_in / d_out:
//   A[k][i*c_A + j] = A0[(k + i*s_A) mod r'][j]    k < r', i < m, j < c_A
//   B[i*c_B + j][k] = B0[j][(k + i*s_B) mod r']    k < r', i < n, j < c_B
//   A[r' + t][:] = A_u[t][:],  B[:][r' + t] = B_u[t][:]
//   y += (alpha / r) B A dropout(x)
// Init ("rectified"): A0 and A_u ~ U(+-1/sqrt(d_in)) with the fan of the full d_in, bf16-rounded;
// B0 = B_u = 0. Layer i's A0 then A_u are elements [i*P, (i+1)*P), P = r'*c_A + u*d_in, of LoRA's
// stream (RNG_INIT, seed, t, 0): with m = n = 1, PRoLoRA is LoRA of rank r bit for bit.
// Trainable per module: r'(c_A + c_B) + u(d_in + d_out); r = 4, u = 0, m = n = 2 is the LoRA r = 2 budget.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
#include "core/adapter_init.h"
#include "core/common.h"

typedef struct {
    int d_in, d_out, cA, cB, sA, sB;
} prolora_dims;

typedef struct {
    prolora_dims d[MOD_COUNT];
    int *tensor;  // [L][MOD_COUNT][4] tensor index of A0, B0, A_u, B_u (-1: absent or not adapted)
} prolora_impl;

static void prolora_dims_of(const adapter_spec *s, const llama_config *m, int t, prolora_dims *d) {
    int rs = s->r - s->prolora_unshared_r, mA = s->prolora_reduce_a, nB = s->prolora_reduce_b;
    llama_module_dims(m, t, &d->d_in, &d->d_out);
    d->cA = (d->d_in + mA - 1) / mA;
    d->cB = (d->d_out + nB - 1) / nB;
    d->sA = rs / mA > 1 ? rs / mA : 1;
    d->sB = rs / nB > 1 ? rs / nB : 1;
}

static int prolora_check(const adapter_spec *s, const llama_config *m) {
    if (s->prolora_unshared_r < 0 || s->prolora_unshared_r > s->r)
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.prolora_unshared_r: expected 0 <= u <= r = %d, got %d", s->r,
                          s->prolora_unshared_r);
    if (s->prolora_reduce_a < 1)
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.prolora_reduce_a: expected an integer >= 1, got %d", s->prolora_reduce_a);
    if (s->prolora_reduce_b < 1)
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.prolora_reduce_b: expected an integer >= 1, got %d", s->prolora_reduce_b);
    return MOSFT_OK;
}

static int64_t prolora_count_params(const adapter_spec *s, const llama_config *m) {
    int64_t n = 0, rs = s->r - s->prolora_unshared_r, u = s->prolora_unshared_r;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        prolora_dims d;
        prolora_dims_of(s, m, t, &d);
        n += (int64_t)m->n_layers * (rs * (d.cA + d.cB) + u * (d.d_in + d.d_out));
    }
    return n;
}

static inline int *prolora_slot(const adapter *a, int layer, int module) {
    return ((prolora_impl *)a->impl)->tensor + ((size_t)layer * MOD_COUNT + module) * 4;
}

static int prolora_init(adapter *a) {
    const adapter_spec *s = &a->spec;
    const llama_config *m = &a->model;
    int rc = prolora_check(s, m);
    if (rc) return rc;
    int L = m->n_layers, r = s->r, u = s->prolora_unshared_r, rs = r - u;
    a->rank = r;
    a->scaling = (float)(s->alpha / r);
    prolora_impl *im = xcalloc(1, sizeof *im);
    a->impl = im;
    im->tensor = xmalloc(sizeof(int) * (size_t)L * MOD_COUNT * 4);
    for (size_t e = 0; e < (size_t)L * MOD_COUNT * 4; e++) im->tensor[e] = -1;
    for (int t = 0; t < MOD_COUNT; t++)
        if (s->targets[t]) prolora_dims_of(s, m, t, &im->d[t]);
    // Layer-major, as PEFT's state dict.
    for (int i = 0; i < L; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            if (!s->targets[t]) continue;
            const prolora_dims *d = &im->d[t];
            int *slot = prolora_slot(a, i, t);
            char name[ADAPTER_NAME_MAX];
            const char *tn = k_module_names[t];
            if (rs > 0) {
                snprintf(name, sizeof name, "prolora.layers.%d.%s.A0", i, tn);
                slot[0] = adapter_add_tensor(a, name, 2, (int64_t[]){rs, d->cA});
                snprintf(name, sizeof name, "prolora.layers.%d.%s.B0", i, tn);
                slot[1] = adapter_add_tensor(a, name, 2, (int64_t[]){d->cB, rs});
            }
            if (u > 0) {
                snprintf(name, sizeof name, "prolora.layers.%d.%s.A_u", i, tn);
                slot[2] = adapter_add_tensor(a, name, 2, (int64_t[]){u, d->d_in});
                snprintf(name, sizeof name, "prolora.layers.%d.%s.B_u", i, tn);
                slot[3] = adapter_add_tensor(a, name, 2, (int64_t[]){u, d->d_out});
            }
        }
    adapter_alloc_params(a);
    if (a->loading) return MOSFT_OK;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        const prolora_dims *d = &im->d[t];
        uint64_t key = rng_key(RNG_INIT, s->seed, (uint64_t)t, 0, 0);
        double bound = 1.0 / sqrt((double)d->d_in);  // the rectified fan: the full d_in, not c_A
        size_t na0 = (size_t)rs * d->cA, nau = (size_t)u * d->d_in, per = na0 + nau;
        for (int i = 0; i < L; i++) {
            const int *slot = prolora_slot(a, i, t);
            if (slot[0] >= 0)
                adapter_init_lora_uniform(adapter_tensor_data(a, &a->tensors[slot[0]]), na0, key, (uint64_t)i * per, bound);
            if (slot[2] >= 0)
                adapter_init_lora_uniform(adapter_tensor_data(a, &a->tensors[slot[2]]), nau, key,
                                          (uint64_t)i * per + na0, bound);
        }
    }
    return MOSFT_OK;
}

static int prolora_attach(adapter *a) { return MOSFT_OK; }

static void prolora_build(const adapter *a, int layer, int module, float *A, float *B) {
    const prolora_impl *im = a->impl;
    const prolora_dims *d = &im->d[module];
    const int *slot = prolora_slot(a, layer, module);
    int r = a->rank, u = a->spec.prolora_unshared_r, rs = r - u, mA = a->spec.prolora_reduce_a,
        nB = a->spec.prolora_reduce_b;
    MOSFT_ASSERT(a->spec.targets[module] && layer >= 0 && layer < a->model.n_layers);
    if (rs > 0) {
        const float *A0 = adapter_tensor_data(a, &a->tensors[slot[0]]);  // [r'][c_A]
        const float *B0 = adapter_tensor_data(a, &a->tensors[slot[1]]);  // [c_B][r']
        for (int k = 0; k < rs; k++)
            for (int i = 0; i < mA; i++) {
                const float *src = A0 + (size_t)((k + i * d->sA) % rs) * d->cA;
                for (int j = 0; j < d->cA && i * d->cA + j < d->d_in; j++) A[(size_t)k * d->d_in + i * d->cA + j] = src[j];
            }
        for (int i = 0; i < nB; i++)
            for (int j = 0; j < d->cB && i * d->cB + j < d->d_out; j++) {
                float *dst = B + (size_t)(i * d->cB + j) * r;
                for (int k = 0; k < rs; k++) dst[k] = B0[(size_t)j * rs + (k + i * d->sB) % rs];
            }
    }
    if (u > 0) {
        const float *Au = adapter_tensor_data(a, &a->tensors[slot[2]]);  // [u][d_in]
        const float *Bu = adapter_tensor_data(a, &a->tensors[slot[3]]);  // [u][d_out]
        memcpy(A + (size_t)rs * d->d_in, Au, sizeof(float) * (size_t)u * d->d_in);
        for (int t = 0; t < u; t++)
            for (int o = 0; o < d->d_out; o++) B[(size_t)o * r + rs + t] = Bu[(size_t)t * d->d_out + o];
    }
}

// The transpose of build: every position of A and B adds into the chunk entry it was copied from.
static void prolora_scatter(const adapter *a, int layer, int module, const float *gA, const float *gB, float *grad) {
    const prolora_impl *im = a->impl;
    const prolora_dims *d = &im->d[module];
    const int *slot = prolora_slot(a, layer, module);
    int r = a->rank, u = a->spec.prolora_unshared_r, rs = r - u, mA = a->spec.prolora_reduce_a,
        nB = a->spec.prolora_reduce_b;
    MOSFT_ASSERT(a->spec.targets[module] && layer >= 0 && layer < a->model.n_layers);
    if (rs > 0) {
        float *gA0 = grad + a->tensors[slot[0]].offset, *gB0 = grad + a->tensors[slot[1]].offset;
        for (int k = 0; k < rs; k++)
            for (int i = 0; i < mA; i++) {
                float *dst = gA0 + (size_t)((k + i * d->sA) % rs) * d->cA;
                for (int j = 0; j < d->cA && i * d->cA + j < d->d_in; j++) dst[j] += gA[(size_t)k * d->d_in + i * d->cA + j];
            }
        for (int i = 0; i < nB; i++)
            for (int j = 0; j < d->cB && i * d->cB + j < d->d_out; j++) {
                const float *src = gB + (size_t)(i * d->cB + j) * r;
                for (int k = 0; k < rs; k++) gB0[(size_t)j * rs + (k + i * d->sB) % rs] += src[k];
            }
    }
    if (u > 0) {
        float *gAu = grad + a->tensors[slot[2]].offset, *gBu = grad + a->tensors[slot[3]].offset;
        for (size_t e = 0; e < (size_t)u * d->d_in; e++) gAu[e] += gA[(size_t)rs * d->d_in + e];
        for (int t = 0; t < u; t++)
            for (int o = 0; o < d->d_out; o++) gBu[(size_t)t * d->d_out + o] += gB[(size_t)o * r + rs + t];
    }
}

static void prolora_free_impl(adapter *a) {
    prolora_impl *im = a->impl;
    if (im) free(im->tensor);
    free(im);
    a->impl = NULL;
}

const adapter_ops adapter_ops_prolora = {
    .method = "prolora",
    .routed = 0,
    .init = prolora_init,
    .attach = prolora_attach,
    .build = prolora_build,
    .scatter = prolora_scatter,
    .free_impl = prolora_free_impl,
    .count_params = prolora_count_params,
    .check = prolora_check,
};
