// backend_cuda.cu: the CUDA backend behind core/backend.h: creation (model onto the device, adapter
// state and its gather maps), the memory plan, the optimizer, state copies for checkpoints, and the
// op table. The step itself is cuda/step_cuda.cu.
//
// Device memory: two arenas, each one cudaMalloc. The persistent one is sized exactly at creation
// (frozen base, the adapter's fp32 params / grads / AdamW moments in one contiguous buffer each, the
// bf16 factors and gather maps); the activation one is sized by the plan of the first (or largest)
// micro-batch shape and the recompute level. Out of memory is MOSFT_ERR_RUNTIME with the plan and a
// hint, never a crash.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/backend_cuda.cuh"

static cuda_impl *impl_of(backend *be) { return (cuda_impl *)be->impl; }

// ---- adapter state on the device ----------------------------------------------------------------

// The modules of a fused weight group, their output rows, the group's input and output widths.
static int group_shape(const llama_config *c, int g, int mods[3], int rows[3], int *d_in, int *d_out) {
    int Q = c->n_heads * c->head_dim, KV = c->n_kv_heads * c->head_dim, C = c->hidden, I = c->intermediate;
    switch (g) {
    case GRP_QKV:
        mods[0] = MOD_Q, mods[1] = MOD_K, mods[2] = MOD_V;
        rows[0] = 0, rows[1] = Q, rows[2] = Q + KV;
        *d_in = C, *d_out = Q + 2 * KV;
        return 3;
    case GRP_O: mods[0] = MOD_O, rows[0] = 0, *d_in = Q, *d_out = C; return 1;
    case GRP_GU:
        mods[0] = MOD_GATE, mods[1] = MOD_UP;
        rows[0] = 0, rows[1] = I;
        *d_in = C, *d_out = 2 * I;
        return 2;
    default: mods[0] = MOD_DOWN, rows[0] = 0, *d_in = I, *d_out = C; return 1;
    }
}

// MoS and LoRA gather their factors on the device; the other low-rank methods go through their host
// build / scatter (cuda_impl.peer); token-routed methods (SiRA) are CPU-only.
static int adapter_is_peer(const adapter *ad) { return strcmp(ad->spec.method, "mos") && strcmp(ad->spec.method, "lora"); }

static size_t adapter_bytes(const adapter *ad) {
    size_t b = 4 * cuda_align(sizeof(float) * ad->n_params) + reduce_scratch_bytes(0);
    int r = ad->rank, l = lowrank_map_shards(ad), L = ad->model.n_layers, jobs = 0;
    for (int g = 0; g < GRP_COUNT; g++) {
        int mods[3], rows[3], di, dout, n = 0;
        int k = group_shape(&ad->model, g, mods, rows, &di, &dout);
        for (int i = 0; i < k; i++) n += adapter_targets(ad, mods[i]) != 0;
        if (!n) continue;
        size_t per = cuda_align((size_t)n * r * di * 2) + cuda_align((size_t)dout * n * r * 2);
        if (!adapter_is_peer(ad))  // the gather maps
            per += (size_t)n * (2 * cuda_align(sizeof(int64_t) * (size_t)r * l) + cuda_align(sizeof(float) * (size_t)r));
        b += per * (size_t)L;
        jobs += n * L;
    }
    if (!adapter_is_peer(ad)) b += cuda_align(sizeof(lowrank_gather_job) * (size_t)jobs);  // the batched gather's table
    return b;
}

static int adapter_supported(const adapter *ad) {
    if (!ad->ops->routed && ad->ops->build && ad->ops->scatter) return MOSFT_OK;
    return mosft_fail_hint(MOSFT_ERR_INPUT, "use device \"cpu\" (--set device=cpu) for this method",
                           "adapter.method: the CUDA backend trains the low-rank methods (mos, lora, prolora, vera, "
                           "tied_lora, sharelora), got the token-routed \"%s\"", ad->spec.method);
}

// The model's shapes the kernels take.
static int check_dims(const llama_config *c) {
    if (c->hidden % 8 || c->head_dim % 8 || c->n_kv_heads <= 0 || c->n_heads % c->n_kv_heads)
        return mosft_fail_hint(MOSFT_ERR_INPUT, "use device \"cpu\" for this model",
                               "model: the CUDA backend needs hidden_size and head_dim multiples of 8 and heads a "
                               "multiple of kv heads, got %d, %d, %d/%d",
                               c->hidden, c->head_dim, c->n_heads, c->n_kv_heads);
    return MOSFT_OK;
}

extern "C" int backend_cuda_supports(const adapter *ad, const llama_config *cfg) {
    int rc = check_dims(cfg);
    return rc ? rc : adapter_supported(ad);
}

// The groups' factor buffers and the gather maps of every (layer, module).
static int adapter_setup(backend *be) {
    cuda_impl *c = impl_of(be);
    adapter *ad = be->ad;
    int L = be->cfg.n_layers, r = ad->rank, l = lowrank_map_shards(ad);
    int64_t *offA = (int64_t *)xmalloc(sizeof(int64_t) * (size_t)r * l), *offB = (int64_t *)xmalloc(sizeof(int64_t) * (size_t)r * l);
    float *scale = (float *)xmalloc(sizeof(float) * (size_t)r);
    int rc = MOSFT_OK;
    c->R_tot = c->R_max = c->dout_max = 0;
    for (int g = 0; g < GRP_COUNT && !rc; g++) {
        cuda_adapter_group *ag = &c->grp[g];
        int mods[3], rows[3], di, dout;
        int k = group_shape(&be->cfg, g, mods, rows, &di, &dout);
        ag->n = 0;
        for (int i = 0; i < k; i++) {
            if (!adapter_targets(ad, mods[i])) continue;
            int mdi, mdo;
            llama_module_dims(&be->cfg, mods[i], &mdi, &mdo);
            ag->mod[ag->n] = mods[i];
            ag->row_off[ag->n] = rows[i];
            ag->d_out_m[ag->n] = mdo;
            ag->n++;
        }
        if (!ag->n) continue;
        ag->R = ag->n * r;
        ag->d_in = di;
        ag->d_out = dout;
        ag->h_off = c->R_tot;
        c->R_tot += ag->R;
        if (ag->R > c->R_max) c->R_max = ag->R;
        if (dout > c->dout_max) c->dout_max = dout;
        ag->A = (bf16 **)xcalloc((size_t)L, sizeof(bf16 *));
        ag->B = (bf16 **)xcalloc((size_t)L, sizeof(bf16 *));
        ag->map = (lowrank_map *)xcalloc((size_t)L * 3, sizeof(lowrank_map));
        for (int li = 0; li < L && !rc; li++) {
            ag->A[li] = (bf16 *)cuda_arena_alloc(&c->persist, (size_t)ag->R * di * 2);
            ag->B[li] = (bf16 *)cuda_arena_alloc(&c->persist, (size_t)dout * ag->R * 2);
            CUDA_CHECK(cudaMemset(ag->B[li], 0, (size_t)dout * ag->R * 2));  // off-diagonal blocks stay 0
            for (int i = 0; i < ag->n && !rc && !c->peer; i++) {
                lowrank_map *mp = &ag->map[li * 3 + i];
                int has_scale = 0, lo = 1, sB = 1;
                if ((rc = lowrank_map_host(ad, li, ag->mod[i], offA, offB, scale, &has_scale, &lo, &sB))) break;
                MOSFT_ASSERT(lo == l);
                mp->r = r;
                mp->l = l;
                llama_module_dims(&be->cfg, ag->mod[i], &mp->d_in, &mp->d_out);
                mp->strideB = sB;
                mp->scaleB = ad->scaling;  // B is kept as s * B: the fused GEMM multiplies [x | h] by [W | sB]
                mp->ldB = ag->R;
                int64_t *dA = (int64_t *)cuda_arena_alloc(&c->persist, sizeof(int64_t) * (size_t)r * l);
                int64_t *dB = (int64_t *)cuda_arena_alloc(&c->persist, sizeof(int64_t) * (size_t)r * l);
                float *dS = (float *)cuda_arena_alloc(&c->persist, sizeof(float) * (size_t)r);
                CUDA_CHECK(cudaMemcpy(dA, offA, sizeof(int64_t) * (size_t)r * l, cudaMemcpyHostToDevice));
                CUDA_CHECK(cudaMemcpy(dB, offB, sizeof(int64_t) * (size_t)r * l, cudaMemcpyHostToDevice));
                if (has_scale) CUDA_CHECK(cudaMemcpy(dS, scale, sizeof(float) * (size_t)r, cudaMemcpyHostToDevice));
                mp->offA = dA;
                mp->offB = dB;
                mp->scaleA = has_scale ? dS : NULL;
            }
        }
    }
    free(offA);
    free(offB);
    free(scale);
    if (!rc && !c->peer) {  // one launch gathers every (layer, module)'s factors (cuda_build_factors)
        lowrank_gather_job *jobs = (lowrank_gather_job *)xcalloc((size_t)L * 3 * GRP_COUNT, sizeof(lowrank_gather_job));
        int n = 0;
        c->gjob_max = 0;
        for (int g = 0; g < GRP_COUNT; g++) {
            cuda_adapter_group *ag = &c->grp[g];
            for (int li = 0; li < L && ag->n; li++)
                for (int i = 0; i < ag->n; i++) {
                    lowrank_gather_job *jb = &jobs[n++];
                    jb->mp = ag->map[li * 3 + i];
                    jb->A = ag->A[li] + (int64_t)i * r * ag->d_in;
                    jb->B = ag->B[li] + (int64_t)ag->row_off[i] * ag->R + i * r;
                    int64_t na = (int64_t)jb->mp.r * jb->mp.d_in, nb = (int64_t)jb->mp.d_out * jb->mp.r;
                    if (na > c->gjob_max) c->gjob_max = na;
                    if (nb > c->gjob_max) c->gjob_max = nb;
                }
        }
        c->n_gjobs = n;
        if (n) {
            c->gjobs = (lowrank_gather_job *)cuda_arena_alloc(&c->persist, sizeof(lowrank_gather_job) * (size_t)n);
            CUDA_CHECK(cudaMemcpy(c->gjobs, jobs, sizeof(lowrank_gather_job) * (size_t)n, cudaMemcpyHostToDevice));
        }
        free(jobs);
    }
    if (rc || !c->peer) return rc;
    // peer methods: host buffers for the factors' gradients (layer-major, modules in order)
    c->dense_off = (size_t *)xcalloc((size_t)L * MOD_COUNT, sizeof(size_t));
    size_t n_dense = 0;
    for (int li = 0; li < L; li++)
        for (int m = 0; m < MOD_COUNT; m++) {
            if (!adapter_targets(ad, m)) continue;
            int di, dout;
            llama_module_dims(&be->cfg, m, &di, &dout);
            c->dense_off[li * MOD_COUNT + m] = n_dense;
            n_dense += (size_t)r * (size_t)(di + dout);
        }
    if (cudaMallocHost((void **)&c->h_dfac, sizeof(float) * (n_dense ? n_dense : 1)) == cudaSuccess) {
        c->h_dfac_pinned = 1;
    } else {  // pageable memory works too (the copies then wait for the GPU)
        cudaGetLastError();
        c->h_dfac = (float *)xmalloc(sizeof(float) * (n_dense ? n_dense : 1));
    }
    c->h_params = (float *)xmalloc(sizeof(float) * (ad->n_params ? ad->n_params : 1));
    c->h_grad = (float *)xcalloc(ad->n_params ? ad->n_params : 1, sizeof(float));
    return MOSFT_OK;
}

// ---- ops --------------------------------------------------------------------------------------------

static void cuda_memory_plan(backend *be, int B, int S, mem_plan *p) {
    cuda_impl *c = impl_of(be);
    memset(p, 0, sizeof *p);
    p->weights = c->bytes_weights;
    p->adapter = c->bytes_adapter;
    cuda_impl tmp = *c;  // measure with a counting arena, leaving the live layout alone
    tmp.acts = (cuda_acts *)xcalloc((size_t)be->cfg.n_layers, sizeof(cuda_acts));
    backend b2 = *be;
    b2.impl = &tmp;
    cuda_arena count = {NULL, (size_t)-1, 0, 0};
    cuda_acts_layout(&b2, &count, B, S, p);
    free(tmp.acts);
    p->workspace += (double)cuda_ctx_workspace_bytes() * (c->side ? 2 : 1);
    p->total = p->weights + p->adapter + p->activations + p->workspace;
    size_t fr = 0, tot = 0;
    cudaMemGetInfo(&fr, &tot);
    snprintf(p->device, sizeof p->device, "%.63s", be->device_name);
    snprintf(p->weights_note, sizeof p->weights_note, "%s",
             c->model.nf4 ? "NF4, dequantized where used" : c->kept ? "NF4, kept dequantized as bf16" : "bf16");
    p->capacity = (double)tot;
    // An NF4 base dequantized where used, on a device with room for it kept as bf16 (within 85 % of the
    // device, the rest for the CUDA context and the allocator): say what that buys.
    double kept_total = p->total - c->bytes_weights + c->bytes_kept;
    if (c->bytes_kept > 0 && p->capacity > 0 && kept_total <= 0.85 * p->capacity) {
        char extra[32], all[32];
        mosft_fmt_bytes(extra, sizeof extra, c->bytes_kept - c->bytes_weights);
        mosft_fmt_bytes(all, sizeof all, kept_total);
        snprintf(p->hint, sizeof p->hint,
                 "model.keep_dequantized=true fits here (+%s, %s in all): the base dequantized once at load instead "
                 "of where each weight is used, the same results, 2-5 %% shorter steps at 3B-7B (docs/BENCHMARKS.md)",
                 extra, all);
    }
}

static int cuda_forward_backward(backend *be, const micro_batch *mb, float loss_scale, const dropout_ctx *dc,
                                 double *loss_sum, int64_t *n_tokens) {
    return cuda_step_run(be, mb, loss_scale, dc, 1, loss_sum, n_tokens, NULL);
}

static int cuda_forward_loss(backend *be, const micro_batch *mb, double *loss_sum, int64_t *n_tokens) {
    return cuda_step_run(be, mb, 0.0f, NULL, 0, loss_sum, n_tokens, NULL);
}

static int cuda_forward_logits(backend *be, const micro_batch *mb, float *logits) {
    double s;
    int64_t n;
    // Every row's logits, ignored rows included: run the loss on all-supervised targets' rows.
    return cuda_step_run(be, mb, 0.0f, NULL, 0, &s, &n, logits);
}

static double cuda_grad_norm(backend *be) {
    cuda_impl *c = impl_of(be);
    cuda_peer_flush(be);
    return sqrt(sum_squares_cuda(c->ctx, c->grad, (int64_t)be->ad->n_params, c->red));
}

static void cuda_zero_grad(backend *be) {
    cuda_impl *c = impl_of(be);
    CUDA_CHECK(cudaMemsetAsync(c->grad, 0, sizeof(float) * be->ad->n_params, c->ctx->stream));
    if (c->peer) {
        memset(c->h_grad, 0, sizeof(float) * be->ad->n_params);
        c->grad_dirty = 0;
    }
}

static void cuda_optimizer_step(backend *be, float lr, float grad_scale, int64_t t) {
    cuda_impl *c = impl_of(be);
    cuda_peer_flush(be);
    adamw_cuda(c->ctx, c->params, c->grad, c->m, c->v, (int64_t)be->ad->n_params, grad_scale, lr, be->beta1, be->beta2,
               be->eps, be->weight_decay, t);
    c->built = 0;
    cuda_zero_grad(be);
}

static void download(cuda_impl *c, float *dst, const float *src, size_t n) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(float) * n, cudaMemcpyDeviceToHost, c->ctx->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->ctx->stream));
}

static void cuda_sync_to_adapter(backend *be) { download(impl_of(be), be->ad->params, impl_of(be)->params, be->ad->n_params); }

static void cuda_get_moments(backend *be, float *m, float *v) {
    cuda_impl *c = impl_of(be);
    download(c, m, c->m, be->ad->n_params);
    download(c, v, c->v, be->ad->n_params);
}

static void cuda_get_grads(backend *be, float *g) {
    cuda_peer_flush(be);
    download(impl_of(be), g, impl_of(be)->grad, be->ad->n_params);
}

static void cuda_set_state(backend *be, const float *params, const float *m, const float *v) {
    cuda_impl *c = impl_of(be);
    size_t n = sizeof(float) * be->ad->n_params;
    if (params) CUDA_CHECK(cudaMemcpyAsync(c->params, params, n, cudaMemcpyHostToDevice, c->ctx->stream));
    if (m) CUDA_CHECK(cudaMemcpyAsync(c->m, m, n, cudaMemcpyHostToDevice, c->ctx->stream));
    if (v) CUDA_CHECK(cudaMemcpyAsync(c->v, v, n, cudaMemcpyHostToDevice, c->ctx->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->ctx->stream));
    c->built = 0;
}

static double cuda_memory_used(backend *be) {
    (void)be;
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) != cudaSuccess) return 0;
    return (double)(tot - fr);
}

static void cuda_destroy(backend *be) {
    cuda_impl *c = impl_of(be);
    if (c) {
        if (c->ctx) cudaStreamSynchronize(c->ctx->stream);
        prof_print(c);
        if (c->ev) {
            for (int i = 0; i < PROF_MAX; i++) cudaEventDestroy(c->ev[i]);
            free(c->ev);
            free(c->ev_cat);
        }
        if (c->side) {
            cuda_ctx_free(c->side);
            cudaEventDestroy(c->side_go);
            for (int g = 0; g < GRP_COUNT; g++) cudaEventDestroy(c->side_done[g]);
        }
        if (c->wstream) {
            cudaStreamSynchronize(c->wstream);
            for (int i = 0; i < GRP_COUNT; i++) {
                cudaEventDestroy(c->w_ready[i]);
                cudaEventDestroy(c->w_free[i]);
            }
            cudaEventDestroy(c->w_go);
            cudaStreamDestroy(c->wstream);
        }
        free(c->wseq);
        cuda_arena_free(&c->acts_ar);
        cuda_arena_free(&c->persist);
        for (int g = 0; g < GRP_COUNT; g++) {
            free(c->grp[g].map);
            free(c->grp[g].A);
            free(c->grp[g].B);
        }
        free(c->model.layers);
        free(c->acts);
        if (c->h_dfac_pinned)
            cudaFreeHost(c->h_dfac);
        else
            free(c->h_dfac);
        free(c->h_params);
        free(c->h_grad);
        free(c->dense_off);
        free(c->h_targets);
        free(c->h_ce_list);
        cuda_ctx_free(c->ctx);
        free(c);
    }
    free(be);
}

static const backend_ops k_cuda_ops = {
    "cuda",
    cuda_memory_plan,
    cuda_forward_backward,
    cuda_forward_loss,
    cuda_forward_logits,
    cuda_grad_norm,
    cuda_optimizer_step,
    cuda_zero_grad,
    cuda_sync_to_adapter,
    cuda_get_moments,
    cuda_set_state,
    cuda_get_grads,
    cuda_memory_used,
    cuda_destroy,
};

// bf16 dense peak of known devices (for MFU); 0 = unknown.
static double device_peak(const char *name) {
    if (strstr(name, "H100") || strstr(name, "H200") || strstr(name, "H800") || strstr(name, "GH200"))
        return strstr(name, "PCIe") ? 756e12 : 989e12;
    if (strstr(name, "A100") || strstr(name, "A800")) return 312e12;
    if (strstr(name, "L40S")) return 362e12;
    if (strstr(name, "B200")) return 2250e12;
    return 0;
}

// ---- creation -----------------------------------------------------------------------------------

// The base did not fit with model.keep_dequantized on: the same message, the hint that matters.
static int keep_hint(int rc) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s", mosft_error());
    return mosft_fail_hint(rc, "model.keep_dequantized=false (the base stays NF4 on the GPU: 2 bytes a weight less)", "%s", msg);
}

static int create_common(backend **out, const llama_config *cfg, const char *model_dir, const char *quantization,
                         int double_quant, uint64_t seed, adapter *ad, const backend_opts *opt) {
    *out = NULL;
    int nf4, rc;
    if ((rc = llama_quantization_parse(quantization, &nf4))) return rc;
    if ((rc = check_dims(cfg))) return rc;
    if ((rc = adapter_supported(ad))) return rc;
    const char *rec = opt->recompute ? opt->recompute : "none";
    int level;
    if (!strcmp(rec, "none"))
        level = RECOMPUTE_NONE;
    else if (!strcmp(rec, "partial"))
        level = RECOMPUTE_PARTIAL;
    else if (!strcmp(rec, "full"))
        level = RECOMPUTE_FULL;
    else
        return mosft_fail(MOSFT_ERR_INPUT, "train.recompute: expected \"none\", \"partial\" or \"full\", got \"%s\"", rec);
    cuda_ctx *ctx = cuda_ctx_create();
    if (!ctx) return MOSFT_ERR_RUNTIME;
    backend *be = (backend *)xcalloc(1, sizeof(backend));
    cuda_impl *c = (cuda_impl *)xcalloc(1, sizeof(cuda_impl));
    be->ops = &k_cuda_ops;
    be->impl = c;
    be->ad = ad;
    be->cfg = *cfg;
    snprintf(be->recompute, sizeof be->recompute, "%s", rec);
    be->dropout = (float)ad->spec.dropout;
    be->beta1 = opt->beta1;
    be->beta2 = opt->beta2;
    be->eps = opt->eps;
    be->weight_decay = opt->weight_decay;
    cudaDeviceProp prop;
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    char cap[32];
    mosft_fmt_bytes(cap, sizeof cap, (double)prop.totalGlobalMem);
    snprintf(be->device_name, sizeof be->device_name, "%.90s (%s)", prop.name, cap);
    be->flops_peak = device_peak(prop.name);
    c->ctx = ctx;
    c->recompute = level;
    const char *pe = getenv("MOSFT_PROFILE");
    if (pe && *pe && strcmp(pe, "0")) {
        c->prof = 1;
        c->ev = (cudaEvent_t *)xmalloc(sizeof(cudaEvent_t) * PROF_MAX);
        c->ev_cat = (int *)xmalloc(sizeof(int) * PROF_MAX);
        for (int i = 0; i < PROF_MAX; i++) CUDA_CHECK(cudaEventCreate(&c->ev[i]));
    }
    c->rank = ad->rank;
    c->scaling = ad->scaling;
    c->peer = adapter_is_peer(ad);
    // model.keep_dequantized: the NF4 base is loaded (or generated) as NF4, dequantized once into a bf16
    // base, and the step then runs the bf16 path (no weight stream): the same values, no per-use work
    int keep = nf4 && opt->keep_dequantized;
    const char *wp = getenv("MOSFT_WEIGHT_PREFETCH");
    c->wpipe = nf4 && !keep && !(wp && !strcmp(wp, "0"));
    c->wseq = (int *)xmalloc(sizeof(int) * (size_t)cfg->n_layers * 11);
    if (c->wpipe) {
        CUDA_CHECK(cudaStreamCreateWithFlags(&c->wstream, cudaStreamNonBlocking));
        for (int i = 0; i < GRP_COUNT; i++) {
            CUDA_CHECK(cudaEventCreateWithFlags(&c->w_ready[i], cudaEventDisableTiming));
            CUDA_CHECK(cudaEventCreateWithFlags(&c->w_free[i], cudaEventDisableTiming));
        }
        CUDA_CHECK(cudaEventCreateWithFlags(&c->w_go, cudaEventDisableTiming));
        const char *wa = getenv("MOSFT_WEIGHT_AHEAD");
        c->wahead = !(wa && !strcmp(wa, "0"));
    }
    const char *sf = getenv("MOSFT_SWIGLU_FUSED");
    c->swiglu_fused = !(sf && !strcmp(sf, "0"));
    const char *ov = getenv("MOSFT_ADAPTER_OVERLAP");
    if (!c->peer && !(ov && !strcmp(ov, "0"))) {
        if (!(c->side = cuda_ctx_create_side())) {
            cuda_destroy(be);
            return MOSFT_ERR_RUNTIME;
        }
        CUDA_CHECK(cudaEventCreateWithFlags(&c->side_go, cudaEventDisableTiming));
        for (int g = 0; g < GRP_COUNT; g++) CUDA_CHECK(cudaEventCreateWithFlags(&c->side_done[g], cudaEventDisableTiming));
    }
    c->model.cfg = *cfg;
    int *dq_of = NULL;
    if (model_dir) {
        dq_of = (int *)xmalloc(sizeof(int) * (size_t)cfg->n_layers * MOD_COUNT);
        if ((rc = cuda_model_scan(model_dir, cfg, double_quant, dq_of))) {
            free(dq_of);
            cuda_destroy(be);
            return rc;
        }
    }
    for (int g = 0; g < GRP_COUNT; g++) {  // adapter columns per group, padded to 8 (16-byte rows)
        int mods[3], rows[3], di, dout, n = 0;
        int k = group_shape(cfg, g, mods, rows, &di, &dout);
        for (int i = 0; i < k; i++) n += adapter_targets(ad, mods[i]) != 0;
        c->model.Rp[g] = (n * ad->rank + 7) / 8 * 8;
    }
    c->bytes_weights = (double)cuda_model_bytes(&c->model, nf4 && !keep, double_quant, dq_of);
    size_t nf4_bytes = keep ? cuda_model_bytes(&c->model, 1, double_quant, dq_of) : 0;
    c->bytes_kept = nf4 && !keep ? (double)cuda_model_bytes(&c->model, 0, double_quant, dq_of) : 0;
    free(dq_of);
    c->bytes_adapter = (double)adapter_bytes(ad);
    if ((rc = cuda_arena_init(&c->persist, (size_t)(c->bytes_weights + c->bytes_adapter)))) {
        char w[32], a[32];
        mosft_fmt_bytes(w, sizeof w, c->bytes_weights);
        mosft_fmt_bytes(a, sizeof a, c->bytes_adapter);
        mosft_fail_prefix(rc, "frozen base %s%s + adapter state %s on %s", w, keep ? " (kept dequantized)" : "", a,
                          be->device_name);
        if (keep) keep_hint(rc);
        cuda_destroy(be);
        return rc;
    }
    if (keep) {  // NF4 in a temporary arena first: the peak at load is both bases
        cuda_arena tmp;
        memset(&tmp, 0, sizeof tmp);
        if ((rc = cuda_arena_init(&tmp, nf4_bytes))) {
            char w[32];
            mosft_fmt_bytes(w, sizeof w, (double)nf4_bytes);
            mosft_fail_prefix(rc, "model.keep_dequantized: the NF4 base (%s) beside its bf16 copy on %s", w, be->device_name);
            keep_hint(rc);
            cuda_destroy(be);
            return rc;
        }
        cuda_model q = c->model;
        rc = model_dir ? cuda_model_load(ctx, &q, model_dir, 1, double_quant, &tmp)
                       : cuda_model_random(ctx, &q, cfg, 1, double_quant, seed, &tmp);
        if (!rc) {
            cuda_model_dequantize(ctx, &c->model, &q, &c->persist);
            c->kept = 1;
        }
        free(q.layers);
        cuda_arena_free(&tmp);
    } else {
        rc = model_dir ? cuda_model_load(ctx, &c->model, model_dir, nf4, double_quant, &c->persist)
                       : cuda_model_random(ctx, &c->model, cfg, nf4, double_quant, seed, &c->persist);
    }
    if (rc) {
        cuda_destroy(be);
        return rc;
    }
    size_t n = ad->n_params;
    c->params = (float *)cuda_arena_alloc(&c->persist, sizeof(float) * n);
    c->grad = (float *)cuda_arena_alloc(&c->persist, sizeof(float) * n);
    c->m = (float *)cuda_arena_alloc(&c->persist, sizeof(float) * n);
    c->v = (float *)cuda_arena_alloc(&c->persist, sizeof(float) * n);
    c->red = cuda_arena_alloc(&c->persist, reduce_scratch_bytes(0));
    CUDA_CHECK(cudaMemcpy(c->params, ad->params, sizeof(float) * n, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(c->grad, 0, sizeof(float) * n));
    CUDA_CHECK(cudaMemset(c->m, 0, sizeof(float) * n));
    CUDA_CHECK(cudaMemset(c->v, 0, sizeof(float) * n));
    if ((rc = adapter_setup(be))) {
        cuda_destroy(be);
        return rc;
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    *out = be;
    return MOSFT_OK;
}

extern "C" int backend_cuda_create(backend **out, const char *model_dir, const char *quantization, int double_quant,
                                   adapter *ad, const backend_opts *opt) {
    llama_config cfg;
    int rc = llama_config_load(&cfg, model_dir);
    if (rc) return rc;
    return create_common(out, &cfg, model_dir, quantization, double_quant, 0, ad, opt);
}

extern "C" int backend_cuda_create_random(backend **out, const llama_config *cfg, const char *quantization,
                                          int double_quant, uint64_t seed, adapter *ad, const backend_opts *opt) {
    return create_common(out, cfg, NULL, quantization, double_quant, seed, ad, opt);
}

extern "C" int backend_cuda_available(char *name, size_t n) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        cudaGetLastError();
        if (name && n) snprintf(name, n, "none");
        return 0;
    }
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    if (name && n) snprintf(name, n, "%.127s", prop.name);
    return 1;
}
