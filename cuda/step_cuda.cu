// step_cuda.cu: forward and backward of one micro-batch on the GPU: the math of the CPU reference
// (core/backend_cpu.c) with bf16 activations, fp32 statistics and fp32 residual-stream gradients.
//
// Per layer (T = B*S token rows):
//   h1 = rmsnorm(x_in)                     qkv = h1 Wqkv^T + adapters(q, k, v)    (one GEMM, [T][Q+2KV])
//   q, k = rope(q, k) (in place in qkv)    att = attention(q, k, v)              (read token-major from qkv)
//   x_mid = x_in + att Wo^T + adapter(o)   (GEMM epilogue: C = x_in, beta = 1)
//   h2 = rmsnorm(x_mid)                    gu = h2 Wgu^T + adapters(gate, up)     (one GEMM, [T][2I])
//   a = silu(gate) * up                    x_out = x_mid + a Wd^T + adapter(down)
// A frozen NF4 group is dequantized into one reused bf16 buffer right before its GEMM (forward and
// backward); there is no weight gradient for the base. Each adapter adds s * (xd A^T) B^T into the
// base output (beta = 1) and, in backward, scatters dL/dA, dL/dB into the fp32 gradient buffer; those
// weight-gradient products run on a second stream beside the base input-gradient GEMMs (side_begin,
// side_join), since nothing in the layer's backward chain needs them.
//
// Recompute levels (which of cuda_acts is per layer): none keeps everything; partial keeps the layer
// input, q|k|v, the attention output and its log-sum-exp and x_mid, and recomputes the norms and the
// MLP's gate|up GEMM; full keeps only the layer input and recomputes the layer's forward, except its
// last GEMM (down_proj), whose output backward never reads. Dropout masks are functions of
// (seed, step, micro-batch, layer, module), so recomputation sees the same ones.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_profiler_api.h>

#include "core/ops_cpu.h"
#include "core/rng.h"
#include "cuda/backend_cuda.cuh"

#define ATT_BUDGET ((size_t)512 << 20)  // attention scores of a chunk of sequences
#define CE_BUDGET ((size_t)512 << 20)   // lm_head + CE scratch of a chunk of rows (its logits, h, dh)
// The supervised rows' list is padded to a multiple of this: their number changes from batch to batch,
// and a new lm_head shape every batch would mean a new GEMM plan (and a cache that churns) each time.
#define CE_ROW_QUANTUM 128

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

// The adapter's columns beside a group's input (and beside its output gradient in backward): R rounded
// up to 8 so that rows stay 16-byte aligned.
static int rp(const cuda_impl *c, int g) { return c->model.Rp[g]; }

// Row strides of the buffers that carry an adapter's h (forward) or gh (backward) in extra columns.
typedef struct {
    int64_t h1, att, h2, a, gu, qkv, gxb;
} lds;

static lds lds_of(const cuda_impl *c, const dims *d) {
    lds x;
    x.h1 = d->C + rp(c, GRP_QKV);
    x.att = d->Q + rp(c, GRP_O);
    x.h2 = d->C + rp(c, GRP_GU);
    x.a = d->I + rp(c, GRP_DOWN);
    x.gu = 2 * (int64_t)d->I + rp(c, GRP_GU);
    x.qkv = d->W + rp(c, GRP_QKV);
    x.gxb = d->C + (rp(c, GRP_O) > rp(c, GRP_DOWN) ? rp(c, GRP_O) : rp(c, GRP_DOWN));
    return x;
}

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

// Splits of a contraction of K for an M x N result that fill two waves of 128 x 128 tiles (K split in
// halves of multiples of 64, at least 256 long, up to 16): what the fused kernels' partials are sized for.
static int partial_splits(int64_t M, int64_t N, int64_t K) {
    int64_t tiles = ((M + 127) / 128) * ((N + 127) / 128);
    int s = 1;
    while (s < 16 && tiles * s < 264 && K % (2 * s) == 0 && (K / (2 * s)) % 64 == 0 && K / (2 * s) >= 256) s *= 2;
    return s;
}

void cuda_acts_layout(backend *be, cuda_arena *ar, int B, int S, mem_plan *plan) {
    cuda_impl *c = (cuda_impl *)be->impl;
    dims d = dims_of(&be->cfg, B, S);
    lds ld = lds_of(c, &d);
    int64_t T = d.T;
    int lev = c->recompute;
    if (!c->acts) c->acts = (cuda_acts *)xcalloc((size_t)d.L, sizeof(cuda_acts));
    cuda_acts sh;  // buffers shared by the layers that recompute them
    memset(&sh, 0, sizeof sh);
#define BF(n) (bf16 *)take(ar, (size_t)(n) * 2, plan, CAT_ACTS)
#define F32(n) (float *)take(ar, (size_t)(n) * 4, plan, CAT_ACTS)
    if (lev != RECOMPUTE_NONE) {
        sh.h1 = BF(T * ld.h1);
        sh.rstd1 = F32(T);
        sh.h2 = BF(T * ld.h2);
        sh.rstd2 = F32(T);
        sh.gu = BF(T * ld.gu);
        sh.a = BF(T * ld.a);
        if (lev == RECOMPUTE_FULL) {
            sh.qkv = BF(T * d.W);
            sh.att = BF(T * ld.att);
            sh.lse = F32(T * d.Hq);
            sh.x_mid = BF(T * d.C);
        }
    }
    for (int l = 0; l < d.L; l++) {
        cuda_acts *a = &c->acts[l];
        *a = sh;
        a->x_in = BF(T * d.C);
        if (lev == RECOMPUTE_NONE) {
            a->h1 = BF(T * ld.h1);
            a->rstd1 = F32(T);
            a->h2 = BF(T * ld.h2);
            a->rstd2 = F32(T);
            a->gu = BF(T * ld.gu);
            a->a = BF(T * ld.a);
        }
        if (lev != RECOMPUTE_FULL) {
            a->qkv = BF(T * d.W);
            a->att = BF(T * ld.att);
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
    c->qkv = BF(T * ld.qkv);
    c->gx_lo = BF(T * d.C);
    c->gxb = BF(T * ld.gxb);
    c->gh = F32(T * d.C);
    c->gbig = BF(T * (d.I > d.Q ? d.I : d.Q));
    c->delta = F32(T * d.Hq);
    if (!attention_uses_flash(d.D)) {  // the batched-GEMM attention's head-major scratch
        c->o_tmp = BF(T * d.Q);
        c->gq = F32(T * d.Q);
        c->gk = F32(T * d.KV);
        c->gv = F32(T * d.KV);
    } else {
        c->o_tmp = NULL;
        c->gq = c->gk = c->gv = NULL;
    }
    int bc = attention_chunk(ATT_BUDGET, B, S, d.Hq, d.Hkv, d.D);
    c->ce_rows = lmhead_ce_chunk_rows(CE_BUDGET, d.C, d.V);
    if (c->ce_rows > T) c->ce_rows = T;
    // the flash backward keeps the dS tiles of at least one sequence (it shares the lm_head's scratch)
    size_t att = attention_uses_flash(d.D) ? flash_attention_scratch_bytes(1, S, d.Hq)
                                           : attention_scratch_bytes(bc, S, d.Hq, d.Hkv, d.D);
    size_t ce = lmhead_ce_scratch_bytes(c->ce_rows, d.C, d.V);
    c->big_bytes = att > ce ? att : ce;
    c->big = take(ar, c->big_bytes, plan, CAT_WORK);
    c->row_loss = F32(T);
    c->ids = (int32_t *)take(ar, (size_t)T * 4, plan, CAT_WORK);
    c->targets = (int32_t *)take(ar, (size_t)T * 4, plan, CAT_WORK);
    c->ce_list = (int32_t *)take(ar, (size_t)T * 4, plan, CAT_WORK);
    c->mask = (int32_t *)take(ar, (size_t)T * 4, plan, CAT_WORK);
    c->cs = F32((int64_t)S * d.D);
    if (c->model.nf4) {  // a slot per group with its adapter blocks, [d_out + Rp][d_in + Rp]; one of the
                         // largest without the weight stream
        int64_t n[GRP_COUNT], mx = 0;
        for (int g = 0; g < GRP_COUNT; g++) {
            int di, dout;
            cuda_group_dims(&be->cfg, g, &di, &dout);
            n[g] = (int64_t)(dout + rp(c, g)) * (di + rp(c, g));
            mx = n[g] > mx ? n[g] : mx;
        }
        bf16 *one = c->wpipe ? NULL : BF(mx);
        for (int g = 0; g < GRP_COUNT; g++) c->wslot[g] = c->wpipe ? BF(n[g]) : one;
    }
    int din = max_din(be);
    if (din > 0) {
        c->ad_gA = F32((int64_t)c->R_max * din);
        c->ad_gB = F32((int64_t)c->dout_max * c->R_max);
        // fp32 partials of the fused low-rank kernels (they split their contraction while a wave of
        // blocks is not full): room for 2 waves of 128 x 128 tiles of the largest of [T][R] (h, gh),
        // [R][d_in] (gA), [d_out][R] (gB), up to 16 splits
        size_t mx = 0;
        for (int g = 0; g < GRP_COUNT; g++) {
            const cuda_adapter_group *ag = &c->grp[g];
            if (!ag->n) continue;
            int64_t sh[4][3] = {{T, ag->R, ag->d_in}, {T, ag->R, ag->d_out}, {ag->R, ag->d_in, T}, {ag->d_out, ag->R, T}};
            for (int i = 0; i < 4; i++) {
                size_t n = (size_t)partial_splits(sh[i][0], sh[i][1], sh[i][2]) * (size_t)(sh[i][0] * sh[i][1]);
                mx = n > mx ? n : mx;
            }
            if (g == GRP_DOWN || g == GRP_GU) {  // the SwiGLU kernels' slices (and the backward's dL/dB groups)
                size_t n = g == GRP_DOWN ? swiglu_rows_part_floats(T, d.I, ag->R)
                                         : swiglu_bands_part_floats(T, d.I, ag->R, c->rank);
                mx = n > mx ? n : mx;
            }
        }
        c->ad_part_floats = mx;
        c->ad_part = F32(mx);
        if (be->dropout > 0) c->ad_xd = BF(T * din);
        c->dbits = NULL;
        if (be->dropout > 0) {  // the masks, kept from forward (or the recomputed forward) to backward
            c->dbits_layer = 0;
            for (int g = 0; g < GRP_COUNT; g++) {
                c->dbits_grp[g] = c->dbits_layer;
                c->dbits_mod[g] = (dropout_mask_words(T, c->grp[g].d_in) + 3) & ~(int64_t)3;
                c->dbits_layer += c->grp[g].n * c->dbits_mod[g];
            }
            int layers = lev == RECOMPUTE_NONE ? d.L : 1;
            c->dbits = (uint32_t *)take(ar, (size_t)(layers * c->dbits_layer) * 4, plan, CAT_ACTS);
            for (int g = 0; g < GRP_COUNT; g++) c->dbits_of[g] = -1;
        }
        if (c->side) {
            c->sd_gA = F32((int64_t)c->R_max * din);
            c->sd_gB = F32((int64_t)c->dout_max * c->R_max);
            c->sd_part = F32(mx);
            if (be->dropout > 0) c->sd_xd = BF(T * din);
        }
    }
#undef BF
#undef F32
}

// Where the adapter's products run: the main lane, or the side lane (cuda_impl.side) for the weight
// gradients, each with its own split-K partials, dL/dA, dL/dB and dropout buffers.
typedef struct {
    cuda_ctx *ctx;
    float *part, *gA, *gB;
    bf16 *xd;
} ad_lane;

static ad_lane lane_main(const cuda_impl *c) { return (ad_lane){c->ctx, c->ad_part, c->ad_gA, c->ad_gB, c->ad_xd}; }

// The lane for the weight gradients of what the main stream has queued so far: the side lane starts
// them once that work is done.
static ad_lane side_begin(cuda_impl *c) {
    if (!c->side) return lane_main(c);
    CUDA_CHECK(cudaEventRecord(c->side_go, c->ctx->stream));
    CUDA_CHECK(cudaStreamWaitEvent(cuda_ctx_stream(c->side), c->side_go, 0));
    return (ad_lane){c->side, c->sd_part, c->sd_gA, c->sd_gB, c->sd_xd};
}

static void side_end(cuda_impl *c, int g) {
    if (!c->side) return;
    CUDA_CHECK(cudaEventRecord(c->side_done[g], cuda_ctx_stream(c->side)));
    c->side_busy[g] = 1;
}

// The main stream waits for the side's work on group g (GRP_COUNT: every group): before it overwrites
// a buffer that work reads (gxb, the q|k|v gradient, recomputed activations), and before the
// micro-batch ends (grad complete).
static void side_join(cuda_impl *c, int g) {
    if (!c->side) return;
    for (int i = 0; i < GRP_COUNT; i++)
        if ((g == GRP_COUNT || i == g) && c->side_busy[i]) {
            CUDA_CHECK(cudaStreamWaitEvent(c->ctx->stream, c->side_done[i], 0));
            c->side_busy[i] = 0;
        }
}

// An adapter GEMM (beta = 0) on lane ln. These skinny products (N = the rank, or K = the tokens) are
// left to cuBLASLt, whose heuristic picks narrow tiles and, where it pays, its own split-K with a
// separate, deterministic sum: ncu, a 6-layer step, against our split-K (strided batches into fp32
// partials and a sum kernel): 7B 6.03 -> 5.32 ms, 3B 7.22 -> 6.62 (adapter products and sums).
static void ad_gemm(const ad_lane *ln, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16 *A,
                    int64_t lda, const bf16 *B, int64_t ldb, void *D, int64_t ldd, gemm_dtype cd) {
    gemm_cuda(ln->ctx, ta, tb, M, N, K, alpha, A, lda, B, ldb, 0.0f, NULL, D, ldd, cd);
}

// ---- frozen weights and adapters ------------------------------------------------------------------
//
// A group's GEMMs take the adapter along by widening the contraction (K-augmentation):
//   forward   y  = [x | h] [W | sB]^T    h = xd A^T in the input's extra columns, sB beside W's rows
//   backward  gx = [gy | gh] [W ; A]      gh = gy (sB) in the output gradient's extra columns, A below W
// so the adapter never makes its own pass over y or gx. The weight buffer holds both blocks:
// [d_out + Rp][d_in + Rp] with W top-left, sB top-right, A bottom-left. With dropout (a mask per
// module) the backward term (gh A) * mask cannot ride along and is added per module.

// Dequantize NF4 group `grp` of layer l with its adapter blocks into buf ([d_out + Rp][d_in + Rp]) on st,
// in one launch.
static void dequant_group(cuda_impl *c, const dims *d, int l, int grp, bf16 *buf, cudaStream_t st) {
    const cuda_layer *L = &c->model.layers[l];
    int di, dout;
    cuda_group_dims(&c->model.cfg, grp, &di, &dout);
    int64_t ld = di + rp(c, grp);
    weight_piece p[WEIGHT_PIECES_MAX];
    int n = 0;
    int mods[3] = {MOD_Q, MOD_K, MOD_V}, nm = 3;
    int64_t row0[3] = {0, d->Q, d->Q + d->KV};
    switch (grp) {
    case GRP_QKV: break;
    case GRP_O: mods[0] = MOD_O, nm = 1; break;
    case GRP_GU: mods[0] = MOD_GATE, mods[1] = MOD_UP, row0[1] = d->I, nm = 2; break;
    default: mods[0] = MOD_DOWN, nm = 1; break;
    }
    for (int i = 0; i < nm; i++) p[n++] = (weight_piece){&L->q[mods[i]], NULL, 0, 0, 0, buf + row0[i] * ld};
    const cuda_adapter_group *ag = &c->grp[grp];
    if (ag->n) n += adapter_block_pieces(p + n, buf, ld, di, dout, ag->B[l], ag->A[l], ag->R);
    weight_group_fill_cuda(st, p, n, ld);
}

// ---- the NF4 weight stream ------------------------------------------------------------------------
//
// A micro-batch asks for weight groups in a known order (c->wseq). Each group type has its own buffer
// (slot); the weight stream dequantizes a group into its slot ahead of the GEMM that reads it, once the
// GEMMs that read the slot's previous contents are done (w_free). Beside a cuBLAS GEMM it cannot run
// (the GEMM's blocks fill every register file), beside the memory-bound kernels it takes their
// bandwidth: what helps is fewer dequantizations and the main stream never waiting. So the attention
// kernels start the look-ahead (weights_ahead: up to a layer's four groups, the attention being the
// longest stretch without a GEMM), and a slot that already holds the group asked for (the last layer's
// groups at the turn to backward, a recomputed layer's groups in its backward) is used again without
// dequantizing. docs/BENCHMARKS.md (eighth session) has what this and the alternatives measured.

// The order in which a micro-batch asks for weight groups (forward, then backward with its
// recomputation).
static void weight_sequence(cuda_impl *c, int L, int backward) {
    int n = 0;
    for (int l = 0; l < L; l++)
        for (int g = 0; g < GRP_COUNT; g++) c->wseq[n++] = l * GRP_COUNT + g;
    for (int l = L - 1; l >= 0 && backward; l--) {
        if (c->recompute == RECOMPUTE_FULL) {
            c->wseq[n++] = l * GRP_COUNT + GRP_QKV;
            c->wseq[n++] = l * GRP_COUNT + GRP_O;
        }
        if (c->recompute != RECOMPUTE_NONE) c->wseq[n++] = l * GRP_COUNT + GRP_GU;
        c->wseq[n++] = l * GRP_COUNT + GRP_DOWN;
        c->wseq[n++] = l * GRP_COUNT + GRP_GU;
        c->wseq[n++] = l * GRP_COUNT + GRP_O;
        if (l > 0) c->wseq[n++] = l * GRP_COUNT + GRP_QKV;  // layer 0: no input gradient (see layer_backward)
    }
    c->wn = n;
    c->wi = c->wis = c->wfr = 0;
    if (!c->wpipe) return;
    // the slots' contents are stale (the adapter blocks change with the parameters), and every GEMM of
    // the previous micro-batch that read them is queued before this point
    for (int g = 0; g < GRP_COUNT; g++) {
        c->wtag[g] = -1;
        CUDA_CHECK(cudaEventRecord(c->w_free[g], c->ctx->stream));
    }
}

// Whether sequence entry j may be dequantized now: its slot holds it already, or no entry of its type
// between the first one whose readers are not known to be done (wfr) and j still needs the slot.
static int weight_may_issue(const cuda_impl *c, int j) {
    int g = c->wseq[j] % GRP_COUNT;
    if (c->wtag[g] == c->wseq[j]) return 1;
    for (int k = c->wfr; k < j; k++)
        if (c->wseq[k] % GRP_COUNT == g) return 0;
    return 1;
}

// Dequantize sequence entry wis into its slot on the weight stream (after `go`, when given).
static void weight_issue(cuda_impl *c, const dims *d, cudaEvent_t go) {
    int e = c->wseq[c->wis++], g = e % GRP_COUNT;
    if (c->wtag[g] == e) return;  // there already (w_ready[g] still marks its dequantization)
    CUDA_CHECK(cudaStreamWaitEvent(c->wstream, c->w_free[g], 0));
    if (go) CUDA_CHECK(cudaStreamWaitEvent(c->wstream, go, 0));
    dequant_group(c, d, e / GRP_COUNT, g, c->wslot[g], c->wstream);
    CUDA_CHECK(cudaEventRecord(c->w_ready[g], c->wstream));
    c->wtag[g] = e;
}

// The GEMMs of every group handed out so far are queued: their slots may be refilled after them.
static void weight_release(cuda_impl *c) {
    if (c->wfr < c->wi) {
        CUDA_CHECK(cudaEventRecord(c->w_free[c->wseq[c->wi - 1] % GRP_COUNT], c->ctx->stream));
        c->wfr = c->wi;
    }
}

// Called right before an attention kernel is queued, after the GEMM of the last group handed out: the
// next groups of the sequence (up to a layer's four) start on the weight stream with the attention.
static void weights_ahead(cuda_impl *c, const dims *d) {
    if (!c->wpipe || !c->wahead) return;
    weight_release(c);
    CUDA_CHECK(cudaEventRecord(c->w_go, c->ctx->stream));
    while (c->wis < c->wn && c->wis - c->wi < GRP_COUNT && weight_may_issue(c, c->wis)) weight_issue(c, d, c->w_go);
}

// The bf16 weight of group `grp` of layer l with its adapter blocks (row stride d_in + Rp). With the
// weight stream: its slot, once dequantized there (now, if the look-ahead did not reach it); the next
// group starts there too if its slot is free. Without it (MOSFT_WEIGHT_PREFETCH=0): one buffer,
// dequantized on the main stream.
static const bf16 *group_weight(cuda_impl *c, const dims *d, int l, int grp) {
    const cuda_layer *L = &c->model.layers[l];
    if (!c->model.nf4) return L->w[grp];
    prof_mark(c, PROF_DEQUANT);
    cudaStream_t st = c->ctx->stream;
    int want = l * GRP_COUNT + grp;
    if (!c->wpipe || c->wi >= c->wn || c->wseq[c->wi] != want) {  // no stream, or off the sequence
        if (c->wpipe) {  // the slot may be the target of a queued dequantization: after it, and off the stream
            CUDA_CHECK(cudaStreamWaitEvent(st, c->w_ready[grp], 0));
            c->wn = c->wis;  // nothing more goes ahead in this micro-batch
            c->wtag[grp] = -1;
        }
        dequant_group(c, d, l, grp, c->wslot[grp], st);
        return c->wslot[grp];
    }
    weight_release(c);
    if (c->wis == c->wi) weight_issue(c, d, NULL);
    c->wi++;
    CUDA_CHECK(cudaStreamWaitEvent(st, c->w_ready[grp], 0));
    if (c->wis == c->wi && c->wis < c->wn && weight_may_issue(c, c->wis)) weight_issue(c, d, NULL);
    return c->wslot[grp];
}

void cuda_build_factors(backend *be) {
    cuda_impl *c = (cuda_impl *)be->impl;
    if (c->built) return;
    if (c->peer)
        cuda_peer_build(be);
    else
        lowrank_gather_batch_cuda(c->ctx, c->gjobs, c->n_gjobs, c->gjob_max, c->params);
    for (int g = 0; g < GRP_COUNT; g++) {
        cuda_adapter_group *ag = &c->grp[g];
        for (int l = 0; l < be->cfg.n_layers && ag->n; l++) {
            if (!c->model.nf4) {  // a bf16 base keeps the blocks beside its weights
                int64_t ld = ag->d_in + rp(c, g);
                adapter_blocks_cuda(c->ctx->stream, c->model.layers[l].w[g], ld, ag->d_in, ag->d_out, ag->B[l], ag->A[l], ag->R);
            }
        }
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
    s.thr = rng_dropout_threshold16(be->dropout);
    s.keep = 1.0f / (1.0f - be->dropout);
    return s;
}

static int dropout_on(const backend *be, const dropout_ctx *dc) { return dc && be->dropout > 0.0f; }

// Module i of group g in layer l: where its mask bits are kept (see cuda_impl.dbits).
static uint32_t *mask_bits(const cuda_impl *c, int l, int g, int i) {
    int64_t layer = c->recompute == RECOMPUTE_NONE ? l : 0;
    return c->dbits + layer * c->dbits_layer + c->dbits_grp[g] + i * c->dbits_mod[g];
}

// The masks of group g's modules in layer l: keys[i] and bit stores bits[i] of module i; returns the
// threshold and multiplier they share.
static drop_spec group_masks(const backend *be, const dropout_ctx *dc, int l, int g, uint64_t keys[3], uint32_t *bits[3]) {
    const cuda_impl *c = (const cuda_impl *)be->impl;
    drop_spec ds = {0, 0, 0, 1.0f};
    for (int i = 0; i < c->grp[g].n; i++) {
        ds = drop_of(be, dc, l, c->grp[g].mod[i]);
        keys[i] = ds.key;
        bits[i] = mask_bits(c, l, g, i);
    }
    return ds;
}

// Whether the forward of group g in layer l keeps its masks as bits now (and says so in dbits_of):
// without recomputation always; with it, only while the backward recomputes the layer.
static int mask_bits_write(cuda_impl *c, int l, int g) {
    if (!c->dbits || c->grp[g].d_in % 32 != 0) return 0;
    if (c->recompute == RECOMPUTE_NONE) return 1;
    if (!c->recomputing) return 0;
    c->dbits_of[g] = l;
    return 1;
}

// Whether the backward of group g in layer l finds its masks as bits.
static int mask_bits_read(const cuda_impl *c, int l, int g) {
    if (!c->dbits || c->grp[g].d_in % 32 != 0) return 0;
    return c->recompute == RECOMPUTE_NONE || c->dbits_of[g] == l;
}

// Whether group g's masked input-gradient term reads the kept bits of layer l (the fused h kernel
// writes them; see adapter_h), else the generator.
static int dx_bits_kept(const cuda_impl *c, int l, int g) {
    return mask_bits_read(c, l, g) && lowrank_dropout_fused_fits(c->grp[g].n, c->rank);
}

// h = dropout(x) A^T of every adapted module of group g, into x's extra columns (x [T][d_in + Rp] with
// row stride ldx): the left operand of the group's K-augmented GEMM.
static void adapter_h(backend *be, const dims *d, int l, int g, bf16 *x, int64_t ldx, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_adapter_group *ag = &c->grp[g];
    if (!ag->n) return;
    int r = c->rank;
    bf16 *h = x + ag->d_in;
    ad_lane m = lane_main(c);
    if (!dropout_on(be, dc)) {
        ad_gemm(&m, 0, 1, d->T, ag->R, ag->d_in, 1.0f, x, ldx, ag->A[l], ag->d_in, h, ldx, GEMM_BF16);
        return;
    }
    if (lowrank_dropout_fused_fits(ag->n, r)) {  // every module's masked product in one pass over x
        uint64_t keys[3];
        uint32_t *bits[3];
        drop_spec ds = group_masks(be, dc, l, g, keys, bits);
        lowrank_dropout_h_cuda(m.ctx, h, ldx, x, ldx, ag->A[l], ag->n, r, d->T, ag->d_in, keys, ds.thr, ds.keep,
                               mask_bits_write(c, l, g) ? bits : NULL, m.part, c->ad_part_floats);
        return;
    }
    for (int i = 0; i < ag->n; i++) {  // other shapes: a masked copy and a GEMM per module
        drop_spec ds = drop_of(be, dc, l, ag->mod[i]);
        dropout_apply_cuda(m.ctx, m.xd, x, ldx, d->T, ag->d_in, ds.key, ds.thr, ds.keep, NULL);
        ad_gemm(&m, 0, 1, d->T, r, ag->d_in, 1.0f, m.xd, ag->d_in, ag->A[l] + (int64_t)i * r * ag->d_in, ag->d_in,
                h + i * r, ldx, GEMM_BF16);
    }
}

// Modules i0 .. i0+n-1 of group g in layer l: module i's dL/dA at gA + (i - i0) sA ([r][d_in]), its
// dL/dB [d_out_m][r] at gB + row_off[i] R + i r (row stride R), into the gradient: MoS and LoRA scatter on
// the device, the n modules in one launch; the peer methods' copies go to the host (h_dfac) for their own
// scatter after the micro-batch (cuda/peer_cuda.cu). Stream order keeps gA, gB alive until the copies
// are done.
static void ad_scatter(cuda_impl *c, const ad_lane *ln, const cuda_adapter_group *ag, int l, int i0, int n, const float *gA,
                       int64_t sA, const float *gB) {
    int r = c->rank;
    const float *pa[3], *pb[3];
    for (int i = 0; i < n; i++) {
        pa[i] = gA + i * sA;
        pb[i] = gB + (int64_t)ag->row_off[i0 + i] * ag->R + (i0 + i) * r;
    }
    if (!c->peer) {
        lowrank_scatter_group_cuda(ln->ctx, &ag->map[l * 3 + i0], n, pa, pb, c->grad);
        return;
    }
    MOSFT_ASSERT(ln->ctx == c->ctx);  // the peers' copies are ordered on the main stream (no side lane)
    for (int i = 0; i < n; i++) {
        float *dst = c->h_dfac + c->dense_off[l * MOD_COUNT + ag->mod[i0 + i]];
        CUDA_CHECK(cudaMemcpyAsync(dst, pa[i], sizeof(float) * (size_t)r * ag->d_in, cudaMemcpyDeviceToHost, c->ctx->stream));
        CUDA_CHECK(cudaMemcpy2DAsync(dst + (size_t)r * ag->d_in, sizeof(float) * (size_t)r, pb[i], sizeof(float) * (size_t)ag->R,
                                     sizeof(float) * (size_t)r, (size_t)ag->d_out_m[i0 + i], cudaMemcpyDeviceToHost,
                                     c->ctx->stream));
    }
}

// K of group g's forward GEMM: the input width plus the adapter's columns.
static int64_t k_fwd(const cuda_impl *c, int g, int64_t d_in) { return d_in + c->grp[g].R; }

// Backward of group g's adapters, before its input-gradient GEMM: gh = gy (sB) into gy's extra columns
// (gy [T][d_out + Rp], row stride ldgy) on the main lane (unless gh_done & 1: the SwiGLU backward made it),
// then on the side lane dL/dB = s gy^T h (unless gh_done & 2: the SwiGLU backward made it, in c->ad_gB),
// dL/dA = gh^T xd, both scattered into c->grad. Returns the K of the input-gradient GEMM: d_out + R
// when gh A rides along (no dropout), else d_out (adapter_dx_dropout adds the masked term after it).
static int64_t adapter_grads(backend *be, const dims *d, int l, int g, const bf16 *x, int64_t ldx, bf16 *gy, int64_t ldgy,
                             const dropout_ctx *dc, int gh_done) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_adapter_group *ag = &c->grp[g];
    int di, dout;
    cuda_group_dims(&be->cfg, g, &di, &dout);
    if (!ag->n) return dout;
    int r = c->rank, R = ag->R;
    bf16 *gh = gy + dout;
    const bf16 *h = x + di;
    ad_lane m = lane_main(c);
    if (!(gh_done & 1)) ad_gemm(&m, 0, 0, d->T, R, dout, 1.0f, gy, ldgy, ag->B[l], R, gh, ldgy, GEMM_BF16);
    ad_lane w = side_begin(c);
    float *gB = w.gB;
    if (gh_done & 2)
        gB = c->ad_gB;
    else
        ad_gemm(&w, 1, 0, dout, R, d->T, c->scaling, gy, ldgy, h, ldx, gB, R, GEMM_F32);
    if (!dropout_on(be, dc)) {
        ad_gemm(&w, 1, 0, R, di, d->T, 1.0f, gh, ldgy, x, ldx, w.gA, di, GEMM_F32);
        ad_scatter(c, &w, ag, l, 0, ag->n, w.gA, (int64_t)r * di, gB);
        side_end(c, g);
        return dout + R;
    }
    if (lowrank_dropout_fused_fits(ag->n, r)) {  // every module's masked dL/dA in one pass over x
        uint64_t keys[3];
        uint32_t *bits[3];
        drop_spec ds = group_masks(be, dc, l, g, keys, bits);
        lowrank_dropout_da_cuda(w.ctx, w.gA, gh, ldgy, x, ldx, ag->n, r, d->T, di, keys, ds.thr, ds.keep,
                                mask_bits_read(c, l, g) ? bits : NULL, w.part, c->ad_part_floats);
        ad_scatter(c, &w, ag, l, 0, ag->n, w.gA, (int64_t)r * di, gB);
        side_end(c, g);
        return dout;
    }
    for (int i = 0; i < ag->n; i++) {  // other shapes: a masked copy and a GEMM per module
        drop_spec ds = drop_of(be, dc, l, ag->mod[i]);
        dropout_apply_cuda(w.ctx, w.xd, x, ldx, d->T, di, ds.key, ds.thr, ds.keep, NULL);
        ad_gemm(&w, 1, 0, r, di, d->T, 1.0f, gh + i * r, ldgy, w.xd, di, w.gA, di, GEMM_F32);
        ad_scatter(c, &w, ag, l, i, 1, w.gA, 0, gB);
    }
    side_end(c, g);
    return dout;
}

// With dropout: gx (fp32 or bf16, row stride ldgx) += sum_m (gh_m A_m) * mask_m over the modules of
// group g, in one pass over gx.
static void adapter_dx_dropout(backend *be, const dims *d, int l, int g, const bf16 *gy, int64_t ldgy, void *gx,
                               int gx_f32, int64_t ldgx, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_adapter_group *ag = &c->grp[g];
    if (!ag->n || !dropout_on(be, dc)) return;
    int di, dout;
    cuda_group_dims(&be->cfg, g, &di, &dout);
    uint64_t keys[3];
    uint32_t *bits[3];
    drop_spec ds = group_masks(be, dc, l, g, keys, bits);
    int kept = dx_bits_kept(c, l, g);
    lowrank_dropout_dx_cuda(c->ctx, gx, gx_f32, ldgx, gy + dout, ldgy, ag->A[l], ag->n, c->rank, d->T, di, keys, ds.thr,
                            ds.keep, kept ? bits : NULL);
}

// a = silu(gate) * up of layer l with the down adapter's h = a A^T in one pass, when the shapes allow and
// there is no dropout (the fused dropout kernel makes h from a then). Returns whether it did.
static int swiglu_forward_h(backend *be, const dims *d, int l, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    const cuda_adapter_group *ag = &c->grp[GRP_DOWN];
    lds ld = lds_of(c, d);
    if (!c->swiglu_fused || !ag->n || dropout_on(be, dc) || !swiglu_lowrank_fits(0, d->I, ld.gu, ag->R, c->rank)) return 0;
    cuda_acts *a = &c->acts[l];
    swiglu_lowrank_forward_cuda(c->ctx, a->a, ld.a, a->a + d->I, ld.a, a->gu, ld.gu, ag->A[l], ag->R, d->T, d->I, c->ad_part,
                                c->ad_part_floats);
    return 1;
}

// Whether the SwiGLU backward takes the fused kernel (swiglu_backward_gh).
static int swiglu_backward_fused(const cuda_impl *c, const dims *d) {
    const cuda_adapter_group *ag = &c->grp[GRP_GU];
    return c->swiglu_fused && ag->n && swiglu_lowrank_fits(1, d->I, lds_of(c, d).gu, ag->R, c->rank);
}

// With dropout, the down module's masked input gradient (what adapter_dx_dropout adds to ga) rides in the
// fused SwiGLU backward when that runs, the down group is that one module and its mask was kept as bits:
// fills *dx and returns 1 (one pass over ga fewer: ~0.2 ms a 7B layer).
static int down_dx_in_swiglu(backend *be, const dims *d, int l, const bf16 *gy, int64_t ldgy, const dropout_ctx *dc,
                             swiglu_dx *dx) {
    cuda_impl *c = (cuda_impl *)be->impl;
    const cuda_adapter_group *ag = &c->grp[GRP_DOWN];
    if (!dropout_on(be, dc) || ag->n != 1 || !swiglu_backward_fused(c, d) || !dx_bits_kept(c, l, GRP_DOWN) ||
        !swiglu_dx_fits(d->I, c->rank, ldgy, gy + d->C, ag->A[l]))
        return 0;
    uint64_t keys[3];
    uint32_t *bits[3];
    drop_spec ds = group_masks(be, dc, l, GRP_DOWN, keys, bits);
    dx->gh = gy + d->C;
    dx->ldgh = ldgy;
    dx->A = ag->A[l];
    dx->bits = bits[0];
    dx->keep = ds.keep;
    return 1;
}

// dL/dgate | dL/dup (in place over layer l's gate | up, from ga = dL/da) with the gate|up adapter's
// gh = [dgate | dup] sB in one pass, when the shapes allow (and with dx, ga read with the down module's
// dropout term added). Without dx (and the peers' host-side scatter) the same pass also makes the
// group's dL/dB into c->ad_gB where it fits (the side lane then scatters it from there instead of
// reading gu again). Returns adapter_grads' gh_done: 1 gh made, | 2 dL/dB made, 0 only the SwiGLU
// backward ran.
static int swiglu_backward_gh(cuda_impl *c, const dims *d, int l, const bf16 *ga, const swiglu_dx *dx) {
    const cuda_adapter_group *ag = &c->grp[GRP_GU];
    cuda_acts *a = &c->acts[l];
    lds ld = lds_of(c, d);
    if (!swiglu_backward_fused(c, d)) {
        MOSFT_ASSERT(!dx);
        swiglu_backward_cuda(c->ctx, a->gu, ld.gu, ga, d->T, d->I);
        return 0;
    }
    int cg = -1, cu = -1;  // the gate and up modules' columns of R
    for (int i = 0; i < ag->n; i++) {
        if (ag->mod[i] == MOD_GATE) cg = i * c->rank;
        if (ag->mod[i] == MOD_UP) cu = i * c->rank;
    }
    bf16 *gh = a->gu + 2 * (int64_t)d->I;
    if (!dx && !c->peer) {
        side_join(c, GRP_GU);  // the layer above's gate|up scatter read c->ad_gB
        if (swiglu_lowrank_backward_db_cuda(c->ctx, a->gu, ld.gu, ga, gh, ld.gu, ag->B[l], ag->R, c->rank, cg, cu, a->h2 + d->C,
                                            ld.h2, c->scaling, c->ad_gB, d->T, d->I, c->ad_part, c->ad_part_floats))
            return 3;
    }
    swiglu_lowrank_backward_cuda(c->ctx, a->gu, ld.gu, ga, gh, ld.gu, ag->B[l], ag->R, c->rank, cg, cu, d->T, d->I, c->ad_part,
                                 c->ad_part_floats, dx);
    return 1;
}

// ---- the layer --------------------------------------------------------------------------------------

static int att_chunk(const cuda_impl *c, const dims *d) {
    int bc = d->B;
    int flash = attention_uses_flash(d->D);
    while (bc > 1) {
        size_t need = flash ? flash_attention_scratch_bytes(bc, d->S, d->Hq)
                            : attention_scratch_bytes(bc, d->S, d->Hq, d->Hkv, d->D);
        if (need <= c->big_bytes) break;
        bc--;
    }
    return bc;
}

// h1 (+ the q|k|v adapter's h) of layer l from its x_in.
static void norm1_forward(backend *be, const dims *d, int l, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_acts *a = &c->acts[l];
    lds ld = lds_of(c, d);
    prof_mark(c, PROF_ELEM);
    rmsnorm_forward_cuda(c->ctx, a->h1, ld.h1, a->rstd1, a->x_in, c->model.layers[l].attn_norm, d->T, d->C,
                         (float)be->cfg.rms_eps);
    prof_mark(c, PROF_ADAPTER);
    adapter_h(be, d, l, GRP_QKV, a->h1, ld.h1, dc);
}

// q, k, v, att, lse, x_mid of layer l from its h1.
static void attn_block_forward(backend *be, const dims *d, int l, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_acts *a = &c->acts[l];
    cuda_ctx *ctx = c->ctx;
    lds ld = lds_of(c, d);
    const bf16 *w = group_weight(c, d, l, GRP_QKV);
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 1, d->T, d->W, k_fwd(c, GRP_QKV, d->C), 1.0f, a->h1, ld.h1, w, d->C + rp(c, GRP_QKV), 0.0f, NULL,
              a->qkv, d->W, GEMM_BF16);
    prof_mark(c, PROF_ELEM);
    rope_qk_cuda(ctx, a->qkv, d->W, c->cs, d->B, d->S, d->Hq, d->Hkv, d->D);
    weights_ahead(c, d);  // after the RoPE pass: the weight stream's fill runs beside the attention kernels, not
                          // beside a pass that also streams DRAM (docs/BENCHMARKS.md, twentieth session)
    prof_mark(c, PROF_ATTN);
    attention_forward_cuda(ctx, a->att, ld.att, a->lse, a->qkv, d->W, c->mask, d->B, d->S, d->Hq, d->Hkv, d->D, c->big,
                           att_chunk(c, d), c->o_tmp);
    prof_mark(c, PROF_ADAPTER);
    adapter_h(be, d, l, GRP_O, a->att, ld.att, dc);
    w = group_weight(c, d, l, GRP_O);
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 1, d->T, d->C, k_fwd(c, GRP_O, d->Q), 1.0f, a->att, ld.att, w, d->Q + rp(c, GRP_O), 1.0f, a->x_in,
              a->x_mid, d->C, GEMM_BF16);
}

// h2, gu, a (+ the adapters' h) of layer l from its x_mid; with x_out, also x_out = x_mid + down(a).
static void mlp_block_forward(backend *be, const dims *d, int l, bf16 *x_out, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_acts *a = &c->acts[l];
    const cuda_layer *L = &c->model.layers[l];
    cuda_ctx *ctx = c->ctx;
    lds ld = lds_of(c, d);
    prof_mark(c, PROF_ELEM);
    rmsnorm_forward_cuda(ctx, a->h2, ld.h2, a->rstd2, a->x_mid, L->mlp_norm, d->T, d->C, (float)be->cfg.rms_eps);
    prof_mark(c, PROF_ADAPTER);
    adapter_h(be, d, l, GRP_GU, a->h2, ld.h2, dc);
    const bf16 *w = group_weight(c, d, l, GRP_GU);
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 1, d->T, 2 * (int64_t)d->I, k_fwd(c, GRP_GU, d->C), 1.0f, a->h2, ld.h2, w, d->C + rp(c, GRP_GU),
              0.0f, NULL, a->gu, ld.gu, GEMM_BF16);
    prof_mark(c, PROF_ELEM);
    if (!swiglu_forward_h(be, d, l, dc)) {
        swiglu_forward_cuda(ctx, a->a, ld.a, a->gu, ld.gu, d->T, d->I);
        prof_mark(c, PROF_ADAPTER);
        adapter_h(be, d, l, GRP_DOWN, a->a, ld.a, dc);  // saved for backward even when x_out is not needed
    }
    if (!x_out) return;
    w = group_weight(c, d, l, GRP_DOWN);
    prof_mark(c, PROF_GEMM);
    gemm_cuda(ctx, 0, 1, d->T, d->C, k_fwd(c, GRP_DOWN, d->I), 1.0f, a->a, ld.a, w, d->I + rp(c, GRP_DOWN), 1.0f,
              a->x_mid, x_out, d->C, GEMM_BF16);
}

// (With MOSFT_PROFILE=1 a wait for the side lane counts as "adapter bwd": the joins follow its marks.)
// The pair c->gxb (high half, the GEMMs' operand) + c->gx_lo holds dL/dx_out on entry, dL/dx_in on exit
// (except for layer 0, whose input gradient nothing needs: the q|k|v input-gradient GEMM and the norm
// backward are skipped).
static void layer_backward(backend *be, const dims *d, int l, const dropout_ctx *dc) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cuda_acts *a = &c->acts[l];
    const cuda_layer *L = &c->model.layers[l];
    cuda_ctx *ctx = c->ctx;
    lds ld = lds_of(c, d);
    // MLP: x_out = x_mid + down(silu(gate(h2)) * up(h2))
    prof_mark(c, PROF_ADAPTER_BWD);
    int64_t K = adapter_grads(be, d, l, GRP_DOWN, a->a, ld.a, c->gxb, ld.gxb, dc, 0);
    const bf16 *w = group_weight(c, d, l, GRP_DOWN);
    bf16 *ga = c->gbig;  // [T][I]
    prof_mark(c, PROF_GEMM_BWD);
    gemm_cuda(ctx, 0, 0, d->T, d->I, K, 1.0f, c->gxb, ld.gxb, w, d->I + rp(c, GRP_DOWN), 0.0f, NULL, ga, d->I, GEMM_BF16);
    prof_mark(c, PROF_ADAPTER_BWD);
    swiglu_dx sdx;
    int dx_in = down_dx_in_swiglu(be, d, l, c->gxb, ld.gxb, dc, &sdx);
    if (!dx_in) adapter_dx_dropout(be, d, l, GRP_DOWN, c->gxb, ld.gxb, ga, 0, d->I, dc);
    prof_mark(c, PROF_ELEM);
    int gh_done = swiglu_backward_gh(c, d, l, ga, dx_in ? &sdx : NULL);  // a->gu: dL/dgate | dL/dup (| gh)
    prof_mark(c, PROF_ADAPTER_BWD);
    K = adapter_grads(be, d, l, GRP_GU, a->h2, ld.h2, a->gu, ld.gu, dc, gh_done);
    w = group_weight(c, d, l, GRP_GU);
    prof_mark(c, PROF_GEMM_BWD);
    gemm_cuda(ctx, 0, 0, d->T, d->C, K, 1.0f, a->gu, ld.gu, w, d->C + rp(c, GRP_GU), 0.0f, NULL, c->gh, d->C, GEMM_BF16);
    prof_mark(c, PROF_ADAPTER_BWD);
    adapter_dx_dropout(be, d, l, GRP_GU, a->gu, ld.gu, c->gh, 0, d->C, dc);
    side_join(c, GRP_DOWN);  // the down adapter's weight gradients read gxb
    prof_mark(c, PROF_ELEM);
    rmsnorm_backward_cuda(ctx, c->gxb, ld.gxb, c->gx_lo, 1, c->gh, 0, a->x_mid, L->mlp_norm, a->rstd2, d->T, d->C);
    // attention: x_mid = x_in + o(attention(rope(q(h1)), rope(k(h1)), v(h1)))
    prof_mark(c, PROF_ADAPTER_BWD);
    K = adapter_grads(be, d, l, GRP_O, a->att, ld.att, c->gxb, ld.gxb, dc, 0);
    w = group_weight(c, d, l, GRP_O);
    bf16 *gatt = c->gbig;  // [T][Q]
    prof_mark(c, PROF_GEMM_BWD);
    gemm_cuda(ctx, 0, 0, d->T, d->Q, K, 1.0f, c->gxb, ld.gxb, w, d->Q + rp(c, GRP_O), 0.0f, NULL, gatt, d->Q, GEMM_BF16);
    prof_mark(c, PROF_ADAPTER_BWD);
    adapter_dx_dropout(be, d, l, GRP_O, c->gxb, ld.gxb, gatt, 0, d->Q, dc);
    side_join(c, GRP_QKV);  // the q|k|v adapter's weight gradients of the layer above read c->qkv
    weights_ahead(c, d);
    prof_mark(c, PROF_ATTN_BWD);
    bf16 *gqkv = c->qkv;  // the q|k|v projection's gradient, RoPE undone
    attention_backward_cuda(ctx, gqkv, ld.qkv, c->cs, gatt, a->att, ld.att, a->lse, a->qkv, d->W, c->mask, d->B, d->S, d->Hq,
                            d->Hkv, d->D, c->delta, c->big, att_chunk(c, d), c->o_tmp, c->gq, c->gk, c->gv);
    prof_mark(c, PROF_ADAPTER_BWD);
    K = adapter_grads(be, d, l, GRP_QKV, a->h1, ld.h1, gqkv, ld.qkv, dc, 0);
    if (l == 0) return;  // dL/dx_in of layer 0 would only reach the embedding, which is frozen
    w = group_weight(c, d, l, GRP_QKV);
    prof_mark(c, PROF_GEMM_BWD);
    gemm_cuda(ctx, 0, 0, d->T, d->C, K, 1.0f, gqkv, ld.qkv, w, d->C + rp(c, GRP_QKV), 0.0f, NULL, c->gh, d->C, GEMM_BF16);
    prof_mark(c, PROF_ADAPTER_BWD);
    adapter_dx_dropout(be, d, l, GRP_QKV, gqkv, ld.qkv, c->gh, 0, d->C, dc);
    side_join(c, GRP_O);  // the o adapter's weight gradients read gxb
    prof_mark(c, PROF_ELEM);
    rmsnorm_backward_cuda(ctx, c->gxb, ld.gxb, c->gx_lo, 1, c->gh, 0, a->x_in, L->attn_norm, a->rstd1, d->T, d->C);
}

// ---- one micro-batch --------------------------------------------------------------------------------

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
    free(c->h_ce_list);
    c->h_targets = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)Bn * Sn);
    c->h_ce_list = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)Bn * Sn);
    return MOSFT_OK;
}

// MOSFT_CUDA_PROFILE_STEP=n: the n-th micro-batch (from 1) runs between cudaProfilerStart and Stop, for
// a kernel profiler started with its collection off (ncu --profile-from-start off).
static int profiler_window(int *calls) {
    static int want = -1;
    if (want < 0) {
        const char *e = getenv("MOSFT_CUDA_PROFILE_STEP");
        want = e ? atoi(e) : 0;
    }
    return want > 0 && ++*calls == want;
}

int cuda_step_run(backend *be, const micro_batch *mb, float loss_scale, const dropout_ctx *dc, int backward,
                             double *loss_sum, int64_t *n_tokens, float *logits_host) {
    static int calls = 0;
    if (profiler_window(&calls)) {
        cudaProfilerStart();
        int rc = cuda_step_run(be, mb, loss_scale, dc, backward, loss_sum, n_tokens, logits_host);
        cudaDeviceSynchronize();
        cudaProfilerStop();
        return rc;
    }
    cuda_impl *c = (cuda_impl *)be->impl;
    int rc = backend_check_batch(be, mb);
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
            if (c->h_targets[i] != OPS_IGNORE_INDEX) c->h_ce_list[cnt++] = (int32_t)i;
        }
    size_t nb = sizeof(int32_t) * (size_t)d.T;
    // lm_head + CE computes the supervised rows alone (prompt and padding rows have no loss), unless
    // every row's logits are wanted
    int64_t n_list = cnt ? (cnt + CE_ROW_QUANTUM - 1) / CE_ROW_QUANTUM * CE_ROW_QUANTUM : 0;
    if (n_list > d.T) n_list = d.T;
    for (int64_t i = cnt; i < n_list; i++) c->h_ce_list[i] = c->h_ce_list[0];  // pads (they write nothing)
    if (!logits_host && n_list)
        CUDA_CHECK(cudaMemcpyAsync(c->ce_list, c->h_ce_list, sizeof(int32_t) * (size_t)n_list, cudaMemcpyHostToDevice,
                                   ctx->stream));
    CUDA_CHECK(cudaMemcpyAsync(c->ids, mb->input_ids, nb, cudaMemcpyHostToDevice, ctx->stream));
    CUDA_CHECK(cudaMemcpyAsync(c->targets, c->h_targets, nb, cudaMemcpyHostToDevice, ctx->stream));
    CUDA_CHECK(cudaMemcpyAsync(c->mask, mb->attn_mask, nb, cudaMemcpyHostToDevice, ctx->stream));
    prof_mark(c, PROF_ADAPTER);
    cuda_build_factors(be);
    weight_sequence(c, d.L, backward);
    for (int g = 0; g < GRP_COUNT; g++) c->dbits_of[g] = -1;  // no recomputed layer's masks yet
    // forward
    prof_mark(c, PROF_ELEM);
    embedding_forward_cuda(ctx, c->acts[0].x_in, c->ids, c->model.embed, d.T, d.C);
    for (int l = 0; l < d.L; l++) {
        bf16 *x_out = l + 1 < d.L ? c->acts[l + 1].x_in : c->x_final;
        norm1_forward(be, &d, l, dc);
        attn_block_forward(be, &d, l, dc);
        mlp_block_forward(be, &d, l, x_out, dc);
    }
    prof_mark(c, PROF_ELEM);
    rmsnorm_forward_cuda(ctx, c->xf, d.C, c->rstd_f, c->x_final, c->model.final_norm, d.T, d.C, (float)be->cfg.rms_eps);
    float *gxf = backward ? c->gh : NULL;
    prof_mark(c, PROF_LOSS);
    lmhead_ce_cuda(ctx, c->xf, c->model.lm_head, c->targets, d.T, d.C, d.V, loss_scale, gxf, c->row_loss, logits_host,
                   c->big, c->ce_rows, logits_host ? NULL : c->ce_list, cnt, n_list);
    *n_tokens = cnt;
    if (!backward) {
        *loss_sum = sum_f32_cuda(ctx, c->row_loss, d.T, c->red);
        prof_mark(c, PROF_OTHER);
        prof_collect(c);
        return MOSFT_OK;
    }
    // backward
    prof_mark(c, PROF_ELEM);
    rmsnorm_backward_cuda(ctx, c->gxb, lds_of(c, &d).gxb, c->gx_lo, 0, gxf, 1, c->x_final, c->model.final_norm, c->rstd_f, d.T,
                          d.C);
    for (int l = d.L - 1; l >= 0; l--) {
        if (c->recompute != RECOMPUTE_NONE) side_join(c, GRP_COUNT);  // recomputation overwrites what the side reads
        c->recomputing = 1;  // the recomputed forward keeps this layer's masks for its backward
        if (c->recompute == RECOMPUTE_FULL) {
            norm1_forward(be, &d, l, dc);
            attn_block_forward(be, &d, l, dc);
            mlp_block_forward(be, &d, l, NULL, dc);
        } else if (c->recompute == RECOMPUTE_PARTIAL) {
            norm1_forward(be, &d, l, dc);
            mlp_block_forward(be, &d, l, NULL, dc);
        }
        c->recomputing = 0;
        layer_backward(be, &d, l, dc);
    }
    side_join(c, GRP_COUNT);  // every weight gradient is in grad
    prof_mark(c, PROF_LOSS);
    *loss_sum = sum_f32_cuda(ctx, c->row_loss, d.T, c->red);  // synchronizes: the step is done
    prof_mark(c, PROF_OTHER);
    prof_collect(c);
    if (c->peer) cuda_peer_scatter(be);
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
    static const char *names[PROF_COUNT] = {"NF4 dequant",      "base GEMMs fwd",  "base GEMMs bwd",  "attention fwd",
                                            "attention bwd",    "adapter fwd",     "adapter bwd",     "norms/rope/swiglu",
                                            "lm_head+CE",       "other"};
    double tot = 0;
    for (int i = 0; i < PROF_COUNT; i++) tot += c->prof_ms[i];
    fprintf(stderr, "profile: ms per micro-batch (forward + backward), mean of %d\n", c->prof_steps);
    for (int i = 0; i < PROF_COUNT; i++)
        fprintf(stderr, "  %-20s %8.2f  %5.1f%%\n", names[i], c->prof_ms[i] / c->prof_steps, 100 * c->prof_ms[i] / tot);
    fprintf(stderr, "  %-20s %8.2f\n", "total", tot / c->prof_steps);
}
