// ops_attention_cpu.c: causal grouped-query attention with a key padding mask, forward and backward
// (see ops_cpu.h). One query row at a time, exactly as the formulas read; nothing is saved by the
// forward: the backward recomputes each row's probabilities with the same helper, bit for bit.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/ops_cpu.h"

// Probabilities of one query row i over keys 0..i:
//   s_j = (q . k_j) / sqrt(D) for allowed keys (mask[j] != 0), p = softmax(s), p_j = 0 for masked keys
//   and for keys more than 46 below the row's maximum score (weight < 1e-20).
// qi[D]; k0 = k of key 0 of this sequence and kv head, consecutive keys kstride floats apart;
// mask[S] of this sequence (NULL = all real); p[i+1] out. Returns 0 when no key is allowed (p unset).
static int attn_row_probs(float *p, const float *qi, const float *k0, int64_t kstride, const int32_t *mask, int i,
                          int D, float scale) {
    float mx = -INFINITY;
    int any = 0;
    for (int j = 0; j <= i; j++) {
        if (mask && !mask[j]) continue;
        const float *kj = k0 + (int64_t)j * kstride;
        float dot = 0.0f;
        for (int d = 0; d < D; d++) dot += qi[d] * kj[d];
        float s = dot * scale;
        p[j] = s;
        if (s > mx) mx = s;
        any = 1;
    }
    if (!any) return 0;
    double sum = 0.0;
    for (int j = 0; j <= i; j++) {
        if (mask && !mask[j]) {
            p[j] = 0.0f;
            continue;
        }
        // exp(-46) ~ 1e-20: such a weight cannot change an fp32 output, and letting it through would
        // make subnormal floats (here or in p*v), which are ~50x slower on x86; it is exactly 0.
        float e = p[j] - mx;
        p[j] = e < -46.0f ? 0.0f : expf(e);
        sum += p[j];
    }
    for (int j = 0; j <= i; j++) p[j] = (float)((double)p[j] / sum);
    return 1;
}

void attention_forward_cpu(float *out, const float *q, const float *k, const float *v, const int32_t *mask, int B,
                           int S, int Hq, int Hkv, int D) {
    MOSFT_ASSERT(Hkv > 0 && Hq % Hkv == 0);
    int group = Hq / Hkv;
    int64_t qstride = (int64_t)Hq * D, kstride = (int64_t)Hkv * D;
    float scale = (float)(1.0 / sqrt((double)D));
    int64_t work = (int64_t)B * Hq * S * S * D;
#pragma omp parallel num_threads(ops_cpu_threads()) if (work >= 262144)
    {
        float *p = xmalloc((size_t)S * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < (int64_t)B * Hq; bh++) {
            int b = (int)(bh / Hq), h = (int)(bh % Hq), kvh = h / group;
            const int32_t *mb = mask ? mask + (int64_t)b * S : NULL;
            const float *k0 = k + (int64_t)b * S * kstride + (int64_t)kvh * D;
            const float *v0 = v + (int64_t)b * S * kstride + (int64_t)kvh * D;
            for (int i = 0; i < S; i++) {
                const float *qi = q + ((int64_t)b * S + i) * qstride + (int64_t)h * D;
                float *oi = out + ((int64_t)b * S + i) * qstride + (int64_t)h * D;
                memset(oi, 0, (size_t)D * sizeof(float));
                if (!attn_row_probs(p, qi, k0, kstride, mb, i, D, scale)) continue;
                for (int j = 0; j <= i; j++) {
                    if (p[j] == 0.0f) continue;  // masked (or underflowed: adds exactly 0 either way)
                    const float *vj = v0 + (int64_t)j * kstride;
                    for (int d = 0; d < D; d++) oi[d] += p[j] * vj[d];
                }
            }
        }
        free(p);
    }
}

// Per row i (o = sum_j p_j v_j, p = softmax(s), s_j = scale q.k_j):
//   dp_j = gout . v_j;  ds_j = p_j (dp_j - sum_l p_l dp_l)
//   gq_i += scale sum_j ds_j k_j;  gk_j += scale ds_j q_i;  gv_j += p_j gout_i
void attention_backward_cpu(float *gq, float *gk, float *gv, const float *gout, const float *q, const float *k,
                            const float *v, const int32_t *mask, int B, int S, int Hq, int Hkv, int D) {
    MOSFT_ASSERT(Hkv > 0 && Hq % Hkv == 0);
    int group = Hq / Hkv;
    int64_t qstride = (int64_t)Hq * D, kstride = (int64_t)Hkv * D;
    float scale = (float)(1.0 / sqrt((double)D));
    int64_t work = (int64_t)B * Hq * S * S * D;
    // One (sequence, kv head) per iteration: all writes to its slices of gk/gv (and to gq of its query
    // heads) come from this iteration, in the order h, i, j ascending.
#pragma omp parallel num_threads(ops_cpu_threads()) if (work >= 262144)
    {
        float *p = xmalloc((size_t)S * sizeof(float));
        float *ds = xmalloc((size_t)S * sizeof(float));
        float *acc = xmalloc((size_t)D * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t bg = 0; bg < (int64_t)B * Hkv; bg++) {
            int b = (int)(bg / Hkv), kvh = (int)(bg % Hkv);
            const int32_t *mb = mask ? mask + (int64_t)b * S : NULL;
            int64_t kvoff = (int64_t)b * S * kstride + (int64_t)kvh * D;
            const float *k0 = k + kvoff, *v0 = v + kvoff;
            float *gk0 = gk + kvoff, *gv0 = gv + kvoff;
            for (int h = kvh * group; h < (kvh + 1) * group; h++) {
                for (int i = 0; i < S; i++) {
                    int64_t qoff = ((int64_t)b * S + i) * qstride + (int64_t)h * D;
                    const float *qi = q + qoff, *go = gout + qoff;
                    if (!attn_row_probs(p, qi, k0, kstride, mb, i, D, scale)) continue;
                    double pdp = 0.0;
                    for (int j = 0; j <= i; j++) {
                        if (p[j] == 0.0f) {
                            ds[j] = 0.0f;
                            continue;
                        }
                        const float *vj = v0 + (int64_t)j * kstride;
                        float dot = 0.0f;
                        for (int d = 0; d < D; d++) dot += go[d] * vj[d];
                        ds[j] = dot;  // dp_j for now
                        pdp += (double)p[j] * dot;
                    }
                    float dsum = (float)pdp;
                    memset(acc, 0, (size_t)D * sizeof(float));
                    for (int j = 0; j <= i; j++) {
                        if (p[j] == 0.0f) continue;
                        ds[j] = p[j] * (ds[j] - dsum);
                        const float *kj = k0 + (int64_t)j * kstride;
                        float *gkj = gk0 + (int64_t)j * kstride, *gvj = gv0 + (int64_t)j * kstride;
                        float sds = scale * ds[j];
                        for (int d = 0; d < D; d++) {
                            acc[d] += ds[j] * kj[d];
                            gkj[d] += sds * qi[d];
                            gvj[d] += p[j] * go[d];
                        }
                    }
                    float *gqi = gq + qoff;
                    for (int d = 0; d < D; d++) gqi[d] += scale * acc[d];
                }
            }
        }
        free(p);
        free(ds);
        free(acc);
    }
}
