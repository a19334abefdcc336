// adapter_vera.c: VeRA (vector-based random matrix adaptation, Kopiczko et al. 2024), as HF PEFT's
// tuners/vera builds it (shared/docs/MOS.md section 5.2).
//
//   vera.A                        F32 [r][D_in]   frozen random, shared by every adapted linear
//   vera.B                        F32 [D_out][r]  frozen random, shared
//   vera.layers.{i}.{t}.lambda_b  F32 [d_out]     trainable, init 0
//   vera.layers.{i}.{t}.lambda_d  F32 [r]         trainable, init adapter.vera_d_initial
// D_in / D_out are the largest d_in / d_out of the adapted types; a linear uses the slices
// A[:, :d_in] and B[:d_out, :] (PEFT's sliced_A / sliced_B). The factors, with no alpha / r
// (a->scaling = 1):
//   A_eff = diag(lambda_d) A[:, :d_in],  B_eff = diag(lambda_b) B[:d_out, :]
//   y += B_eff A_eff dropout(x) = Lambda_b B Lambda_d A dropout(x)
// Init of the projections: kaiming-uniform with gain sqrt(2), i.e. U(+-sqrt(6 / fan_in)) with fan_in
// D_in for A and r for B, as PEFT's _kaiming_init. PEFT draws them from a torch.Generator seeded with
// projection_prng_key; torch's stream cannot be reproduced in C, so mosft draws them from its own
// Philox streams (RNG_INIT, vera_projection_seed, VERA_STREAM, 0 for A | 1 for B), element e = the
// e-th value in row-major order, and stores both in adapter.mos (never regenerated on load). The same
// projection seed gives the same projections on every machine, but not PEFT's.
// Trainable: L * sum_t (r + d_out); Llama-2-7B, r = 256: 1,417,216.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
#include "core/adapter_init.h"
#include "core/common.h"

#define VERA_STREAM 0x7645524155ull  // "vERAU": a stream id no module index uses

typedef struct {
    int D_in, D_out;
    int buf_a, buf_b;  // buffer indices of vera.A, vera.B
    int *tensor;       // [L][MOD_COUNT] tensor index of lambda_b (lambda_d follows), -1 if not adapted
} vera_impl;

static int64_t vera_count_params(const adapter_spec *s, const llama_config *m) {
    int64_t n = 0;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        n += (int64_t)m->n_layers * (s->r + dout);
    }
    return n;
}

static int vera_check(const adapter_spec *s, const llama_config *m) {
    if (!isfinite(s->vera_d_initial))
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.vera_d_initial: expected a finite number, got %g", s->vera_d_initial);
    return MOSFT_OK;
}

static int vera_init(adapter *a) {
    const adapter_spec *s = &a->spec;
    const llama_config *m = &a->model;
    int rc = vera_check(s, m);
    if (rc) return rc;
    int L = m->n_layers, r = s->r;
    a->rank = r;
    a->scaling = 1.0f;  // VeRA has no alpha / r: the trained vectors carry the scale
    vera_impl *im = xcalloc(1, sizeof *im);
    a->impl = im;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        if (di > im->D_in) im->D_in = di;
        if (dout > im->D_out) im->D_out = dout;
    }
    im->tensor = xmalloc(sizeof(int) * (size_t)L * MOD_COUNT);
    for (int i = 0; i < L; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            im->tensor[i * MOD_COUNT + t] = -1;
            if (!s->targets[t]) continue;
            int di, dout;
            llama_module_dims(m, t, &di, &dout);
            char name[ADAPTER_NAME_MAX];
            snprintf(name, sizeof name, "vera.layers.%d.%s.lambda_b", i, k_module_names[t]);
            im->tensor[i * MOD_COUNT + t] = adapter_add_tensor(a, name, 1, (int64_t[]){dout});
            snprintf(name, sizeof name, "vera.layers.%d.%s.lambda_d", i, k_module_names[t]);
            adapter_add_tensor(a, name, 1, (int64_t[]){r});
        }
    im->buf_a = adapter_add_buffer(a, "vera.A", MOSFT_F32, 2, (int64_t[]){r, im->D_in});
    im->buf_b = adapter_add_buffer(a, "vera.B", MOSFT_F32, 2, (int64_t[]){im->D_out, r});
    adapter_alloc_params(a);
    if (a->loading) return MOSFT_OK;
    uint64_t seed = s->vera_projection_seed;
    adapter_init_uniform((float *)a->buffers[im->buf_a].data, (size_t)r * im->D_in,
                         rng_key(RNG_INIT, seed, VERA_STREAM, 0, 0), 0, sqrt(6.0 / im->D_in));
    adapter_init_uniform((float *)a->buffers[im->buf_b].data, (size_t)im->D_out * r,
                         rng_key(RNG_INIT, seed, VERA_STREAM, 1, 0), 0, sqrt(6.0 / r));
    for (int i = 0; i < L; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            int ti = im->tensor[i * MOD_COUNT + t];
            if (ti < 0) continue;  // lambda_b stays 0: Delta W = 0 at step 0
            adapter_init_fill(adapter_tensor_data(a, &a->tensors[ti + 1]), (size_t)r, (float)s->vera_d_initial);
        }
    return MOSFT_OK;
}

static void vera_build(const adapter *a, int layer, int module, float *A, float *B) {
    const vera_impl *im = a->impl;
    int ti = im->tensor[layer * MOD_COUNT + module], r = a->rank, di, dout;
    MOSFT_ASSERT(ti >= 0);
    llama_module_dims(&a->model, module, &di, &dout);
    const float *lb = adapter_tensor_data(a, &a->tensors[ti]);      // [d_out]
    const float *ld = adapter_tensor_data(a, &a->tensors[ti + 1]);  // [r]
    const float *PA = a->buffers[im->buf_a].data;                   // [r][D_in]
    const float *PB = a->buffers[im->buf_b].data;                   // [D_out][r]
    for (int k = 0; k < r; k++)
        for (int c = 0; c < di; c++) A[(size_t)k * di + c] = ld[k] * PA[(size_t)k * im->D_in + c];
    for (int o = 0; o < dout; o++)
        for (int k = 0; k < r; k++) B[(size_t)o * r + k] = lb[o] * PB[(size_t)o * r + k];
}

// dL/dlambda_d[k] = sum_c dL/dA_eff[k][c] A[k][c];  dL/dlambda_b[o] = sum_k dL/dB_eff[o][k] B[o][k].
static void vera_scatter(const adapter *a, int layer, int module, const float *gA, const float *gB, float *grad) {
    const vera_impl *im = a->impl;
    int ti = im->tensor[layer * MOD_COUNT + module], r = a->rank, di, dout;
    MOSFT_ASSERT(ti >= 0);
    llama_module_dims(&a->model, module, &di, &dout);
    float *glb = grad + a->tensors[ti].offset, *gld = grad + a->tensors[ti + 1].offset;
    const float *PA = a->buffers[im->buf_a].data, *PB = a->buffers[im->buf_b].data;
    for (int k = 0; k < r; k++) {
        double acc = 0;
        for (int c = 0; c < di; c++) acc += (double)gA[(size_t)k * di + c] * PA[(size_t)k * im->D_in + c];
        gld[k] += (float)acc;
    }
    for (int o = 0; o < dout; o++) {
        double acc = 0;
        for (int k = 0; k < r; k++) acc += (double)gB[(size_t)o * r + k] * PB[(size_t)o * r + k];
        glb[o] += (float)acc;
    }
}

static void vera_free_impl(adapter *a) {
    vera_impl *im = a->impl;
    if (im) free(im->tensor);
    free(im);
    a->impl = NULL;
}

const adapter_ops adapter_ops_vera = {
    .method = "vera",
    .routed = 0,
    .init = vera_init,
    .attach = adapter_check_buffers_finite,
    .build = vera_build,
    .scatter = vera_scatter,
    .free_impl = vera_free_impl,
    .count_params = vera_count_params,
    .check = vera_check,
};
