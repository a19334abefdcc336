// train.c: the training loop (see train.h). It reads the same for every backend: collect the
// micro-batches of a step, forward/backward each with the loss scaled by 1/(supervised tokens of the
// step), clip by the global norm, AdamW with the scheduled learning rate, log, evaluate, checkpoint.
#include "core/train.h"

#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/adapter.h"
#include "core/checkpoint.h"
#include "core/fileio.h"
#include "core/info.h"
#include "core/model.h"
#include "core/rng.h"
#include "core/version.h"

// ---- signals: finish the step, save, exit -------------------------------------------------------

static volatile sig_atomic_t g_stop_signal = 0;

static void on_signal(int sig) {
    if (g_stop_signal) _exit(128 + sig);  // a second signal: stop now (checkpoints are atomic)
    g_stop_signal = sig;
}

static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

// ---- schedule --------------------------------------------------------------------------------------

int64_t train_warmup_steps(const mosft_config *cfg) {
    return (int64_t)ceil(cfg->train.warmup_ratio * (double)cfg->train.steps - 1e-9);
}

double train_lr_at(const mosft_config *cfg, int64_t step) {
    double lr = cfg->train.lr;
    int64_t total = cfg->train.steps, w = train_warmup_steps(cfg);
    if (!strcmp(cfg->train.schedule, "constant") && w == 0) return lr;
    if (step < w) return lr * (double)step / (double)(w > 1 ? w : 1);
    if (!strcmp(cfg->train.schedule, "constant")) return lr;
    double progress = (double)(step - w) / (double)(total - w > 1 ? total - w : 1);
    if (!strcmp(cfg->train.schedule, "cosine")) return lr * fmax(0.0, 0.5 * (1.0 + cos(M_PI * progress)));
    return lr * fmax(0.0, (double)(total - step) / (double)(total - w > 1 ? total - w : 1));  // linear
}

// ---- helpers --------------------------------------------------------------------------------------

static double host_rss_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, rss = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = 0;
        fclose(f);
    }
    return (double)rss * (double)sysconf(_SC_PAGESIZE);
}

// A deep copy of a micro-batch (the data stream reuses its buffers).
typedef struct {
    micro_batch mb;
    int32_t *buf;
    size_t cap;
} mb_copy;

static void mb_copy_set(mb_copy *c, const micro_batch *src) {
    size_t n = (size_t)src->B * (size_t)src->S;
    if (3 * n > c->cap) {
        c->cap = 3 * n;
        c->buf = xrealloc(c->buf, sizeof(int32_t) * c->cap);
    }
    memcpy(c->buf, src->input_ids, sizeof(int32_t) * n);
    memcpy(c->buf + n, src->labels, sizeof(int32_t) * n);
    memcpy(c->buf + 2 * n, src->attn_mask, sizeof(int32_t) * n);
    c->mb.B = src->B;
    c->mb.S = src->S;
    c->mb.input_ids = c->buf;
    c->mb.labels = c->buf + n;
    c->mb.attn_mask = c->buf + 2 * n;
}

// Supervised tokens after the shift (label t counts when t >= 1 within its row).
static int64_t count_supervised(const micro_batch *mb) {
    int64_t n = 0;
    for (int b = 0; b < mb->B; b++)
        for (int t = 1; t < mb->S; t++) n += mb->labels[(int64_t)b * mb->S + t] != -100;
    return n;
}

static int64_t count_tokens(const micro_batch *mb) {
    int64_t n = 0;
    for (int64_t i = 0; i < (int64_t)mb->B * mb->S; i++) n += mb->attn_mask[i] != 0;
    return n;
}

int train_backend_open(const mosft_config *cfg, adapter *ad, backend **be, llama_model **model) {
    *be = NULL;
    *model = NULL;
    backend_opts opt = {cfg->train.recompute, cfg->train.beta1, cfg->train.beta2, cfg->train.eps,
                        cfg->train.weight_decay, cfg->train.threads, cfg->model.keep_dequantized};
    char gpu[128];
    int use_cuda = !strcmp(cfg->device, "cuda");
    if (!use_cuda && !strcmp(cfg->device, "auto") && backend_cuda_available(gpu, sizeof gpu)) {
        // "auto" takes the GPU when it can run this adapter and model, else the CPU with a note
        use_cuda = backend_cuda_supports(ad, &ad->model) == MOSFT_OK;
        if (!use_cuda) {
            mosft_log("note: device \"auto\": training on the CPU (%s)\n", mosft_error());
            mosft_error_clear();
        }
    }
    if (use_cuda)
        return backend_cuda_create(be, cfg->model.path, cfg->model.quantization, cfg->model.double_quant, ad, &opt);
    llama_model *m = xcalloc(1, sizeof(llama_model));
    int rc = llama_model_load(m, cfg->model.path, cfg->model.quantization, cfg->model.double_quant);
    if (rc) {
        free(m);
        return rc;
    }
    rc = backend_cpu_create(be, m, ad, &opt);
    if (rc) {
        llama_model_free(m);
        free(m);
        return rc;
    }
    *model = m;
    return MOSFT_OK;
}

static void print_plan(FILE *f, const mem_plan *p) {
    char a[32], b[32], c[32], d[32], t[32], cap[32];
    mosft_fmt_bytes(a, sizeof a, p->weights);
    mosft_fmt_bytes(b, sizeof b, p->adapter);
    mosft_fmt_bytes(c, sizeof c, p->activations);
    mosft_fmt_bytes(d, sizeof d, p->workspace);
    mosft_fmt_bytes(t, sizeof t, p->total);
    fprintf(f, "memory plan on %s\n", p->device);
    if (p->weights_note[0])
        fprintf(f, "  frozen base weights          %10s  (%s)\n", a, p->weights_note);
    else
        fprintf(f, "  frozen base weights          %10s\n", a);
    fprintf(f, "  adapter + grads + AdamW      %10s\n", b);
    fprintf(f, "  activations (micro-batch)    %10s\n", c);
    fprintf(f, "  workspace                    %10s\n", d);
    if (p->capacity > 0) {
        mosft_fmt_bytes(cap, sizeof cap, p->capacity);
        fprintf(f, "  total                        %10s of %s\n", t, cap);
    } else {
        fprintf(f, "  total                        %10s\n", t);
    }
    if (p->hint[0]) fprintf(f, "  hint: %s\n", p->hint);
}

static int write_text(const char *dir, const char *name, const char *text) {
    char *p = path_join(dir, name);
    int rc = atomic_write_file(p, text, strlen(text));
    free(p);
    return rc;
}

// Keep only the metrics lines of steps <= `step` (after a resume, later lines belong to lost work).
static void metrics_truncate(const char *path, int64_t step) {
    char *text = NULL;
    size_t len = 0;
    if (file_read_all(path, &text, &len) != MOSFT_OK) {
        mosft_error_clear();
        return;
    }
    mosft_buf out = {0};
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        const char *s = strstr(line, "\"step\":");
        long long st = s ? atoll(s + 7) : 0;
        if (st <= step) {
            buf_append_str(&out, line);
            buf_append_str(&out, "\n");
        }
    }
    atomic_write_file(path, out.data ? out.data : "", out.len);
    buf_free(&out);
    free(text);
}

static int run_eval(backend *be, train_data *data, int max_batches, double *loss, int64_t *ntok) {
    int n = data->n_eval(data);
    if (max_batches > 0 && n > max_batches) n = max_batches;
    double sum = 0;
    int64_t cnt = 0;
    for (int i = 0; i < n; i++) {
        micro_batch mb;
        data->eval_batch(data, i, &mb);
        double s = 0;
        int64_t c = 0;
        int rc = be->ops->forward_loss(be, &mb, &s, &c);
        if (rc) return rc;
        sum += s;
        cnt += c;
    }
    *loss = cnt ? sum / (double)cnt : NAN;
    *ntok = cnt;
    return MOSFT_OK;
}

// Model FLOPs per token of one training step (frozen base: forward + input-gradient backward = 4N,
// attention scores both ways), for MFU, without lm_head: lm_head + CE runs on the supervised tokens
// alone (head_flops_per_supervised). Recomputation is not counted (it is overhead).
static double flops_per_token(const llama_config *c, double S) {
    double n = (double)llama_linear_param_count(c);
    double att = 2.0 * 2.0 * (double)c->n_layers * (double)c->n_heads * c->head_dim * S;  // QK^T and PV, causal ~ /2 *2
    return 4.0 * n + 2.0 * att;
}
static double head_flops_per_supervised(const llama_config *c) { return 4.0 * (double)c->vocab * c->hidden; }

// ---- the loop ------------------------------------------------------------------------------------------

int train_run(mosft_config *cfg, const train_args *args) {
    int rc = MOSFT_OK;
    const char *run_dir = args->resume_dir ? args->resume_dir : cfg->output.dir;
    if (!cfg->model.path[0])
        return mosft_fail_hint(MOSFT_ERR_INPUT, "--set model.path=/path/to/hf-model", "%s: model.path: expected the HF model folder, got nothing",
                               cfg->source_path[0] ? cfg->source_path : "config");
    if (cfg->data.n_sources == 0)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: data.sources: expected at least one source, got none",
                          cfg->source_path[0] ? cfg->source_path : "config");
    llama_config mc;
    if ((rc = llama_config_load(&mc, cfg->model.path))) return rc;
    if ((rc = llama_check_seq_len(&mc, cfg->data.max_seq_len, cfg->source_path[0] ? cfg->source_path : "config"))) return rc;
    adapter_spec spec;
    adapter_spec_from_config(&spec, cfg);
    if ((rc = adapter_spec_check(&spec, &mc))) return rc;

    // A new run must not overwrite an old one.
    char *resume_ckpt = NULL;
    int64_t resume_step = 0;
    if (args->resume_dir) {
        if ((rc = checkpoint_find_latest(run_dir, &resume_ckpt, &resume_step))) return rc;
    } else if (!args->dry_run) {
        int64_t s;
        char *d = NULL;
        if (dir_exists(run_dir) && checkpoint_find_latest(run_dir, &d, &s) == MOSFT_OK) {
            free(d);
            return mosft_fail_hint(MOSFT_ERR_INPUT, "resume it with `mosft train --resume DIR`, or choose another output.dir",
                                   "%s: output.dir already holds a run (checkpoint at step %lld)", run_dir, (long long)s);
        }
        mosft_error_clear();
    }

    // Data first: a bad file or URL fails before anything heavy is loaded.
    train_data *data = NULL;
    int pad_id = 0;
    if ((rc = train_data_open(&data, cfg, &pad_id))) {
        free(resume_ckpt);
        return rc;
    }

    adapter *ad = NULL;
    if (resume_ckpt) {
        char *ap = path_join(resume_ckpt, "adapter.mos");
        rc = adapter_load(&ad, ap, &mc);
        free(ap);
    } else {
        rc = adapter_create(&ad, &spec, &mc);
    }
    if (rc) goto out_data;
    adapter_set_base_model_name(ad, cfg->model.name[0] ? cfg->model.name : cfg->model.path);

    backend *be = NULL;
    llama_model *model = NULL;
    if ((rc = train_backend_open(cfg, ad, &be, &model))) goto out_adapter;

    // The plan: configuration, parameters, memory.
    FILE *info = mosft_verbosity >= 1 ? stderr : fopen("/dev/null", "w");
    char *table = config_table(cfg);
    fputs(table, info);
    free(table);
    char pc[32];
    mosft_fmt_count(pc, sizeof pc, (double)ad->n_params);
    fprintf(info, "adapter %s: %s trainable parameters (rank %d, scaling %g), backend %s (%s)\n", ad->spec.method, pc,
            ad->rank, ad->scaling, be->ops->name, be->device_name);
    mem_plan plan;
    be->ops->memory_plan(be, cfg->train.micro_batch_size, cfg->data.max_seq_len, &plan);
    print_plan(info, &plan);
    int64_t warm = train_warmup_steps(cfg);
    int accum = cfg->train.batch_size / cfg->train.micro_batch_size;
    fprintf(info, "schedule: %d steps, %s lr %.3g, %lld warmup steps; %d micro-batch%s of %d per step\n", cfg->train.steps,
            cfg->train.schedule, cfg->train.lr, (long long)warm, accum, accum == 1 ? "" : "es",
            cfg->train.micro_batch_size);
    if (args->dry_run) info_config(cfg, info);  // parameters per module type
    if (info != stderr) fclose(info);
    if (args->dry_run) {
        mosft_log("dry run: stopping before step 1\n");
        goto out_backend;
    }

    // Run directory: resolved config, metrics.
    if ((rc = mkdir_p(run_dir))) goto out_backend;
    char *resolved = config_to_json(cfg);
    rc = write_text(run_dir, "config.json", resolved);
    free(resolved);
    if (rc) goto out_backend;
    char *metrics_path = path_join(run_dir, "metrics.jsonl");
    trainer_meta meta = {0};
    float *mom1 = xcalloc(ad->n_params, sizeof(float)), *mom2 = xcalloc(ad->n_params, sizeof(float));
    if (resume_ckpt) {
        mosft_buf cur = {0};
        rc = checkpoint_load_state(resume_ckpt, ad->n_params, mom1, mom2, &cur, &meta);
        if (!rc) rc = data->restore_cursor(data, cur.data, cur.len);
        buf_free(&cur);
        if (rc) goto out_state;
        be->ops->set_state(be, ad->params, mom1, mom2);
        metrics_truncate(metrics_path, meta.step);
        mosft_log("resumed %s at step %lld\n", resume_ckpt, (long long)meta.step);
    } else {
        atomic_write_file(metrics_path, "", 0);
    }
    FILE *metrics = fopen(metrics_path, "a");
    if (!metrics) {
        rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: cannot open for appending", metrics_path);
        goto out_state;
    }
    install_signals();

    int n_micro = accum;
    mb_copy *step_mbs = xcalloc((size_t)n_micro, sizeof(mb_copy));
    double t_run0 = mosft_now() - meta.elapsed_s, t_log = mosft_now(), t_proc0 = mosft_now();
    int64_t tok_log = 0, sup_log = 0, start_step = meta.step, steps_here = 0;
    double fpt = flops_per_token(&mc, cfg->data.max_seq_len), fph = head_flops_per_supervised(&mc);
    be->ops->zero_grad(be);
    if (!resume_ckpt && cfg->train.eval_every > 0 && data->n_eval(data) > 0) {  // the starting point
        double el_loss;
        int64_t el_n;
        if ((rc = run_eval(be, data, 0, &el_loss, &el_n))) goto out_loop;
        mosft_log("eval  step 0 | loss %.4f | ppl %.3f | %lld tokens\n", el_loss, exp(el_loss), (long long)el_n);
        fprintf(metrics, "{\"step\": 0, \"eval_loss\": %.6f, \"eval_ppl\": %.4f, \"eval_tokens\": %lld}\n", el_loss,
                exp(el_loss), (long long)el_n);
        fflush(metrics);
    }
    int exhausted = 0;
    for (int64_t step = meta.step; step < cfg->train.steps; step++) {
        // Gather the step's micro-batches (all of them: the loss is a mean over the whole step).
        int got = 0;
        for (int i = 0; i < n_micro; i++) {
            micro_batch mb;
            int drc = MOSFT_OK;
            int r = data->next(data, &mb, &drc);
            if (drc) {
                rc = drc;
                break;
            }
            if (r == 0) break;
            mb_copy_set(&step_mbs[i], &mb);
            got++;
        }
        if (rc) break;
        if (got < n_micro) {
            exhausted = 1;
            mosft_log("data exhausted after %d epoch%s at step %lld\n", cfg->data.epochs, cfg->data.epochs == 1 ? "" : "s",
                    (long long)step);
            break;
        }
        int64_t nsup = 0, ntok = 0;
        for (int i = 0; i < n_micro; i++) {
            nsup += count_supervised(&step_mbs[i].mb);
            ntok += count_tokens(&step_mbs[i].mb);
        }
        double t0 = mosft_now(), loss_sum = 0;
        int64_t counted = 0;
        float scale = nsup ? 1.0f / (float)nsup : 0.0f;
        for (int i = 0; i < n_micro && !rc; i++) {
            dropout_ctx dc = {cfg->train.seed, step, i};
            double ls = 0;
            int64_t c = 0;
            rc = be->ops->forward_backward(be, &step_mbs[i].mb, scale, &dc, &ls, &c);
            loss_sum += ls;
            counted += c;
        }
        if (rc) break;
        double loss = counted ? loss_sum / (double)counted : NAN;
        double norm = be->ops->grad_norm(be);
        double lr = train_lr_at(cfg, step);
        int finite = isfinite(loss) && isfinite(norm);
        if (finite) {
            double clip = cfg->train.max_grad_norm > 0 ? cfg->train.max_grad_norm / (norm + 1e-6) : 1.0;
            be->ops->optimizer_step(be, (float)lr, (float)(clip < 1.0 ? clip : 1.0), step + 1);
            meta.nonfinite_streak = 0;
        } else {
            be->ops->zero_grad(be);
            meta.nonfinite_streak++;
            fprintf(stderr, "step %lld: non-finite %s (loss %g, grad norm %g): step skipped (%d in a row)\n",
                    (long long)step + 1, isfinite(loss) ? "gradient norm" : "loss", loss, norm, meta.nonfinite_streak);
        }
        double dt = mosft_now() - t0;
        meta.step = step + 1;
        meta.tokens_seen += ntok;
        meta.elapsed_s = mosft_now() - t_run0;
        tok_log += ntok;
        sup_log += nsup;
        steps_here++;
        fprintf(metrics,
                "{\"step\": %lld, \"loss\": %.6f, \"grad_norm\": %.6f, \"lr\": %.6e, \"tokens\": %lld, "
                "\"supervised\": %lld, \"step_s\": %.4f, \"elapsed_s\": %.2f%s}\n",
                (long long)meta.step, loss, norm, lr, (long long)ntok, (long long)nsup, dt, meta.elapsed_s,
                finite ? "" : ", \"skipped\": true");
        fflush(metrics);
        if (meta.nonfinite_streak >= cfg->train.max_nonfinite) {
            rc = mosft_fail_hint(MOSFT_ERR_RUNTIME, "lower train.lr or train.max_grad_norm; check the data",
                                 "training diverged: %d steps in a row with a non-finite loss or gradient norm (step %lld)",
                                 meta.nonfinite_streak, (long long)meta.step);
            break;
        }
        int last = meta.step == cfg->train.steps;
        if (meta.step % cfg->train.log_every == 0 || last || meta.step == start_step + 1) {
            double now = mosft_now(), span = now - t_log;
            double tps = span > 0 ? (double)tok_log / span : 0;
            char eta[32], el[32], mem[32], tk[32];
            double per_step = (now - t_proc0) / (double)steps_here;
            mosft_fmt_duration(eta, sizeof eta, per_step * (double)(cfg->train.steps - meta.step));
            mosft_fmt_duration(el, sizeof el, meta.elapsed_s);
            mosft_fmt_bytes(mem, sizeof mem, be->ops->memory_used ? be->ops->memory_used(be) : host_rss_bytes());
            if (tps >= 1e6) snprintf(tk, sizeof tk, "%.2fM", tps / 1e6);
            else if (tps >= 1e3) snprintf(tk, sizeof tk, "%.1fk", tps / 1e3);
            else snprintf(tk, sizeof tk, "%.0f", tps);
            char mfu[32] = "";
            if (be->flops_peak > 0) {
                double pct = span > 0 ? 100.0 * ((double)tok_log * fpt + (double)sup_log * fph) / span / be->flops_peak : 0;
                if (pct < 0.1) snprintf(mfu, sizeof mfu, " | MFU <0.1%%");  // tiny models: not "0.0%"
                else snprintf(mfu, sizeof mfu, " | MFU %4.1f%%", pct);
            }
            mosft_log("step %lld/%d | loss %.4f | norm %.3f | lr %.2e | %4.0f ms | %s tok/s%s | mem %s | %s | ETA %s\n",
                    (long long)meta.step, cfg->train.steps, loss, norm, lr, dt * 1000.0, tk, mfu, mem, el, eta);
            t_log = now;
            tok_log = 0;
            sup_log = 0;
        }
        if (cfg->train.eval_every > 0 && (meta.step % cfg->train.eval_every == 0 || last) && data->n_eval(data) > 0) {
            double el_loss;
            int64_t el_n;
            if ((rc = run_eval(be, data, 0, &el_loss, &el_n))) break;
            mosft_log("eval  step %lld | loss %.4f | ppl %.3f | %lld tokens\n", (long long)meta.step, el_loss,
                    exp(el_loss), (long long)el_n);
            fprintf(metrics, "{\"step\": %lld, \"eval_loss\": %.6f, \"eval_ppl\": %.4f, \"eval_tokens\": %lld}\n",
                    (long long)meta.step, el_loss, exp(el_loss), (long long)el_n);
            fflush(metrics);
        }
        int stop_now = g_stop_signal || (args->stop_after > 0 && steps_here >= args->stop_after);
        if (last || stop_now || (cfg->output.save_every > 0 && meta.step % cfg->output.save_every == 0)) {
            be->ops->sync_to_adapter(be);
            be->ops->get_moments(be, mom1, mom2);
            ad->step = meta.step;
            mosft_buf cur = {0};
            rc = data->save_cursor(data, &cur);
            if (!rc) rc = checkpoint_save(run_dir, ad, mom1, mom2, cur.data, cur.len, &meta, cfg->output.keep_last);
            buf_free(&cur);
            if (rc) break;
            mosft_log("saved %s/checkpoint-%06lld\n", run_dir, (long long)meta.step);
        }
        if (stop_now) {
            if (g_stop_signal) {
                fprintf(stderr, "stopped by signal %d after step %lld; checkpoint saved. Resume with: mosft train --resume %s\n",
                        (int)g_stop_signal, (long long)meta.step, run_dir);
                rc = mosft_fail(MOSFT_ERR_RUNTIME, "interrupted at step %lld (checkpoint saved)", (long long)meta.step);
            }
            break;
        }
    }
    if (!rc && exhausted && meta.step > start_step) {  // save where the data ended
        be->ops->sync_to_adapter(be);
        be->ops->get_moments(be, mom1, mom2);
        ad->step = meta.step;
        mosft_buf cur = {0};
        rc = data->save_cursor(data, &cur);
        if (!rc) rc = checkpoint_save(run_dir, ad, mom1, mom2, cur.data, cur.len, &meta, cfg->output.keep_last);
        buf_free(&cur);
    }
    if (!rc && meta.step == cfg->train.steps) {
        char el[32];
        mosft_fmt_duration(el, sizeof el, meta.elapsed_s);
        mosft_log("done: %lld steps in %s; adapter: %s/adapter.mos (export: mosft export %s/adapter.mos -o DIR)\n",
                (long long)meta.step, el, run_dir, run_dir);
    }
out_loop:
    for (int i = 0; i < n_micro; i++) free(step_mbs[i].buf);
    free(step_mbs);
    fclose(metrics);
out_state:
    free(mom1);
    free(mom2);
    free(metrics_path);
out_backend:
    backend_destroy(be);
    if (model) {
        llama_model_free(model);
        free(model);
    }
out_adapter:
    adapter_free(ad);
out_data:
    data->close(data);
    free(resume_ckpt);
    return rc;
}

int train_eval(mosft_config *cfg, const eval_args *args) {
    int rc;
    if (!cfg->model.path[0])
        return mosft_fail(MOSFT_ERR_INPUT, "%s: model.path: expected the HF model folder, got nothing",
                          cfg->source_path[0] ? cfg->source_path : "config");
    llama_config mc;
    if ((rc = llama_config_load(&mc, cfg->model.path))) return rc;
    if ((rc = llama_check_seq_len(&mc, cfg->data.max_seq_len, cfg->source_path[0] ? cfg->source_path : "config"))) return rc;
    train_data *data = NULL;
    int pad_id = 0;
    if ((rc = train_data_open(&data, cfg, &pad_id))) return rc;
    adapter *ad = NULL;
    if (args->adapter_path) {
        rc = adapter_load(&ad, args->adapter_path, &mc);
    } else {
        adapter_spec spec;
        adapter_spec_from_config(&spec, cfg);
        rc = adapter_create(&ad, &spec, &mc);
    }
    if (rc) {
        data->close(data);
        return rc;
    }
    backend *be = NULL;
    llama_model *model = NULL;
    rc = train_backend_open(cfg, ad, &be, &model);
    if (!rc) {
        if (data->n_eval(data) == 0) {
            rc = mosft_fail_hint(MOSFT_ERR_INPUT, "set data.eval_examples > 0", "%s: data.eval_examples: no held-out examples",
                                 cfg->source_path);
        } else {
            double loss;
            int64_t n;
            double t0 = mosft_now();
            rc = run_eval(be, data, args->max_batches, &loss, &n);
            if (!rc) {
                printf("eval loss %.6f | perplexity %.4f | %lld supervised tokens | %d batches | %.1f s\n", loss, exp(loss),
                       (long long)n, data->n_eval(data), mosft_now() - t0);
                printf("{\"eval_loss\": %.6f, \"eval_ppl\": %.6f, \"eval_tokens\": %lld, \"adapter\": \"%s\"}\n", loss, exp(loss),
                       (long long)n, args->adapter_path ? args->adapter_path : "(untrained)");
            }
        }
    }
    backend_destroy(be);
    if (model) {
        llama_model_free(model);
        free(model);
    }
    adapter_free(ad);
    data->close(data);
    return rc;
}
