// adapter_sira.c: SiRA (sparse mixture of low-rank adaptation, Zhu et al., arXiv 2311.09179;
// shared/docs/MOS.md section 5.5): E LoRA experts per adapted linear, a learned top-k gate with a
// capacity limit, and expert dropout on the gate. Token-routed: it has no per-layer Delta W, so the
// engine calls forward / backward here instead of build / scatter, and `mosft export` refuses it.
//
// Per layer i and type t (E = adapter.sira_experts):
//   sira.layers.{i}.{t}.A     F32 [E][r][d_in]    expert e's A_e
//   sira.layers.{i}.{t}.B     F32 [E][d_out][r]   expert e's B_e
//   sira.layers.{i}.{t}.gate  F32 [E][d_in]       W_g
// For the T tokens of one call (one micro-batch: the "group" of the capacity limit), token t with
// (dropped-out) input xd_t:
//   p_t = softmax(W_g xd_t)                                   over all E experts, in double
//   S_t = the k = sira_top_k experts of largest p_t (ties: the lower index), best first
//   capacity C = ceil(cf * k * T / E), cf = sira_capacity_factor: tokens are visited in order, each
//     with its S_t best first; an expert that already took C tokens is skipped by the rest
//   y_t += sum_{e in S_t kept} g_te * (alpha / r) B_e A_e xd_t,   g_te = p_te * m_te
// The gate weights are the full softmax's probabilities of the kept experts, NOT renormalized over
// the top-k (so the gate's gradient reaches every expert's logit, and a token whose experts are full
// simply gets less adapter). m_te is the expert dropout (training only, rate q = sira_expert_dropout):
// 0 with probability q, else 1/(1-q), element t*E + e of the Philox stream
// (RNG_GATE_DROPOUT, key) where `key` is the engine's per (step, micro-batch, layer, module) key; it
// acts after the routing, so a dropped expert still takes its capacity slot. Top-k and the capacity
// are piecewise constant in the inputs: the backward treats the routing as fixed (as every MoE does).
// Init: A_e as LoRA's A (U(+-1/sqrt(d_in)), bf16-rounded; element (i*E + e)*r*d_in + . of LoRA's stream
// (RNG_INIT, seed, t, 0), so with E = 1 the expert is LoRA's A), B_e = 0, W_g ~ U(+-1/sqrt(d_in))
// (torch's nn.Linear default), bf16-rounded, from (RNG_INIT, seed, t, 3). With E = k = 1 and cf >= 1,
// SiRA is LoRA (the same A, the same branch up to float rounding, no gate gradient).
// Trainable per module: E r (d_in + d_out) + E d_in.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
#include "core/adapter_init.h"
#include "core/common.h"

typedef struct {
    int *tensor;  // [L][MOD_COUNT] tensor index of A (B and gate follow), -1 if not adapted
} sira_impl;

static int sira_check(const adapter_spec *s, const llama_config *m) {
    if (s->sira_experts < 1)
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.sira_experts: expected an integer >= 1, got %d", s->sira_experts);
    if (s->sira_top_k < 1 || s->sira_top_k > s->sira_experts)
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.sira_top_k: expected 1 <= k <= adapter.sira_experts (%d), got %d",
                          s->sira_experts, s->sira_top_k);
    if (!(s->sira_capacity_factor > 0) || !isfinite(s->sira_capacity_factor))
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.sira_capacity_factor: expected a number > 0, got %g",
                          s->sira_capacity_factor);
    if (!(s->sira_expert_dropout >= 0 && s->sira_expert_dropout < 1))
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.sira_expert_dropout: expected a number in [0, 1), got %g",
                          s->sira_expert_dropout);
    return MOSFT_OK;
}

static int64_t sira_count_params(const adapter_spec *s, const llama_config *m) {
    int64_t n = 0, E = s->sira_experts;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        n += (int64_t)m->n_layers * (E * s->r * (di + dout) + E * di);
    }
    return n;
}

static int sira_init(adapter *a) {
    const adapter_spec *s = &a->spec;
    const llama_config *m = &a->model;
    int rc = sira_check(s, m);
    if (rc) return rc;
    int L = m->n_layers, r = s->r, E = s->sira_experts;
    a->rank = r;
    a->scaling = (float)(s->alpha / r);
    sira_impl *im = xcalloc(1, sizeof *im);
    a->impl = im;
    im->tensor = xmalloc(sizeof(int) * (size_t)L * MOD_COUNT);
    for (int i = 0; i < L; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            im->tensor[i * MOD_COUNT + t] = -1;
            if (!s->targets[t]) continue;
            int di, dout;
            llama_module_dims(m, t, &di, &dout);
            char name[ADAPTER_NAME_MAX];
            snprintf(name, sizeof name, "sira.layers.%d.%s.A", i, k_module_names[t]);
            im->tensor[i * MOD_COUNT + t] = adapter_add_tensor(a, name, 3, (int64_t[]){E, r, di});
            snprintf(name, sizeof name, "sira.layers.%d.%s.B", i, k_module_names[t]);
            adapter_add_tensor(a, name, 3, (int64_t[]){E, dout, r});
            snprintf(name, sizeof name, "sira.layers.%d.%s.gate", i, k_module_names[t]);
            adapter_add_tensor(a, name, 2, (int64_t[]){E, di});
        }
    adapter_alloc_params(a);
    if (a->loading) return MOSFT_OK;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        double bound = 1.0 / sqrt((double)di);
        size_t na = (size_t)E * r * di, ng = (size_t)E * di;
        for (int i = 0; i < L; i++) {
            int ti = im->tensor[i * MOD_COUNT + t];
            adapter_init_lora_uniform(adapter_tensor_data(a, &a->tensors[ti]), na,
                                      rng_key(RNG_INIT, s->seed, (uint64_t)t, 0, 0), (uint64_t)i * na, bound);
            adapter_init_lora_uniform(adapter_tensor_data(a, &a->tensors[ti + 2]), ng,
                                      rng_key(RNG_INIT, s->seed, (uint64_t)t, 3, 0), (uint64_t)i * ng, bound);
        }
    }
    return MOSFT_OK;
}

static int sira_attach(adapter *a) { return MOSFT_OK; }

// ---- routing -------------------------------------------------------------------------------------

typedef struct {
    int64_t T;
    int E, k, d_in, d_out, r;
    const float *A, *B, *Wg;  // [E][r][d_in], [E][d_out][r], [E][d_in]
    double *p;                // [T][E] gate probabilities
    int *sel;                 // [T][k] expert of each slot, -1 when over capacity
    float *mult;              // [T][k] expert-dropout multiplier of each slot
} sira_route;

// Experts per group: ceil(cf * k * T / E). The relative nudge keeps a product that is an integer in
// exact arithmetic (1.2 * 10 / 4 = 3) from rounding up to the next one.
static int64_t sira_capacity(double cf, int k, int64_t T, int E) {
    double c = cf * (double)k * (double)T / (double)E;
    return (int64_t)ceil(c * (1.0 - 1e-12));
}

static void sira_route_make(const adapter *a, int layer, int module, const float *xd, int64_t T, int training,
                            uint64_t key, const int32_t *tok_mask, sira_route *R) {
    const sira_impl *im = a->impl;
    int ti = im->tensor[layer * MOD_COUNT + module];
    MOSFT_ASSERT(ti >= 0);
    R->T = T;
    R->E = a->spec.sira_experts;
    R->k = a->spec.sira_top_k;
    R->r = a->rank;
    llama_module_dims(&a->model, module, &R->d_in, &R->d_out);
    R->A = adapter_tensor_data(a, &a->tensors[ti]);
    R->B = adapter_tensor_data(a, &a->tensors[ti + 1]);
    R->Wg = adapter_tensor_data(a, &a->tensors[ti + 2]);
    int E = R->E, k = R->k, di = R->d_in;
    R->p = xmalloc(sizeof(double) * (size_t)(T * E));
    R->sel = xmalloc(sizeof(int) * (size_t)(T * k));
    R->mult = xmalloc(sizeof(float) * (size_t)(T * k));
    // Padding rows are not tokens: they are not routed and do not count toward the capacity.
    int64_t T_real = T;
    if (tok_mask) {
        T_real = 0;
        for (int64_t t = 0; t < T; t++) T_real += tok_mask[t] != 0;
    }
    int64_t C = sira_capacity(a->spec.sira_capacity_factor, k, T_real, E);
    int64_t *load = xcalloc((size_t)E, sizeof(int64_t));
    double q = training ? a->spec.sira_expert_dropout : 0.0;
    uint32_t thr = rng_dropout_threshold((float)q);
    uint64_t gkey = rng_key(RNG_GATE_DROPOUT, key, 0, 0, 0);
    for (int64_t t = 0; t < T; t++) {
        const float *x = xd + t * di;
        double *p = R->p + t * E, zmax = -INFINITY, sum = 0;
        for (int e = 0; e < E; e++) {
            double z = 0;
            for (int c = 0; c < di; c++) z += (double)R->Wg[(size_t)e * di + c] * x[c];
            p[e] = z;
            if (z > zmax) zmax = z;
        }
        for (int e = 0; e < E; e++) sum += p[e] = exp(p[e] - zmax);
        for (int e = 0; e < E; e++) p[e] /= sum;
        // Top-k, best first; strict > keeps the lower index on ties.
        int *sel = R->sel + t * k;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int jj = 0; jj < j; jj++) taken |= sel[jj] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            sel[j] = best;
        }
        // Capacity in token order, then expert dropout on the kept slots.
        for (int j = 0; j < k; j++) {
            int e = sel[j];
            if (load[e] >= C || (tok_mask && !tok_mask[t])) {
                sel[j] = -1;
                R->mult[t * k + j] = 0.0f;
                continue;
            }
            load[e]++;
            R->mult[t * k + j] =
                q > 0 ? (rng_keep(gkey, (uint64_t)(t * E + e), thr) ? (float)(1.0 / (1.0 - q)) : 0.0f) : 1.0f;
        }
    }
    free(load);
}

static void sira_route_free(sira_route *R) {
    free(R->p);
    free(R->sel);
    free(R->mult);
}

// h[r] = A_e x;  o[d_out] = B_e h.
static void sira_expert(const sira_route *R, int e, const float *x, double *h, double *o) {
    int r = R->r, di = R->d_in, dout = R->d_out;
    const float *Ae = R->A + (size_t)e * r * di, *Be = R->B + (size_t)e * dout * r;
    for (int kk = 0; kk < r; kk++) {
        double acc = 0;
        for (int c = 0; c < di; c++) acc += (double)Ae[(size_t)kk * di + c] * x[c];
        h[kk] = acc;
    }
    for (int oo = 0; oo < dout; oo++) {
        double acc = 0;
        for (int kk = 0; kk < r; kk++) acc += (double)Be[(size_t)oo * r + kk] * h[kk];
        o[oo] = acc;
    }
}

// ---- forward / backward --------------------------------------------------------------------------

static void sira_forward(const adapter *a, int layer, int module, const float *xd, int64_t T, float *y, int training,
                         uint64_t key, const int32_t *tok_mask) {
    sira_route R;
    sira_route_make(a, layer, module, xd, T, training, key, tok_mask, &R);
    double s = a->scaling;
    double *h = xmalloc(sizeof(double) * (size_t)R.r), *o = xmalloc(sizeof(double) * (size_t)R.d_out);
    double *acc = xmalloc(sizeof(double) * (size_t)R.d_out);
    for (int64_t t = 0; t < T; t++) {
        memset(acc, 0, sizeof(double) * (size_t)R.d_out);
        for (int j = 0; j < R.k; j++) {
            int e = R.sel[t * R.k + j];
            if (e < 0 || R.mult[t * R.k + j] == 0.0f) continue;
            double g = R.p[t * R.E + e] * R.mult[t * R.k + j];
            sira_expert(&R, e, xd + t * R.d_in, h, o);
            for (int oo = 0; oo < R.d_out; oo++) acc[oo] += g * o[oo];
        }
        for (int oo = 0; oo < R.d_out; oo++) y[t * R.d_out + oo] += (float)(s * acc[oo]);
    }
    free(h);
    free(o);
    free(acc);
    sira_route_free(&R);
}

// With g_te = p_te m_te for the kept slots (fixed routing):
//   dL/dg_te = s gy_t . (B_e A_e xd_t)          dL/dp_te = m_te dL/dg_te (0 for experts not kept)
//   dL/dB_e += g_te s gy_t h^T,  gh = g_te s B_e^T gy_t,  dL/dA_e += gh xd_t^T,  dL/dxd_t += A_e^T gh
//   softmax: dL/dz_tj = p_tj (dL/dp_tj - sum_e p_te dL/dp_te);  dL/dW_g += dz xd_t^T;  dL/dxd_t += W_g^T dz
static void sira_backward(const adapter *a, int layer, int module, const float *xd, const float *gy, int64_t T,
                          float *gxd, float *grad, int training, uint64_t key, const int32_t *tok_mask) {
    sira_route R;
    sira_route_make(a, layer, module, xd, T, training, key, tok_mask, &R);
    const sira_impl *im = a->impl;
    int ti = im->tensor[layer * MOD_COUNT + module];
    float *gA = grad + a->tensors[ti].offset, *gB = grad + a->tensors[ti + 1].offset,
          *gW = grad + a->tensors[ti + 2].offset;
    int E = R.E, k = R.k, r = R.r, di = R.d_in, dout = R.d_out;
    double s = a->scaling;
    double *h = xmalloc(sizeof(double) * (size_t)r), *o = xmalloc(sizeof(double) * (size_t)dout);
    double *gh = xmalloc(sizeof(double) * (size_t)r), *gp = xmalloc(sizeof(double) * (size_t)E);
    double *gz = xmalloc(sizeof(double) * (size_t)E), *gx = xmalloc(sizeof(double) * (size_t)di);
    for (int64_t t = 0; t < T; t++) {
        const float *x = xd + t * di, *g = gy + t * dout;
        const double *p = R.p + t * E;
        memset(gp, 0, sizeof(double) * (size_t)E);
        memset(gx, 0, sizeof(double) * (size_t)di);
        for (int j = 0; j < k; j++) {
            int e = R.sel[t * k + j];
            float m = R.mult[t * k + j];
            if (e < 0 || m == 0.0f) continue;
            double w = p[e] * m;
            sira_expert(&R, e, x, h, o);
            double go = 0;
            for (int oo = 0; oo < dout; oo++) go += (double)g[oo] * o[oo];
            gp[e] = m * s * go;
            const float *Ae = R.A + (size_t)e * r * di, *Be = R.B + (size_t)e * dout * r;
            float *gAe = gA + (size_t)e * r * di, *gBe = gB + (size_t)e * dout * r;
            for (int kk = 0; kk < r; kk++) {
                double acc = 0;
                for (int oo = 0; oo < dout; oo++) acc += (double)Be[(size_t)oo * r + kk] * g[oo];
                gh[kk] = w * s * acc;
            }
            for (int oo = 0; oo < dout; oo++)
                for (int kk = 0; kk < r; kk++) gBe[(size_t)oo * r + kk] += (float)(w * s * g[oo] * h[kk]);
            for (int kk = 0; kk < r; kk++)
                for (int c = 0; c < di; c++) {
                    gAe[(size_t)kk * di + c] += (float)(gh[kk] * x[c]);
                    gx[c] += gh[kk] * Ae[(size_t)kk * di + c];
                }
        }
        double dot = 0;
        for (int e = 0; e < E; e++) dot += p[e] * gp[e];
        for (int e = 0; e < E; e++) gz[e] = p[e] * (gp[e] - dot);
        for (int e = 0; e < E; e++)
            for (int c = 0; c < di; c++) {
                gW[(size_t)e * di + c] += (float)(gz[e] * x[c]);
                gx[c] += gz[e] * R.Wg[(size_t)e * di + c];
            }
        for (int c = 0; c < di; c++) gxd[t * di + c] += (float)gx[c];
    }
    free(h), free(o), free(gh), free(gp), free(gz), free(gx);
    sira_route_free(&R);
}

static void sira_free_impl(adapter *a) {
    sira_impl *im = a->impl;
    if (im) free(im->tensor);
    free(im);
    a->impl = NULL;
}

const adapter_ops adapter_ops_sira = {
    .method = "sira",
    .routed = 1,
    .init = sira_init,
    .attach = sira_attach,
    .forward = sira_forward,
    .backward = sira_backward,
    .free_impl = sira_free_impl,
    .count_params = sira_count_params,
    .check = sira_check,
};
