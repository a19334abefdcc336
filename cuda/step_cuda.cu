// step_cuda.cu: forward and backward of one micro-batch on the GPU: the math of the CPU reference
// (core/backend_cpu.c) with bf16 activations, fp32 statistics and fp32 residual-stream gradients.
//
// Per layer (T = B*S token rows):
//   h1 = rmsnorm(x_in)                     qkv = h1 Wqkv^T + adapters(q, k, v)    (one GEMM, [T][Q+2KV])
//   q, k, v = rope/split(qkv)  (head-major) att = attention(q, k, v)              (batched GEMMs + softmax)
//   x_mid = x_in + att Wo^T + adapter(o)   (GEMM epilogue: C = x_in, beta = 1)
//   h2 = rmsnorm(x_mid)                    gu = h2 Wgu^T + adapters(gate, up)     (one GEMM, [T][2I])
//   a = silu(gate) * up                    x_out = x_mid + a Wd^T + adapter(down)
// A frozen NF4 group is dequantized into one reused bf16 buffer right before its GEMM (forward and
// backward); there is no weight gradient for the base. Each adapter adds s * (xd A^T) B^T into the
// base output (beta = 1) and, in backward, scatters dL/dA, dL/dB into the fp32 gradient buffer.
//
// Recompute levels (which of cuda_acts is per layer): none keeps everything; partial keeps the layer
// input, q/k/v, the attention output and its log-sum-exp and x_mid, and recomputes the norms and the
// MLP's gate|up GEMM; full keeps only the layer input and recomputes the layer's forward, except its
// last GEMM (down_proj), whose output backward never reads. Dropout masks are functions of
// (seed, step, micro-batch, layer, module), so recomputation sees the same ones.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/ops_cpu.h"
#include "core/rng.h"
#include "cuda/backend_cuda.cuh"

#define ATT_BUDGET ((size_t)512 << 20)  // attention scores of a chunk of sequences
#define CE_BUDGET ((size_t)512 << 20)   // logits of a chunk of rows

typedef struct {
    int64_t T;
    int B, S, C, Q, KV, W, I, Hq, Hkv, D, V, L;
} dims;

static dims dims_of(const llama_config *c, int B, int S) {
    dims d;
    d.B = B;
    d.S = S;
    d.T = (int64_t)B * S;
    d.C = c->hidden;
    d.Hq = c->n_heads;
    d.Hkv = c->n_kv_heads;
    d.D = c->head_dim;
    d.Q = d.Hq * d.D;
    d.KV = d.Hkv * d.D;
    d.W = d.Q + 2 * d.KV;
    d.I = c->intermediate;
    d.V = c->vocab;
    d.L = c->n_layers;
    return d;
}

static int max_din(const backend *be) {
    const cuda_impl *c = (const cuda_impl *)be->impl;
    int m = 0;
    for (int g = 0; g < GRP_COUNT; g++)
        if (c->grp[g].n && c->grp[g].d_in > m) m = c->grp[g].d_in;
    return m;
}

// ---- memory layout --------------------------------------------------------------------------------

enum { CAT_ACTS = 0, CAT_WORK };

static void *take(cuda_arena *ar, size_t bytes, mem_plan *plan, int cat) {
    if (plan) {
        if (cat == CAT_ACTS)
            plan->activations += (double)cuda_align(bytes);
        else
            plan->workspace += (double)cuda_align(bytes);
    }
    return cuda_arena_alloc(ar, bytes);
}

void cuda_acts_layout(backend *be, cuda_arena *ar, int B, int S, mem_plan *plan) {
    cuda_impl *c = (cuda_impl *)be->impl;
    dims d = dims_of(&be->cfg, B, S);
    int64_t T = d.T;
    int lev = c->recompute;
    if (!c->acts) c->acts = (cuda_acts *)xcalloc((size_t)d.L, sizeof(cuda_acts));
    cuda_acts sh;  // buffers shared by the layers that recompute them
    memset(&sh, 0, sizeof sh);
#define BF(n) (bf16 *)take(ar, (size_t)(n) * 2, plan, CAT_ACTS)
#define F32(n) (float *)take(ar, (size_t)(n) * 4, plan, CAT_ACTS)
    if (lev != RECOMPUTE_NONE) {
        sh.h1 = BF(T * d.C);
        sh.rstd1 = F32(T);
        sh.h2 = BF(T * d.C);
        sh.rstd2 = F32(T);
        sh.gu = BF(T * 2 * d.I);
        sh.a = BF(T * d.I);
        if (lev == RECOMPUTE_FULL) {
            sh.q = BF(T * d.Q);
            sh.k = BF(T * d.KV);
            sh.v = BF(T * d.KV);
            sh.att = BF(T * d.Q);
            sh.lse = F32(T * d.Hq);
            sh.x_mid = BF(T * d.C);
        }
    }
    for (int l = 0; l < d.L; l++) {
        cuda_acts *a = &c->acts[l];
        *a = sh;
        a->x_in = BF(T * d.C);
        if (lev == RECOMPUTE_NONE) {
            a->h1 = BF(T * d.C);
            a->rstd1 = F32(T);
            a->h2 = BF(T * d.C);
            a->rstd2 = F32(T);
            a->gu = BF(T * 2 * d.I);
            a->a = BF(T * d.I);
        }
        if (lev != RECOMPUTE_FULL) {
            a->q = BF(T * d.Q);
            a->k = BF(T * d.KV);
            a->v = BF(T * d.KV);
            a->att = BF(T * d.Q);
            a->lse = F32(T * d.Hq);
            a->x_mid = BF(T * d.C);
        }
    }
    c->x_final = BF(T * d.C);
#undef BF
#undef F32
#define BF(n) (bf16 *)take(ar, (size_t)(n) * 2, plan, CAT_WORK)
#define F32(n) (float *)take(ar, (size_t)(n) * 4, plan, CAT_WORK)
    c->xf = BF(T * d.C);
    c->rstd_f = F32(T);
    c->qkv = BF(T * d.W);
    c->o_tmp = BF(T * d.Q);
    c->gx = F32(T * d.C);
    c->gxb = BF(T * d.C);
    c->gh = F32(T * d.C);
    c->gbig = BF(T * (d.I > d.Q ? d.I : d.Q));
    c->gq = F32(T * d.Q);
    c->gk = F32(T * d.KV);
    c->gv = F32(T * d.KV);
    c->delta = F32(T * d.Hq);
    int bc = attention_chunk(ATT_BUDGET, B, S, d.Hq);
    c->ce_rows = lmhead_ce_chunk_rows(CE_BUDGET, d.V);
    if (c->ce_rows > T) c->ce_rows = T;
    size_t att = attention_scratch_bytes(bc, S, d.Hq), ce = lmhead_ce_scratch_bytes(c->ce_rows, d.V);
    c->big_bytes = att > ce ? att : ce;
    c->big = take(ar, c->big_bytes, plan, CAT_WORK);
    c->row_loss = F32(T);
    c->ids = (int32_t *)take(ar, (size_t)T * 4, plan, CAT_WORK);
    c->targets = (int32_t *)take(ar, (size_t)T * 4, plan, CAT_WORK);
    c->mask = (int32_t *)take(ar, (size_t)T * 4, plan, CAT_WORK);
    c->cs = F32((int64_t)S * d.D);
    if (c->model.nf4) {
        int64_t mx = 0;
        int64_t g[4] = {(int64_t)d.W * d.C, (int64_t)d.C * d.Q, (int64_t)2 * d.I * d.C, (int64_t)d.C * d.I};
        for (int i = 0; i < 4; i++) mx = g[i] > mx ? g[i] : mx;
        c->wbuf = BF(mx);
    }
    int din = max_din(be);
    if (din > 0) {
        c->ad_gh = BF(T * c->R_max);
        c->ad_gA = F32((int64_t)c->R_max * din);
        c->ad_gB = F32((int64_t)c->dout_max * c->R_max);
        if (be->dropout > 0) {
            c->ad_xd = BF(T * din);
            c->ad_gxd = F32(T * din);
        }
#undef BF
#define BF(n) (bf16 *)take(ar, (size_t)(n) * 2, plan, CAT_ACTS)
        if (!c->ad_h) c->ad_h = (bf16 **)xcalloc((size_t)d.L, sizeof(bf16 *));
        for (int l = 0; l < d.L; l++) c->ad_h[l] = BF(T * c->R_tot);  // small: R_tot <= 7r columns
    }
#undef BF
#undef F32
}

// ---- frozen weights and adapters ------------------------------------------------------------------

// The bf16 weight of a fused group (dequantized into c->wbuf for an NF4 base).
static const bf16 *group_weight(cuda_impl *c, const dims *d, int l, int grp) {
    const cuda_layer *L = &c->model.layers[l];
    if (!c->model.nf4) return L->w[grp];
    prof_mark(c, PROF_DEQUANT);
    switch (grp) {
    case GRP_QKV:
        nf4_dequantize_cuda(c->ctx, &L->q[MOD_Q], c->wbuf);
        nf4_dequantize_cuda(c->ctx, &L->q[MOD_K], c->wbuf + (int64_t)d->Q * d->C);
        nf4_dequantize_cuda(c->ctx, &L->q[MOD_V], c->wbuf + (int64_t)(d->Q + d->KV) * d->C);
        break;
    case GRP_O: nf4_dequantize_cuda(c->ctx, &L->q[MOD_O], c->wbuf); break;
    case GRP_GU:
        nf4_dequantize_cuda(c->ctx, &L->q[MOD_GATE], c->wbuf);
        nf4_dequantize_cuda(c->ctx, &L->q[MOD_UP], c->wbuf + (int64_t)d->I * d->C);
        break;
    default: nf4_dequantize_cuda(c->ctx, &L->q[MOD_DOWN], c->wbuf); break;
    }
    return c->wbuf;
}

void cuda_build_factors(backend *be) {
    cuda_impl *c = (cuda_impl *)be->impl;
    if (c->built) return;
    for (int g = 0; g < GRP_COUNT; g++) {
        cuda_adapter_group *ag = &c->grp[g];
        for (int l = 0; l < be->cfg.n_layers && ag->n; l++)
            for (int i = 0; i < ag->n; i++)
                lowrank_gather_cuda(c->ctx, &ag->map[l * 3 + i], c->params, ag->A[l] + (int64_t)i * c->rank * ag->d_in,
                                    ag->B[l] + (int64_t)ag->row_off[i] * ag->R + i * c->rank);
    }
    c->built = 1;
}

typedef struct {
    int on;
    uint64_t key;
    uint32_t thr;
    float keep;
} drop_spec;

static drop_spec drop_of(const backend *be, const dropout_ctx *dc, int l, int m) {
    drop_spec s = {0, 0, 0, 1.0f};
    if (!dc || be->dropout <= 0.0f) return s;
    s.on = 1;
    s.key = rng_key(RNG_DROPOUT, dc->seed, (uint64_t)dc->step, (uint64_t)dc->micro, (uint64_t)(l * 8 + m));
    s.thr = rng_dropout_threshold(be->dropout);
    s.keep = 1.0f / (1.0f - be->dropout);
    return s;
}

static int dropout_on(const backend *be, const dropout_ctx *dc) { return dc && be->dropout > 0.0f; }

// y[T][d_out] (the group's fused output, row stride ldy) += s * (xd A^T) B^T for every adapted module
// of group g; x [T][d_in] with row stride ldx. h is saved in c->ad_h[l].
static void adapter_forward(backend *be, const dims *d, int l, int g, const bf16 *x, int64_t ldx, bf16 *y, int64_t ldy,
                            const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_adapter_group *ag = &c->grp[g];
    if (!ag->n) return;
    int r = c->rank, R = ag->R;
    bf16 *h = c->ad_h[l] + ag->h_off;  // [T][R] with row stride R_tot
    if (!dropout_on(be, dc)) {
        gemm_cuda(c->ctx, 0, 1, d->T, R, ag->d_in, 1.0f, x, ldx, ag->A[l], ag->d_in, 0.0f, NULL, h, c->R_tot, GEMM_BF16);
        gemm_cuda(c->ctx, 0, 1, d->T, ag->d_out, R, c->scaling, h, c->R_tot, ag->B[l], R, 1.0f, y, y, ldy, GEMM_BF16);
        return;
    }
    for (int i = 0; i < ag->n; i++) {  // a mask per module: per module on the blocks
        drop_spec ds = drop_of(be, dc, l, ag->mod[i]);
        dropout_apply_cuda(c->ctx, c->ad_xd, x, ldx, d->T, ag->d_in, ds.key, ds.thr, ds.keep);
        gemm_cuda(c->ctx, 0, 1, d->T, r, ag->d_in, 1.0f, c->ad_xd, ag->d_in, ag->A[l] + (int64_t)i * r * ag->d_in,
                  ag->d_in, 0.0f, NULL, h + i * r, c->R_tot, GEMM_BF16);
        bf16 *yi = y + ag->row_off[i];
        gemm_cuda(c->ctx, 0, 1, d->T, ag->d_out_m[i], r, c->scaling, h + i * r, c->R_tot,
                  ag->B[l] + (int64_t)ag->row_off[i] * R + i * r, R, 1.0f, yi, yi, ldy, GEMM_BF16);
    }
}

// Backward of group g's adapters: gx (fp32 or bf16, row stride ldgx) += d/dx; dL/dA, dL/dB scattered
// into c->grad. gy [T][d_out] (the group's fused output gradient) with row stride ldgy.
static void adapter_backward(backend *be, const dims *d, int l, int g, const bf16 *x, int64_t ldx, const bf16 *gy,
                             int64_t ldgy, void *gx, int gx_f32, int64_t ldgx, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_adapter_group *ag = &c->grp[g];
    if (!ag->n) return;
    int r = c->rank, R = ag->R;
    float s = c->scaling;
    const bf16 *h = c->ad_h[l] + ag->h_off;
    gemm_dtype gt = gx_f32 ? GEMM_F32 : GEMM_BF16;
    // gh = s gy B;  gB = s gy^T h (only the diagonal blocks are used);  gA = gh^T xd
    gemm_cuda(c->ctx, 0, 0, d->T, R, ag->d_out, s, gy, ldgy, ag->B[l], R, 0.0f, NULL, c->ad_gh, R, GEMM_BF16);
    gemm_cuda(c->ctx, 1, 0, ag->d_out, R, d->T, s, gy, ldgy, h, c->R_tot, 0.0f, NULL, c->ad_gB, R, GEMM_F32);
    if (!dropout_on(be, dc)) {
        gemm_cuda(c->ctx, 1, 0, R, ag->d_in, d->T, 1.0f, c->ad_gh, R, x, ldx, 0.0f, NULL, c->ad_gA, ag->d_in, GEMM_F32);
        for (int i = 0; i < ag->n; i++)
            lowrank_scatter_cuda(c->ctx, &ag->map[l * 3 + i], c->ad_gA + (int64_t)i * r * ag->d_in,
                                 c->ad_gB + (int64_t)ag->row_off[i] * R + i * r, c->grad);
        gemm_cuda(c->ctx, 0, 0, d->T, ag->d_in, R, 1.0f, c->ad_gh, R, ag->A[l], ag->d_in, 1.0f, gx, gx, ldgx, gt);
        return;
    }
    for (int i = 0; i < ag->n; i++) {
        drop_spec ds = drop_of(be, dc, l, ag->mod[i]);
        const bf16 *Ai = ag->A[l] + (int64_t)i * r * ag->d_in;
        dropout_apply_cuda(c->ctx, c->ad_xd, x, ldx, d->T, ag->d_in, ds.key, ds.thr, ds.keep);
        gemm_cuda(c->ctx, 1, 0, r, ag->d_in, d->T, 1.0f, c->ad_gh + i * r, R, c->ad_xd, ag->d_in, 0.0f, NULL, c->ad_gA,
                  ag->d_in, GEMM_F32);
        lowrank_scatter_cuda(c->ctx, &ag->map[l * 3 + i], c->ad_gA, c->ad_gB + (int64_t)ag->row_off[i] * R + i * r,
                             c->grad);
        gemm_cuda(c->ctx, 0, 0, d->T, ag->d_in, r, 1.0f, c->ad_gh + i * r, R, Ai, ag->d_in, 0.0f, NULL, c->ad_gxd,
                  ag->d_in, GEMM_F32);
        dropout_backward_add_cuda(c->ctx, gx, gx_f32, ldgx, c->ad_gxd, d->T, ag->d_in, ds.key, ds.thr, ds.keep);
    }
}

// ---- the layer --------------------------------------------------------------------------------------

static int att_chunk(const cuda_impl *c, const dims *d) {
    int bc = d->B;
    while (bc > 1 && attention_scratch_bytes(bc, d->S, d->Hq) > c->big_bytes) bc--;
    return bc;
}

// h1, q, k, v, att, lse, x_mid of layer l from its x_in.
static void attn_block_forward(backend *be, const dims *d, int l, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_acts *a = &c->acts[l];
    const cuda_layer *L = &c->model.layers[l];
    cuda_ctx *ctx = c->ctx;
    float eps = (float)be->cfg.rms_eps;
    prof_mark(c, PROF_ELEM);
    rmsnorm_forward_cuda(ctx, a->h1, a->rstd1, a->x_in, L->attn_norm, d->T, d->C, eps);
    const bf16 *w = group_weight(c, d, l, GRP_QKV);
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 1, d->T, d->W, d->C, 1.0f, a->h1, d->C, w, d->C, 0.0f, NULL, c->qkv, d->W, GEMM_BF16);
    prof_mark(c, PROF_ADAPTER);
    adapter_forward(be, d, l, GRP_QKV, a->h1, d->C, c->qkv, d->W, dc);
    prof_mark(c, PROF_ELEM);
    rope_split_cuda(ctx, a->q, a->k, a->v, c->qkv, c->cs, d->B, d->S, d->Hq, d->Hkv, d->D);
    prof_mark(c, PROF_ATTN);
    attention_forward_cuda(ctx, a->att, a->lse, a->q, a->k, a->v, c->mask, d->B, d->S, d->Hq, d->Hkv, d->D, c->big,
                           att_chunk(c, d), c->o_tmp);
    w = group_weight(c, d, l, GRP_O);
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 1, d->T, d->C, d->Q, 1.0f, a->att, d->Q, w, d->Q, 1.0f, a->x_in, a->x_mid, d->C, GEMM_BF16);
    prof_mark(c, PROF_ADAPTER);
    adapter_forward(be, d, l, GRP_O, a->att, d->Q, a->x_mid, d->C, dc);
}

// h2, gu, a of layer l from its x_mid; with x_out, also x_out = x_mid + down(a).
static void mlp_block_forward(backend *be, const dims *d, int l, bf16 *x_out, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_acts *a = &c->acts[l];
    const cuda_layer *L = &c->model.layers[l];
    cuda_ctx *ctx = c->ctx;
    float eps = (float)be->cfg.rms_eps;
    prof_mark(c, PROF_ELEM);
    rmsnorm_forward_cuda(ctx, a->h2, a->rstd2, a->x_mid, L->mlp_norm, d->T, d->C, eps);
    const bf16 *w = group_weight(c, d, l, GRP_GU);
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 1, d->T, 2 * (int64_t)d->I, d->C, 1.0f, a->h2, d->C, w, d->C, 0.0f, NULL, a->gu, 2 * (int64_t)d->I,
              GEMM_BF16);
    prof_mark(c, PROF_ADAPTER);
    adapter_forward(be, d, l, GRP_GU, a->h2, d->C, a->gu, 2 * (int64_t)d->I, dc);
    prof_mark(c, PROF_ELEM);
    swiglu_forward_cuda(ctx, a->a, a->gu, d->T, d->I);
    if (!x_out) return;
    w = group_weight(c, d, l, GRP_DOWN);
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 1, d->T, d->C, d->I, 1.0f, a->a, d->I, w, d->I, 1.0f, a->x_mid, x_out, d->C, GEMM_BF16);
    prof_mark(c, PROF_ADAPTER);
    adapter_forward(be, d, l, GRP_DOWN, a->a, d->I, x_out, d->C, dc);
}

// c->gx holds dL/dx_out (and c->gxb its bf16 copy) on entry, dL/dx_in on exit.
static void layer_backward(backend *be, const dims *d, int l, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_acts *a = &c->acts[l];
    const cuda_layer *L = &c->model.layers[l];
    cuda_ctx *ctx = c->ctx;
    int64_t I2 = 2 * (int64_t)d->I;
    // MLP: x_out = x_mid + down(silu(gate(h2)) * up(h2))
    const bf16 *w = group_weight(c, d, l, GRP_DOWN);
    bf16 *ga = c->gbig;  // [T][I]
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 0, d->T, d->I, d->C, 1.0f, c->gxb, d->C, w, d->I, 0.0f, NULL, ga, d->I, GEMM_BF16);
    prof_mark(c, PROF_ADAPTER);
    adapter_backward(be, d, l, GRP_DOWN, a->a, d->I, c->gxb, d->C, ga, 0, d->I, dc);
    prof_mark(c, PROF_ELEM);
    swiglu_backward_cuda(ctx, a->gu, ga, d->T, d->I);  // a->gu now holds dL/dgate | dL/dup
    w = group_weight(c, d, l, GRP_GU);
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 0, d->T, d->C, I2, 1.0f, a->gu, I2, w, d->C, 0.0f, NULL, c->gh, d->C, GEMM_F32);
    prof_mark(c, PROF_ADAPTER);
    adapter_backward(be, d, l, GRP_GU, a->h2, d->C, a->gu, I2, c->gh, 1, d->C, dc);
    prof_mark(c, PROF_ELEM);
    rmsnorm_backward_cuda(ctx, c->gx, c->gxb, c->gh, a->x_mid, L->mlp_norm, a->rstd2, d->T, d->C);
    // attention: x_mid = x_in + o(attention(rope(q(h1)), rope(k(h1)), v(h1)))
    w = group_weight(c, d, l, GRP_O);
    bf16 *gatt = c->gbig;  // [T][Q]
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 0, d->T, d->Q, d->C, 1.0f, c->gxb, d->C, w, d->Q, 0.0f, NULL, gatt, d->Q, GEMM_BF16);
    prof_mark(c, PROF_ADAPTER);
    adapter_backward(be, d, l, GRP_O, a->att, d->Q, c->gxb, d->C, gatt, 0, d->Q, dc);
    prof_mark(c, PROF_ATTN);
    attention_backward_cuda(ctx, c->gq, c->gk, c->gv, gatt, a->att, a->lse, a->q, a->k, a->v, c->mask, d->B, d->S, d->Hq,
                            d->Hkv, d->D, c->big, att_chunk(c, d), c->o_tmp, c->delta);
    bf16 *gqkv = c->qkv;
    prof_mark(c, PROF_ELEM);
    rope_merge_backward_cuda(ctx, gqkv, c->gq, c->gk, c->gv, c->cs, d->B, d->S, d->Hq, d->Hkv, d->D);
    w = group_weight(c, d, l, GRP_QKV);
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 0, d->T, d->C, d->W, 1.0f, gqkv, d->W, w, d->C, 0.0f, NULL, c->gh, d->C, GEMM_F32);
    prof_mark(c, PROF_ADAPTER);
    adapter_backward(be, d, l, GRP_QKV, a->h1, d->C, gqkv, d->W, c->gh, 1, d->C, dc);
    prof_mark(c, PROF_ELEM);
    rmsnorm_backward_cuda(ctx, c->gx, c->gxb, c->gh, a->x_in, L->attn_norm, a->rstd1, d->T, d->C);
}

// ---- one micro-batch --------------------------------------------------------------------------------

static int check_ids(const backend *be, const micro_batch *mb) {
    int64_t T = (int64_t)mb->B * mb->S;
    int V = be->cfg.vocab;
    for (int64_t i = 0; i < T; i++) {
        if (mb->input_ids[i] < 0 || mb->input_ids[i] >= V)
            return mosft_fail(MOSFT_ERR_INPUT, "batch: token id %d at row %lld is outside the vocabulary (%d)",
                              mb->input_ids[i], (long long)i, V);
        if (mb->labels[i] != OPS_IGNORE_INDEX && (mb->labels[i] < 0 || mb->labels[i] >= V))
            return mosft_fail(MOSFT_ERR_INPUT, "batch: label %d at row %lld is outside the vocabulary (%d)", mb->labels[i],
                              (long long)i, V);
    }
    return MOSFT_OK;
}

// Activation arena for micro-batches of B x S (grown when a larger one arrives).
static int ensure_acts(backend *be, int B, int S) {
    cuda_impl *c = (cuda_impl *)be->impl;
    if (c->acts_ar.base && B <= c->B_cap && S <= c->S_cap) return MOSFT_OK;
    int Bn = B > c->B_cap ? B : c->B_cap, Sn = S > c->S_cap ? S : c->S_cap;
    cuda_arena_free(&c->acts_ar);
    cuda_arena count = {NULL, (size_t)-1, 0, 0};
    cuda_acts_layout(be, &count, Bn, Sn, NULL);
    int rc = cuda_arena_init(&c->acts_ar, count.used);
    if (rc) {
        mem_plan p;
        be->ops->memory_plan(be, Bn, Sn, &p);
        char w[32], ad[32], ac[32], ws[32], tot[32];
        mosft_fmt_bytes(w, sizeof w, p.weights);
        mosft_fmt_bytes(ad, sizeof ad, p.adapter);
        mosft_fmt_bytes(ac, sizeof ac, p.activations);
        mosft_fmt_bytes(ws, sizeof ws, p.workspace);
        mosft_fmt_bytes(tot, sizeof tot, p.total);
        return mosft_fail_hint(MOSFT_ERR_RUNTIME, "train.recompute=full or a smaller train.micro_batch_size",
                               "out of GPU memory for micro-batches of %d x %d with recompute \"%s\": the plan needs %s "
                               "(weights %s, adapter %s, activations %s, workspace %s) on %s",
                               Bn, Sn, be->recompute, tot, w, ad, ac, ws, p.device);
    }
    cuda_acts_layout(be, &c->acts_ar, Bn, Sn, NULL);
    c->B_cap = Bn;
    c->S_cap = Sn;
    // the rotary table for positions [0, S_cap)
    int D = be->cfg.head_dim;
    double *invd = (double *)xmalloc(sizeof(double) * (size_t)(D / 2));
    float *inv = (float *)xmalloc(sizeof(float) * (size_t)(D / 2));
    llama_rope_inv_freq(&be->cfg, invd);
    for (int i = 0; i < D / 2; i++) inv[i] = (float)invd[i];
    float *cs = (float *)xmalloc(sizeof(float) * (size_t)Sn * D);
    rope_table_host(cs, inv, Sn, D);
    CUDA_CHECK(cudaMemcpyAsync(c->cs, cs, sizeof(float) * (size_t)Sn * D, cudaMemcpyHostToDevice, c->ctx->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->ctx->stream));
    free(cs);
    free(inv);
    free(invd);
    free(c->h_targets);
    c->h_targets = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)Bn * Sn);
    return MOSFT_OK;
}

int cuda_step_run(backend *be, const micro_batch *mb, float loss_scale, const dropout_ctx *dc, int backward,
                             double *loss_sum, int64_t *n_tokens, float *logits_host) {
    cuda_impl *c = (cuda_impl *)be->impl;
    int rc = check_ids(be, mb);
    if (rc) return rc;
    if ((rc = ensure_acts(be, mb->B, mb->S))) return rc;
    dims d = dims_of(&be->cfg, mb->B, mb->S);
    cuda_ctx *ctx = c->ctx;
    prof_mark(c, PROF_OTHER);
    // batch: ids, padding mask, targets shifted by one (label t+1 is the target of row t)
    int64_t cnt = 0;
    for (int b = 0; b < mb->B; b++)
        for (int t = 0; t < mb->S; t++) {
            int64_t i = (int64_t)b * mb->S + t;
            c->h_targets[i] = t + 1 < mb->S ? mb->labels[i + 1] : OPS_IGNORE_INDEX;
            cnt += c->h_targets[i] != OPS_IGNORE_INDEX;
        }
    size_t nb = sizeof(int32_t) * (size_t)d.T;
    CUDA_CHECK(cudaMemcpyAsync(c->ids, mb->input_ids, nb, cudaMemcpyHostToDevice, ctx->stream));
    CUDA_CHECK(cudaMemcpyAsync(c->targets, c->h_targets, nb, cudaMemcpyHostToDevice, ctx->stream));
    CUDA_CHECK(cudaMemcpyAsync(c->mask, mb->attn_mask, nb, cudaMemcpyHostToDevice, ctx->stream));
    prof_mark(c, PROF_ADAPTER);
    cuda_build_factors(be);
    // forward
    prof_mark(c, PROF_ELEM);
    embedding_forward_cuda(ctx, c->acts[0].x_in, c->ids, c->model.embed, d.T, d.C);
    for (int l = 0; l < d.L; l++) {
        bf16 *x_out = l + 1 < d.L ? c->acts[l + 1].x_in : c->x_final;
        attn_block_forward(be, &d, l, dc);
        mlp_block_forward(be, &d, l, x_out, dc);
    }
    prof_mark(c, PROF_ELEM);
    rmsnorm_forward_cuda(ctx, c->xf, c->rstd_f, c->x_final, c->model.final_norm, d.T, d.C, (float)be->cfg.rms_eps);
    float *gxf = backward ? c->gh : NULL;
    prof_mark(c, PROF_LOSS);
    lmhead_ce_cuda(ctx, c->xf, c->model.lm_head, c->targets, d.T, d.C, d.V, loss_scale, gxf, c->row_loss, logits_host,
                   c->big, c->ce_rows);
    *n_tokens = cnt;
    if (!backward) {
        *loss_sum = sum_f32_cuda(ctx, c->row_loss, d.T, c->red);
        prof_mark(c, PROF_OTHER);
        prof_collect(c);
        return MOSFT_OK;
    }
    // backward
    prof_mark(c, PROF_ELEM);
    CUDA_CHECK(cudaMemsetAsync(c->gx, 0, sizeof(float) * (size_t)(d.T * d.C), ctx->stream));
    rmsnorm_backward_cuda(ctx, c->gx, c->gxb, gxf, c->x_final, c->model.final_norm, c->rstd_f, d.T, d.C);
    for (int l = d.L - 1; l >= 0; l--) {
        if (c->recompute == RECOMPUTE_FULL) {
            attn_block_forward(be, &d, l, dc);
            mlp_block_forward(be, &d, l, NULL, dc);
        } else if (c->recompute == RECOMPUTE_PARTIAL) {
            cuda_acts *a = &c->acts[l];
            const cuda_layer *L = &c->model.layers[l];
            prof_mark(c, PROF_ELEM);
            rmsnorm_forward_cuda(ctx, a->h1, a->rstd1, a->x_in, L->attn_norm, d.T, d.C, (float)be->cfg.rms_eps);
            mlp_block_forward(be, &d, l, NULL, dc);
        }
        layer_backward(be, &d, l, dc);
    }
    prof_mark(c, PROF_LOSS);
    *loss_sum = sum_f32_cuda(ctx, c->row_loss, d.T, c->red);  // synchronizes: the step is done
    prof_mark(c, PROF_OTHER);
    prof_collect(c);
    return MOSFT_OK;
}

// ---- profile --------------------------------------------------------------------------------------

void prof_collect(cuda_impl *c) {
    if (!c->prof) return;
    CUDA_CHECK(cudaStreamSynchronize(c->ctx->stream));
    for (int i = 0; i + 1 < c->n_ev; i++) {
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, c->ev[i], c->ev[i + 1]));
        c->prof_ms[c->ev_cat[i]] += ms;
    }
    c->n_ev = 0;
    c->prof_steps++;
}

void prof_print(cuda_impl *c) {
    if (!c->prof || !c->prof_steps) return;
    static const char *names[PROF_COUNT] = {"NF4 dequant", "base GEMMs", "attention", "adapter", "norms/rope/swiglu",
                                            "lm_head+CE", "other"};
    double tot = 0;
    for (int i = 0; i < PROF_COUNT; i++) tot += c->prof_ms[i];
    fprintf(stderr, "profile: ms per micro-batch (forward + backward), mean of %d\n", c->prof_steps);
    for (int i = 0; i < PROF_COUNT; i++)
        fprintf(stderr, "  %-20s %8.2f  %5.1f%%\n", names[i], c->prof_ms[i] / c->prof_steps, 100 * c->prof_ms[i] / tot);
    fprintf(stderr, "  %-20s %8.2f\n", "total", tot / c->prof_steps);
}
