// adapter_mos.c: Mixture of Shards (Wang et al., ICLR 2025), as the authors' released code builds it
// (shared/docs/MOS.md sections 1-3 and 7), and its ablations.
//
// Per adapted linear type t (q, k, v, o, gate, up, down), shared by all L layers:
//   N = R_v * L * l shards per pool, s_a = d_in / l, s_b = d_out / l
//   mos.t.pool_A  F32 [N][s_a]     row n = A-shard n
//   mos.t.pool_B  F32 [N][s_b]     row n = B-shard n (the transpose of torch's nn.Linear(N, s_b).weight)
//   mos.t.index_A I32 [L][r*l]     frozen index tables (drawn once, saved, never regenerated)
//   mos.t.index_B I32 [L][r*l]
//   mos.t.scale   F32 [L][r]       only for the random-scaling ablation (scale_std > 0)
// Shards [0, P) with P = (R_v - R_p) * L * l are public; layer i owns [P + i*R_p*l, P + (i+1)*R_p*l).
// Layer i's factors (MOS.md 1.5):
//   A^i[k][j*s_a + c] = c_k * PoolA[I_a[i][k*l + j]][c]       A^i: r x d_in
//   B^i[j*s_b + c][k] =       PoolB[I_b[i][k*l + j]][c]       B^i: d_out x r
//   y += (alpha / r) * B^i A^i dropout(x)
// A table is (r - R_p)*l public shards drawn without repetition (a partial Fisher-Yates over [0, P)
// from the rng.h stream keyed (RNG_INDEX, seed, module, layer, A=0|B=1)), then layer i's R_p*l
// private shards in order. Without pair dissociation I_b = I_a (the A draw).
//
// Initialization (MOS.md 1.7): PoolA ~ U(-1/sqrt(d_in), +1/sqrt(d_in)), each value rounded to the
// nearest bf16 (the reference casts the pools to bf16 and back after init), PoolB = 0. Element e of
// PoolA_t is element e of the stream (RNG_INIT, seed, t, 0): LoRA draws its A from the same stream, so
// MoS with R_p = R_v = r is bit-identical to LoRA of rank r from the same seed, for any l.
//
// Ablations (MOS.md section 3; the spec is normalized in place, and saved normalized):
//   pair_dissociation = false  I_b = I_a                                       (MoS^-pd)
//   shards = 1                 whole vectors                                   (MoS^-vs)
//   private_rank = 0           no private shards                               (MoS^-sp)
//   pure_sharing               l = 1, R_p = 0, r = R_v * L, I_a = I_b = 0..N-1 in every layer: every
//                              layer has the same Delta W = (alpha / (R_v L)) PoolB^T PoolA
//   subset_selection           l = 1, R_p = 0, I_b = I_a (r random vector pairs per layer)
//   scale_std > 0              random scaling: c^i_k = v / mu, v ~ N(mu, sigma^2), frozen
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
#include "core/common.h"
#include "core/rng.h"

typedef struct {
    int on;
    int d_in, d_out, sa, sb;  // sa = d_in / l, sb = d_out / l
    int64_t N, P, n_priv;     // shards per pool, public shards, private shards per layer
    int pool_a, pool_b;       // tensor indices
    int index_a, index_b;     // buffer indices
    int scale;                // buffer index, -1 without random scaling
} mos_module;

typedef struct {
    mos_module m[MOD_COUNT];
} mos_impl;

// Apply the ablation switches to a spec: they fix l, R_p (and r for pure sharing).
static void mos_spec_normalize(adapter_spec *s, const llama_config *m) {
    if (s->pure_sharing) {
        s->shards = 1;
        s->private_rank = 0;
        s->r = s->equiv_rank * m->n_layers;
    }
    if (s->subset_selection) {
        s->shards = 1;
        s->private_rank = 0;
        s->pair_dissociation = 0;
    }
}

static int64_t gcd64(int64_t a, int64_t b) {
    while (b) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

static int mos_check(const adapter_spec *spec, const llama_config *m) {
    adapter_spec s = *spec;
    mos_spec_normalize(&s, m);
    int64_t L = m->n_layers, Rv = s.equiv_rank, Rp = s.private_rank, r = s.r, l = s.shards;
    if (Rv < 1) return mosft_fail(MOSFT_ERR_INPUT, "adapter.equiv_rank: expected R_v >= 1, got %lld", (long long)Rv);
    if (l < 1) return mosft_fail(MOSFT_ERR_INPUT, "adapter.shards: expected l >= 1, got %lld", (long long)l);
    if (s.pure_sharing && s.subset_selection)
        return mosft_fail(MOSFT_ERR_INPUT, "adapter: pure_sharing and subset_selection exclude each other");
    if (!(s.scale_mean > 0) || !(s.scale_std >= 0))
        return mosft_fail(MOSFT_ERR_INPUT, "adapter.scale_mean, adapter.scale_std: expected mean > 0 and std >= 0, got %g and %g",
                          s.scale_mean, s.scale_std);
    // l | d_in and d_out of every adapted type: a shard never straddles two vectors' blocks.
    int64_t g = 0;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s.targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        g = gcd64(g, gcd64(di, dout));
    }
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s.targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        if (di % l == 0 && dout % l == 0) continue;
        char hint[160];
        snprintf(hint, sizeof hint, "l can be any divisor of %lld (the gcd of the adapted linears' widths on this model)",
                 (long long)g);
        return mosft_fail_hint(MOSFT_ERR_INPUT, hint,
                               "adapter.shards: expected l to divide d_in and d_out of every adapted linear, got l = "
                               "%lld; %s_proj is %d -> %d on this model (hidden %d, intermediate %d, %d heads, %d kv "
                               "heads, head_dim %d)",
                               (long long)l, k_module_names[t], di, dout, m->hidden, m->intermediate, m->n_heads,
                               m->n_kv_heads, m->head_dim);
    }
    int64_t lim = Rv < r ? Rv : r;
    if (Rp < 0 || Rp > lim)
        return mosft_fail(MOSFT_ERR_INPUT,
                          "adapter.private_rank: expected 0 <= R_p <= min(R_v, r) = min(%lld, %lld) = %lld, got %lld",
                          (long long)Rv, (long long)r, (long long)lim, (long long)Rp);
    int64_t P = (Rv - Rp) * L * l;
    if ((r - Rp) * l > P) {
        if (Rp == Rv)
            return mosft_fail(MOSFT_ERR_INPUT,
                              "adapter.r: expected r = R_v = %lld when R_p = R_v (every vector is private, no public "
                              "shards to draw from), got r = %lld",
                              (long long)Rv, (long long)r);
        return mosft_fail(MOSFT_ERR_INPUT,
                          "adapter.r: expected r - R_p <= (R_v - R_p) * layers = (%lld - %lld) * %lld = %lld (each layer "
                          "draws (r - R_p) * l = %lld distinct public shards out of P = %lld), got r = %lld",
                          (long long)Rv, (long long)Rp, (long long)L, (long long)((Rv - Rp) * L),
                          (long long)((r - Rp) * l), (long long)P, (long long)r);
    }
    if (Rv * L * l > INT32_MAX || r * l > INT32_MAX)
        return mosft_fail(MOSFT_ERR_INPUT, "adapter: R_v * layers * l = %lld shards do not fit 32-bit index tables",
                          (long long)(Rv * L * l));
    return MOSFT_OK;
}

static int64_t mos_count_params(const adapter_spec *s, const llama_config *m) {
    // N * (d_in/l + d_out/l) = R_v * L * (d_in + d_out) per type: independent of r, l and R_p.
    int64_t n = 0;
    for (int t = 0; t < MOD_COUNT; t++) {
        if (!s->targets[t]) continue;
        int di, dout;
        llama_module_dims(m, t, &di, &dout);
        n += (int64_t)s->equiv_rank * m->n_layers * (di + dout);
    }
    return n;
}

// Layer `layer`'s table for one pool: public shards drawn without repetition, then the private ones.
// `perm` [P] is scratch holding the identity on entry and on exit; `swaps` [n_pub] is scratch.
static void mos_draw_table(int32_t *tab, const mos_module *mm, int64_t n_pub, int layer, uint64_t key, int32_t *perm,
                           int64_t *swaps) {
    uint64_t ctr = 0;
    // Partial Fisher-Yates: position j takes a uniform pick among the P - j values not yet taken.
    for (int64_t j = 0; j < n_pub; j++) {
        int64_t k = j + (int64_t)rng_below(key, &ctr, (uint32_t)(mm->P - j));
        int32_t tmp = perm[j];
        perm[j] = perm[k];
        perm[k] = tmp;
        tab[j] = perm[j];
        swaps[j] = k;
    }
    // Undo the swaps in reverse: perm is the identity again in O(n_pub), not O(P).
    for (int64_t j = n_pub - 1; j >= 0; j--) {
        int32_t tmp = perm[j];
        perm[j] = perm[swaps[j]];
        perm[swaps[j]] = tmp;
    }
    for (int64_t j = 0; j < mm->n_priv; j++) tab[n_pub + j] = (int32_t)(mm->P + (int64_t)layer * mm->n_priv + j);
}

static inline float *mos_pool(const adapter *a, int tensor) { return a->params + a->tensors[tensor].offset; }
static inline int32_t *mos_table(const adapter *a, int buffer, int layer) {
    return (int32_t *)a->buffers[buffer].data + (size_t)layer * (size_t)a->rank * (size_t)a->spec.shards;
}

static int mos_init(adapter *a) {
    adapter_spec *s = &a->spec;
    const llama_config *m = &a->model;
    mos_spec_normalize(s, m);
    int rc = mos_check(s, m);
    if (rc) return rc;
    int L = m->n_layers, l = s->shards, r = s->r;
    a->rank = r;
    a->scaling = (float)(s->alpha / r);
    mos_impl *im = xcalloc(1, sizeof *im);
    a->impl = im;
    for (int t = 0; t < MOD_COUNT; t++) {
        mos_module *mm = &im->m[t];
        mm->scale = -1;
        if (!s->targets[t]) continue;
        mm->on = 1;
        llama_module_dims(m, t, &mm->d_in, &mm->d_out);
        mm->sa = mm->d_in / l;
        mm->sb = mm->d_out / l;
        mm->N = (int64_t)s->equiv_rank * L * l;
        mm->P = (int64_t)(s->equiv_rank - s->private_rank) * L * l;
        mm->n_priv = (int64_t)s->private_rank * l;
        char name[ADAPTER_NAME_MAX];
        snprintf(name, sizeof name, "mos.%s.pool_A", k_module_names[t]);
        mm->pool_a = adapter_add_tensor(a, name, 2, (int64_t[]){mm->N, mm->sa});
        snprintf(name, sizeof name, "mos.%s.pool_B", k_module_names[t]);
        mm->pool_b = adapter_add_tensor(a, name, 2, (int64_t[]){mm->N, mm->sb});
        snprintf(name, sizeof name, "mos.%s.index_A", k_module_names[t]);
        mm->index_a = adapter_add_buffer(a, name, MOSFT_I32, 2, (int64_t[]){L, (int64_t)r * l});
        snprintf(name, sizeof name, "mos.%s.index_B", k_module_names[t]);
        mm->index_b = adapter_add_buffer(a, name, MOSFT_I32, 2, (int64_t[]){L, (int64_t)r * l});
        if (s->scale_std > 0) {
            snprintf(name, sizeof name, "mos.%s.scale", k_module_names[t]);
            mm->scale = adapter_add_buffer(a, name, MOSFT_F32, 2, (int64_t[]){L, r});
        }
    }
    adapter_alloc_params(a);
    if (a->loading) return MOSFT_OK;

    for (int t = 0; t < MOD_COUNT; t++) {
        mos_module *mm = &im->m[t];
        if (!mm->on) continue;
        // PoolA ~ U(+-1/sqrt(d_in)) rounded to bf16; PoolB = 0 (already zero).
        float *pa = mos_pool(a, mm->pool_a);
        uint64_t key = rng_key(RNG_INIT, s->seed, (uint64_t)t, 0, 0);
        double bound = 1.0 / sqrt((double)mm->d_in);
        size_t n = (size_t)mm->N * (size_t)mm->sa;
        for (size_t e = 0; e < n; e++) pa[e] = bf16_round((float)((2.0 * rng_uniform(key, e) - 1.0) * bound));
        // Index tables.
        int64_t rl = (int64_t)r * l, n_pub = (int64_t)(r - s->private_rank) * l;
        if (s->pure_sharing) {
            for (int i = 0; i < L; i++) {
                int32_t *ta = mos_table(a, mm->index_a, i), *tb = mos_table(a, mm->index_b, i);
                for (int64_t j = 0; j < rl; j++) ta[j] = tb[j] = (int32_t)j;
            }
        } else {
            int32_t *perm = xmalloc(sizeof(int32_t) * (size_t)(mm->P ? mm->P : 1));
            int64_t *swaps = xmalloc(sizeof(int64_t) * (size_t)(n_pub ? n_pub : 1));
            for (int64_t j = 0; j < mm->P; j++) perm[j] = (int32_t)j;
            for (int i = 0; i < L; i++) {
                int32_t *ta = mos_table(a, mm->index_a, i), *tb = mos_table(a, mm->index_b, i);
                mos_draw_table(ta, mm, n_pub, i, rng_key(RNG_INDEX, s->seed, (uint64_t)t, (uint64_t)i, 0), perm, swaps);
                if (s->pair_dissociation)
                    mos_draw_table(tb, mm, n_pub, i, rng_key(RNG_INDEX, s->seed, (uint64_t)t, (uint64_t)i, 1), perm,
                                   swaps);
                else
                    memcpy(tb, ta, sizeof(int32_t) * (size_t)rl);
            }
            free(perm);
            free(swaps);
        }
        // Random scaling: c = v / mu with v ~ N(mu, sigma^2), one value per (layer, rank), frozen.
        if (mm->scale >= 0) {
            float *c = (float *)a->buffers[mm->scale].data;  // [L][r]
            for (int i = 0; i < L; i++) {
                uint64_t k = rng_key(RNG_SCALE, s->seed, (uint64_t)t, (uint64_t)i, 0);
                for (int j = 0; j < r; j++)
                    c[(size_t)i * r + j] = (float)((s->scale_mean + s->scale_std * rng_normal(k, (uint64_t)j)) / s->scale_mean);
            }
        }
    }
    return MOSFT_OK;
}

// Validate tables read from a file: the structure mos_init would have drawn, so that a hand-edited
// or foreign file cannot index outside a pool or break the race-free scatter (distinct indices).
static int mos_attach(adapter *a) {
    const mos_impl *im = a->impl;
    const adapter_spec *s = &a->spec;
    int L = a->model.n_layers, r = a->rank, l = s->shards;
    int64_t rl = (int64_t)r * l, n_pub = (int64_t)(r - s->private_rank) * l;
    for (int t = 0; t < MOD_COUNT; t++) {
        const mos_module *mm = &im->m[t];
        if (!mm->on) continue;
        uint8_t *seen = xcalloc((size_t)mm->N, 1);
        for (int w = 0; w < 2; w++) {
            const adapter_buffer *b = &a->buffers[w ? mm->index_b : mm->index_a];
            for (int i = 0; i < L; i++) {
                const int32_t *tab = mos_table(a, w ? mm->index_b : mm->index_a, i);
                for (int64_t j = 0; j < rl; j++) {
                    int32_t v = tab[j];
                    const char *bad = NULL;
                    if (s->pure_sharing) {
                        if (v != j) bad = "the identity 0..N-1 (pure sharing)";
                    } else if (j < n_pub) {
                        if (v < 0 || v >= mm->P) bad = "a public shard in [0, P)";
                    } else if (v != mm->P + (int64_t)i * mm->n_priv + (j - n_pub)) {
                        bad = "this layer's private shard";
                    }
                    if (!bad && seen[v]) bad = "an index not repeated within the layer";
                    if (bad) {
                        free(seen);
                        return mosft_fail(MOSFT_ERR_INPUT,
                                          "%s: layer %d, entry %lld: expected %s (N = %lld, P = %lld), got %d", b->name,
                                          i, (long long)j, bad, (long long)mm->N, (long long)mm->P, (int)v);
                    }
                    seen[v] = 1;
                }
                for (int64_t j = 0; j < rl; j++) seen[tab[j]] = 0;
                if (w == 1 && !s->pair_dissociation &&
                    memcmp(tab, mos_table(a, mm->index_a, i), sizeof(int32_t) * (size_t)rl) != 0) {
                    free(seen);
                    return mosft_fail(MOSFT_ERR_INPUT,
                                      "%s: layer %d: expected the same indices as index_A (pair_dissociation is off)",
                                      b->name, i);
                }
            }
        }
        free(seen);
        if (mm->scale >= 0) {
            const float *c = (const float *)a->buffers[mm->scale].data;
            for (size_t j = 0; j < (size_t)L * r; j++)
                if (!isfinite(c[j]))
                    return mosft_fail(MOSFT_ERR_INPUT, "%s: entry %zu: expected a finite scale, got %g",
                                      a->buffers[mm->scale].name, j, (double)c[j]);
        }
    }
    return MOSFT_OK;
}

static void mos_build(const adapter *a, int layer, int module, float *A, float *B) {
    const mos_module *mm = &((const mos_impl *)a->impl)->m[module];
    MOSFT_ASSERT(mm->on && layer >= 0 && layer < a->model.n_layers);
    int r = a->rank, l = a->spec.shards, sa = mm->sa, sb = mm->sb;
    const float *pa = mos_pool(a, mm->pool_a), *pb = mos_pool(a, mm->pool_b);  // [N][sa], [N][sb]
    const int32_t *ia = mos_table(a, mm->index_a, layer), *ib = mos_table(a, mm->index_b, layer);  // [r*l]
    const float *sc = mm->scale >= 0 ? (const float *)a->buffers[mm->scale].data + (size_t)layer * r : NULL;  // [r]
    for (int k = 0; k < r; k++) {
        float ck = sc ? sc[k] : 1.0f;
        for (int j = 0; j < l; j++) {
            const float *src = pa + (size_t)ia[k * l + j] * sa;
            float *dst = A + (size_t)k * mm->d_in + (size_t)j * sa;
            if (sc)
                for (int c = 0; c < sa; c++) dst[c] = ck * src[c];
            else
                memcpy(dst, src, sizeof(float) * (size_t)sa);
        }
    }
    for (int k = 0; k < r; k++)
        for (int j = 0; j < l; j++) {
            const float *src = pb + (size_t)ib[k * l + j] * sb;
            for (int c = 0; c < sb; c++) B[((size_t)j * sb + c) * r + k] = src[c];
        }
}

// Scatter-add in a fixed order; within a layer the indices are distinct, so a GPU kernel over one
// layer needs no atomics, and layers are added one after the other.
static void mos_scatter(const adapter *a, int layer, int module, const float *gA, const float *gB, float *grad) {
    const mos_module *mm = &((const mos_impl *)a->impl)->m[module];
    MOSFT_ASSERT(mm->on && layer >= 0 && layer < a->model.n_layers);
    int r = a->rank, l = a->spec.shards, sa = mm->sa, sb = mm->sb;
    float *ga = grad + a->tensors[mm->pool_a].offset, *gb = grad + a->tensors[mm->pool_b].offset;
    const int32_t *ia = mos_table(a, mm->index_a, layer), *ib = mos_table(a, mm->index_b, layer);
    const float *sc = mm->scale >= 0 ? (const float *)a->buffers[mm->scale].data + (size_t)layer * r : NULL;
    for (int k = 0; k < r; k++) {
        float ck = sc ? sc[k] : 1.0f;
        for (int j = 0; j < l; j++) {
            float *dst = ga + (size_t)ia[k * l + j] * sa;
            const float *src = gA + (size_t)k * mm->d_in + (size_t)j * sa;
            for (int c = 0; c < sa; c++) dst[c] += ck * src[c];
        }
    }
    for (int k = 0; k < r; k++)
        for (int j = 0; j < l; j++) {
            float *dst = gb + (size_t)ib[k * l + j] * sb;
            for (int c = 0; c < sb; c++) dst[c] += gB[((size_t)j * sb + c) * r + k];
        }
}

static void mos_free_impl(adapter *a) {
    free(a->impl);
    a->impl = NULL;
}

const adapter_ops adapter_ops_mos = {
    .method = "mos",
    .routed = 0,
    .init = mos_init,
    .attach = mos_attach,
    .build = mos_build,
    .scatter = mos_scatter,
    .free_impl = mos_free_impl,
    .count_params = mos_count_params,
    .check = mos_check,
};
