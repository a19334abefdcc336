// bench.c: `mosft bench` (see bench.h). The step timed is the training loop's: forward and backward
// of one micro-batch, the global gradient norm, AdamW; the wall time between the starts of
// consecutive steps (each step synchronizes on its loss and norm), median over the timed steps.
// MFU counts the model FLOPs as the training progress line does (core/train.c): 4 x the linear
// parameters + attention scores both ways per token, 4 x the lm_head parameters per supervised token
// (lm_head + CE run on those rows alone), recomputation not counted.
#include "core/bench.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
#include "core/backend.h"
#include "core/common.h"
#include "core/rng.h"

static void base_config(llama_config *c, int hidden, int inter, int layers, int heads, int kv, int vocab) {
    memset(c, 0, sizeof *c);
    snprintf(c->model_type, sizeof c->model_type, "llama");
    c->hidden = hidden;
    c->intermediate = inter;
    c->n_layers = layers;
    c->n_heads = heads;
    c->n_kv_heads = kv;
    c->head_dim = hidden / heads;
    c->vocab = vocab;
    c->max_pos = 4096;
    c->rms_eps = 1e-5;
    c->rope_theta = 10000;
    c->bos_id = 1;
    c->eos_id = 2;
    snprintf(c->torch_dtype, sizeof c->torch_dtype, "bfloat16");
}

int bench_model_config(const char *name, llama_config *c) {
    if (!strcmp(name, "llama2-7b")) {
        base_config(c, 4096, 11008, 32, 32, 32, 32000);
        return MOSFT_OK;
    }
    if (!strcmp(name, "llama2-13b")) {
        base_config(c, 5120, 13824, 40, 40, 40, 32000);
        return MOSFT_OK;
    }
    if (!strcmp(name, "llama3.2-3b")) {
        base_config(c, 3072, 8192, 28, 24, 8, 128256);
        c->max_pos = 131072;
        c->rope_theta = 500000;
        c->tie_embeddings = 1;
        c->rope_llama3 = 1;
        c->rope_factor = 32;
        c->rope_low_freq_factor = 1;
        c->rope_high_freq_factor = 4;
        c->rope_orig_max_pos = 8192;
        c->bos_id = 128000;
        c->eos_id = 128001;
        return MOSFT_OK;
    }
    return llama_config_load(c, name);
}

// sup: the share of tokens with a loss; lm_head + CE runs on those rows alone.
static double flops_per_token(const llama_config *c, double S, double sup) {
    double lin = (double)llama_linear_param_count(c), head = (double)c->vocab * c->hidden;
    double att = 2.0 * 2.0 * (double)c->n_layers * (double)c->n_heads * c->head_dim * S;
    return 4.0 * lin + 4.0 * head * sup + 2.0 * att;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int bench_run(const bench_args *a) {
    llama_config cfg;
    int rc = bench_model_config(a->model, &cfg);
    if (rc)
        return mosft_fail_prefix(rc, "--model: expected llama2-7b, llama3.2-3b, llama2-13b or a config.json (\"%s\")",
                                 a->model);
    if (a->batch < 1 || a->seq < 2 || a->steps < 1 || a->warmup < 0)
        return mosft_fail(MOSFT_ERR_INPUT, "bench: expected --batch >= 1, --seq >= 2, --steps >= 1, --warmup >= 0");
    if (!(a->supervised > 0.0 && a->supervised <= 1.0))
        return mosft_fail(MOSFT_ERR_INPUT, "--supervised: expected a share in (0, 1], got %g", a->supervised);
    if (!(a->dropout >= 0.0 && a->dropout < 1.0))
        return mosft_fail(MOSFT_ERR_INPUT, "--dropout: expected a probability in [0, 1), got %g", a->dropout);
    adapter_spec s;
    memset(&s, 0, sizeof s);
    for (int m = 0; m < MOD_COUNT; m++) s.targets[m] = 1;
    s.seed = a->seed;
    s.dropout = a->dropout;
    s.scale_mean = 1;
    s.pair_dissociation = 1;
    adapter *ad = NULL;
    if (!strcmp(a->adapter, "mos")) {  // the MoS paper's setting: R_v 8, r 32, l 4, R_p 2
        snprintf(s.method, sizeof s.method, "mos");
        s.r = 32;
        s.equiv_rank = 8;
        s.private_rank = 2;
        s.shards = 4;
        s.alpha = 64;
        rc = adapter_create(&ad, &s, &cfg);
    } else if (!strcmp(a->adapter, "lora")) {  // r 64; the values only need to be nonzero
        snprintf(s.method, sizeof s.method, "lora");
        s.r = 64;
        s.alpha = 16;
        rc = adapter_create_layout(&ad, &s, &cfg);
        if (!rc) {
            rng_state r;
            rng_seed(&r, a->seed);
            for (size_t i = 0; i < ad->n_params; i++) ad->params[i] = (float)(rng_next_double(&r) - 0.5) * 0.02f;
        }
    } else {
        return mosft_fail(MOSFT_ERR_INPUT, "--adapter: expected mos or lora, got \"%s\"", a->adapter);
    }
    if (rc) return rc;
    char gpu[128];
    if (!backend_cuda_available(gpu, sizeof gpu)) {
        adapter_free(ad);
        return mosft_fail_hint(MOSFT_ERR_RUNTIME, "run it on a machine with an NVIDIA GPU and a CUDA build of mosft",
                               "bench: measures the CUDA backend, but no usable GPU was found (or this is a CPU-only build)");
    }
    backend_opts opt = {a->recompute, 0.9, 0.999, 1e-8, 0.0, 0, a->keep_dequantized};
    const char *base = a->keep_dequantized && !strcmp(a->quantization, "nf4") ? "nf4-kept-bf16" : a->quantization;
    backend *be = NULL;
    double t_load = mosft_now();
    if ((rc = backend_cuda_create_random(&be, &cfg, a->quantization, 1, a->seed, ad, &opt))) {
        adapter_free(ad);
        return rc;
    }
    t_load = mosft_now() - t_load;
    int B = a->batch, S = a->seq;
    size_t T = (size_t)B * S;
    mem_plan plan;
    be->ops->memory_plan(be, B, S, &plan);
    int32_t *ids = xmalloc(sizeof(int32_t) * T), *labels = xmalloc(sizeof(int32_t) * T), *mask = xmalloc(sizeof(int32_t) * T);
    rng_state r;
    rng_seed(&r, a->seed + 1);
    int prompt = S - (int)lround(a->supervised * S);  // each sequence: a prompt (no loss), then its answer
    for (size_t i = 0; i < T; i++) {
        ids[i] = (int32_t)rng_next_below(&r, (uint64_t)cfg.vocab);
        labels[i] = (int)(i % (size_t)S) < prompt ? -100 : ids[i];
        mask[i] = 1;
    }
    micro_batch mb = {B, S, ids, labels, mask};
    int64_t n_sup = 0;  // rows with a loss (targets are labels shifted by one)
    int n = a->warmup + a->steps;
    double *t = xmalloc(sizeof(double) * (size_t)(n + 1)), loss = 0;
    for (int i = 0; i < n && !rc; i++) {
        t[i] = mosft_now();
        double ls;
        int64_t cnt;
        dropout_ctx dc = {a->seed, i, 0};
        rc = be->ops->forward_backward(be, &mb, 1.0f / (float)(T - B), &dc, &ls, &cnt);
        if (rc) break;
        loss = cnt ? ls / (double)cnt : 0.0;
        n_sup = cnt;
        double norm = be->ops->grad_norm(be);
        be->ops->optimizer_step(be, 1e-5f, norm > 1.0 ? (float)(1.0 / norm) : 1.0f, i + 1);
    }
    if (!rc) {
        be->ops->grad_norm(be);  // a synchronization: the last optimizer step is done
        t[n] = mosft_now();
        double *dt = xmalloc(sizeof(double) * (size_t)a->steps);
        for (int i = 0; i < a->steps; i++) dt[i] = t[a->warmup + i + 1] - t[a->warmup + i];
        qsort(dt, (size_t)a->steps, sizeof(double), cmp_double);
        double med = dt[a->steps / 2], tps = (double)T / med;
        double fpt = flops_per_token(&cfg, S, (double)n_sup / (double)T);
        double mfu = be->flops_peak > 0 ? tps * fpt / be->flops_peak : 0;
        double used = be->ops->memory_used ? be->ops->memory_used(be) : 0;
        char mem[32], pl[32];
        mosft_fmt_bytes(mem, sizeof mem, used);
        mosft_fmt_bytes(pl, sizeof pl, plan.total);
        printf("bench %s %s base=%s recompute=%s dropout=%g supervised=%g %dx%d: %.1f ms/step | %.0f tok/s | MFU %.1f%% | GPU memory %s (plan %s) | "
               "loss %.3f | %s\n",
               a->model, a->adapter, base, a->recompute, a->dropout, a->supervised, B, S, med * 1e3, tps, 100 * mfu, mem, pl, loss,
               be->device_name);
        printf("{\"bench\": \"mosft\", \"model\": \"%s\", \"adapter\": \"%s\", \"quantization\": \"%s\", \"recompute\": \"%s\", "
               "\"dropout\": %g, \"supervised\": %g, \"batch\": %d, \"seq\": %d, \"ms_per_step\": %.2f, \"ms_min\": %.2f, \"tokens_per_s\": %.1f, \"mfu\": %.4f, "
               "\"gpu_memory_bytes\": %.0f, \"plan_bytes\": %.0f, \"adapter_params\": %zu, \"setup_s\": %.1f, "
               "\"device\": \"%s\"}\n",
               a->model, a->adapter, base, a->recompute, a->dropout, a->supervised, B, S, med * 1e3, dt[0] * 1e3, tps, mfu, used,
               plan.total, ad->n_params, t_load, be->device_name);
        fflush(stdout);
        free(dt);
    }
    free(t);
    free(ids);
    free(labels);
    free(mask);
    backend_destroy(be);
    adapter_free(ad);
    return rc;
}
