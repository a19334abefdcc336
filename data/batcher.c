// batcher.c: mixture, eval split, shuffle buffer, length grouping, padding and the prefetch thread
// (see batcher.h; the cursor is in batcher_cursor.c).
#include "data/batcher_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/rng.h"

// Purposes in core/rng.h's key space for the data stream's generators.
#define RNG_DATA_MIX 0x6d697800u
#define RNG_DATA_SHUF 0x73687566u
#define RNG_DATA_GROUP 0x67727000u
#define RNG_DATA_EVAL 0x6576616cu
#define EVAL_STRIDE 8  // one example in EVAL_STRIDE is eligible for the eval set

void enc_ex_free(enc_ex *e) {
    free(e->ids);
    free(e->labels);
    e->ids = e->labels = NULL;
}

static enc_ex enc_ex_from(const chat_tokens *t, uint32_t src, uint64_t ord) {
    enc_ex e = {xmalloc((size_t)t->n * sizeof(int32_t)), xmalloc((size_t)t->n * sizeof(int32_t)), t->n, t->n_supervised,
                src, t->truncated, ord};
    memcpy(e.ids, t->ids, (size_t)t->n * sizeof(int32_t));
    memcpy(e.labels, t->labels, (size_t)t->n * sizeof(int32_t));
    return e;
}


// ---- batches ----------------------------------------------------------------------------------

data_batch *data_batch_make(int n, int32_t *const *ids, int32_t *const *labels, const int32_t *lens, int32_t pad_id,
                            int pad_to_multiple) {
    int S = 1;
    for (int i = 0; i < n; i++)
        if (lens[i] > S) S = lens[i];
    if (pad_to_multiple > 1) S = (S + pad_to_multiple - 1) / pad_to_multiple * pad_to_multiple;
    data_batch *b = xcalloc(1, sizeof *b);
    b->B = n;
    b->S = S;
    size_t cells = (size_t)n * (size_t)S;
    b->input_ids = xmalloc(cells * sizeof(int32_t));
    b->labels = xmalloc(cells * sizeof(int32_t));
    b->attention_mask = xmalloc(cells * sizeof(int32_t));
    b->lengths = xmalloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
    for (int i = 0; i < n; i++) {
        int32_t *row_ids = b->input_ids + (size_t)i * S, *row_lab = b->labels + (size_t)i * S;
        int32_t *row_att = b->attention_mask + (size_t)i * S;
        int L = lens[i];
        memcpy(row_ids, ids[i], (size_t)L * sizeof(int32_t));
        memcpy(row_lab, labels[i], (size_t)L * sizeof(int32_t));
        for (int t = 0; t < L; t++) {
            row_att[t] = 1;
            b->n_supervised += row_lab[t] != -100;
        }
        for (int t = L; t < S; t++) {
            row_ids[t] = pad_id;
            row_lab[t] = -100;
            row_att[t] = 0;
        }
        b->lengths[i] = L;
        b->n_tokens += L;
    }
    return b;
}

void data_batch_free(data_batch *b) {
    if (!b) return;
    free(b->input_ids);
    free(b->labels);
    free(b->attention_mask);
    free(b->lengths);
    free(b);
}

data_batch *batcher_make_batch(const batcher *b, enc_ex *const *rows, int n) {
    int32_t **ids = xmalloc((size_t)(n > 0 ? n : 1) * sizeof *ids), **lab = xmalloc((size_t)(n > 0 ? n : 1) * sizeof *lab);
    int32_t *lens = xmalloc((size_t)(n > 0 ? n : 1) * sizeof *lens);
    for (int i = 0; i < n; i++) {
        ids[i] = rows[i]->ids;
        lab[i] = rows[i]->labels;
        lens[i] = rows[i]->n;
    }
    data_batch *x = data_batch_make(n, ids, lab, lens, b->o.pad_id, b->o.pad_to_multiple);
    free(ids);
    free(lab);
    free(lens);
    return x;
}

// Longest first; ties by source and ordinal so the order never depends on qsort's.
static int cmp_len_desc(const void *x, const void *y) {
    const enc_ex *a = *(enc_ex *const *)x, *c = *(enc_ex *const *)y;
    if (a->n != c->n) return a->n > c->n ? -1 : 1;
    if (a->src != c->src) return a->src < c->src ? -1 : 1;
    return a->ord < c->ord ? -1 : a->ord > c->ord;
}

// ---- queue ------------------------------------------------------------------------------------

void batcher_q_push_locked(batcher *b, data_batch *x) {
    if (b->q_len == b->q_cap) {
        int nc = b->q_cap ? b->q_cap * 2 : 16;
        data_batch **nq = xmalloc((size_t)nc * sizeof *nq);
        for (int i = 0; i < b->q_len; i++) nq[i] = b->q[(b->q_head + i) % b->q_cap];
        free(b->q);
        b->q = nq;
        b->q_cap = nc;
        b->q_head = 0;
    }
    b->q[(b->q_head + b->q_len) % b->q_cap] = x;
    b->q_len++;
}

static data_batch *q_pop_locked(batcher *b) {
    if (!b->q_len) return NULL;
    data_batch *x = b->q[b->q_head];
    b->q_head = (b->q_head + 1) % b->q_cap;
    b->q_len--;
    return x;
}

data_batch *batcher_q_at(const batcher *b, int i) { return b->q[(b->q_head + i) % b->q_cap]; }

static void q_push(batcher *b, data_batch *x) {
    pthread_mutex_lock(&b->q_mu);
    batcher_q_push_locked(b, x);
    pthread_cond_signal(&b->q_cond);
    pthread_mutex_unlock(&b->q_mu);
}

// ---- the example stream -----------------------------------------------------------------------

static int draw_source(const batcher *b, rng_state *r, const uint8_t *active) {
    double tot = 0;
    int last = -1;
    for (int i = 0; i < b->n_src; i++)
        if (active[i]) {
            tot += b->weight[i];
            last = i;
        }
    if (last < 0) return -1;
    double u = rng_next_double(r) * tot;
    for (int i = 0; i < b->n_src; i++)
        if (active[i]) {
            u -= b->weight[i];
            if (u < 0) return i;
        }
    return last;
}

static int eval_pick(uint64_t seed, int src, uint64_t ord) {
    return rng_key(RNG_DATA_EVAL, seed, (uint64_t)src, ord, 0) % EVAL_STRIDE == 0;
}

static int cmp_u64(const void *x, const void *y) {
    uint64_t a = *(const uint64_t *)x, c = *(const uint64_t *)y;
    return a < c ? -1 : a > c;
}

static int is_eval(const batcher *b, int src, uint64_t ord) {
    if (!b->n_eval_ids || !eval_pick(b->o.seed, src, ord)) return 0;
    uint64_t key = (uint64_t)src << 48 | ord;
    return bsearch(&key, b->eval_ids, (size_t)b->n_eval_ids, sizeof key, cmp_u64) != NULL;
}

static void dataset_pos_zero(dataset_pos *p) {
    memset(p, 0, sizeof *p);
    p->rec.line = 1;
}

// The next training example: mixture draw, eval skip, encoding, dropping. The drawn source is read
// until it gives a kept example (or its pass ends), so the weights are shares of *training*
// examples, whatever each source loses to eval, bad records or empty targets. *got = 0 at the end.
static int next_train_example(batcher *b, enc_ex *out, int *got) {
    *got = 0;
    for (;;) {
        if (b->stream_ended) return MOSFT_OK;
        int s = draw_source(b, &b->mix_rng, b->active);
        if (s < 0) {  // epoch mode: every source finished its pass
            b->epoch++;
            if (b->o.epochs > 0 && b->epoch >= b->o.epochs) {
                b->stream_ended = 1;
                continue;
            }
            for (int i = 0; i < b->n_src; i++) {
                dataset_rewind(b->ds[i]);
                b->active[i] = 1;
                b->pass_yield[i] = 0;
            }
            continue;
        }
        for (;;) {
            dataset_item it;
            int g;
            int rc = dataset_next(b->ds[s], &it, &g);
            if (rc != MOSFT_OK) return rc;
            if (!g) {
                if (b->o.epochs == 0) {
                    if (b->pass_yield[s] == 0)
                        return mosft_fail(MOSFT_ERR_INPUT, "data.sources[%d]: %s: expected examples to train on, got "
                                          "none in a whole pass (malformed records, or prompts longer than max_seq_len)",
                                          s, dataset_path(b->ds[s]));
                    dataset_rewind(b->ds[s]);
                    b->pass_yield[s] = 0;
                    if (s == 0) b->epoch++;
                    continue;  // same source, next pass
                }
                b->active[s] = 0;
                break;  // draw again among the others
            }
            if (is_eval(b, s, it.ordinal)) continue;
            chat_encode(&b->enc, it.ex, &b->scratch);
            if (b->scratch.n_supervised == 0) {
                b->stats.dropped_empty++;
                continue;
            }
            data_stats_add_kept(&b->stats, &b->scratch);
            b->pass_yield[s]++;
            *out = enc_ex_from(&b->scratch, (uint32_t)s, it.ordinal);
            *got = 1;
            return MOSFT_OK;
        }
    }
}

// Out of the shuffle buffer: fill it, then take a uniformly random slot.
static int shuffle_next(batcher *b, enc_ex *out, int *got) {
    *got = 0;
    while (b->buf_n < b->o.shuffle_buffer) {
        enc_ex e;
        int g;
        int rc = next_train_example(b, &e, &g);
        if (rc != MOSFT_OK) return rc;
        if (!g) break;
        if (b->buf_n == b->buf_cap) {
            b->buf_cap = b->buf_cap ? b->buf_cap * 2 : 256;
            b->buf = xrealloc(b->buf, (size_t)b->buf_cap * sizeof *b->buf);
        }
        b->buf[b->buf_n++] = e;
    }
    if (!b->buf_n) return MOSFT_OK;
    uint64_t j = rng_next_below(&b->shuf_rng, (uint64_t)b->buf_n);
    *out = b->buf[j];
    b->buf[j] = b->buf[--b->buf_n];
    *got = 1;
    return MOSFT_OK;
}

// Form the next micro-batch(es) and queue them; sets src_finished at the end of a finite stream.
static int produce(batcher *b) {
    int mb = b->o.micro_batch_size;
    int want = mb * (b->o.group_by_length ? b->o.group_size : 1);
    enc_ex *ex = xmalloc((size_t)want * sizeof *ex);
    enc_ex **rows = xmalloc((size_t)want * sizeof *rows);
    int n = 0, rc = MOSFT_OK;
    while (n < want) {
        int g;
        if ((rc = shuffle_next(b, &ex[n], &g)) != MOSFT_OK || !g) break;
        n++;
    }
    if (rc == MOSFT_OK && n == 0) b->src_finished = 1;
    if (rc == MOSFT_OK && n > 0) {
        for (int i = 0; i < n; i++) rows[i] = &ex[i];
        int nb = (n + mb - 1) / mb;
        int *order = xmalloc((size_t)nb * sizeof(int));
        for (int i = 0; i < nb; i++) order[i] = i;
        if (b->o.group_by_length) {
            qsort(rows, (size_t)n, sizeof *rows, cmp_len_desc);
            for (int i = nb - 1; i > 0; i--) {  // the groups' batches in random order
                int j = (int)rng_next_below(&b->group_rng, (uint64_t)(i + 1));
                int t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
        }
        for (int k = 0; k < nb; k++) {
            int c = order[k], lo = c * mb, hi = lo + mb < n ? lo + mb : n;
            q_push(b, batcher_make_batch(b, rows + lo, hi - lo));
        }
        free(order);
    }
    for (int i = 0; i < n; i++) enc_ex_free(&ex[i]);
    free(ex);
    free(rows);
    pthread_mutex_lock(&b->q_mu);
    data_stats_copy(&b->snap, &b->stats);
    pthread_mutex_unlock(&b->q_mu);
    return rc;
}

// ---- eval set ---------------------------------------------------------------------------------

static int build_eval(batcher *b) {
    if (b->o.eval_examples <= 0) return MOSFT_OK;
    rng_state r;
    rng_seed(&r, rng_key(RNG_DATA_EVAL, b->o.seed, 1, 0, 0));
    uint8_t *active = xmalloc((size_t)b->n_src);
    memset(active, 1, (size_t)b->n_src);
    enc_ex *ev = NULL;
    int n = 0, cap = 0, rc = MOSFT_OK;
    for (int s = 0; s < b->n_src; s++) dataset_set_stats(b->ds[s], NULL);
    while (n < b->o.eval_examples) {
        int s = draw_source(b, &r, active);
        if (s < 0) break;
        dataset_item it;
        int g;
        if ((rc = dataset_next(b->ds[s], &it, &g)) != MOSFT_OK) break;
        if (!g) {
            active[s] = 0;
            continue;
        }
        if (!eval_pick(b->o.seed, s, it.ordinal)) continue;
        chat_encode(&b->enc, it.ex, &b->scratch);
        if (b->scratch.n_supervised == 0) continue;
        if (n == cap) ev = xrealloc(ev, (size_t)(cap = cap ? cap * 2 : 64) * sizeof *ev);
        ev[n++] = enc_ex_from(&b->scratch, (uint32_t)s, it.ordinal);
    }
    free(active);
    dataset_pos zero;
    dataset_pos_zero(&zero);
    for (int s = 0; s < b->n_src; s++) {
        dataset_set_stats(b->ds[s], &b->stats);
        if (rc == MOSFT_OK) rc = dataset_seek(b->ds[s], &zero);
    }
    if (rc == MOSFT_OK && n > 0) {
        b->eval_ids = xmalloc((size_t)n * sizeof(uint64_t));
        enc_ex **rows = xmalloc((size_t)n * sizeof *rows);
        // The held-out examples count as kept (and as eval) once, here; the training stream skips them.
        for (int i = 0; i < n; i++) {
            b->eval_ids[i] = (uint64_t)ev[i].src << 48 | ev[i].ord;
            rows[i] = &ev[i];
            chat_tokens t = {ev[i].ids, ev[i].labels, ev[i].n, ev[i].n, ev[i].truncated, ev[i].n_sup};
            data_stats_add_kept(&b->stats, &t);
        }
        b->stats.eval = n;
        b->n_eval_ids = n;
        qsort(b->eval_ids, (size_t)n, sizeof(uint64_t), cmp_u64);
        qsort(rows, (size_t)n, sizeof *rows, cmp_len_desc);
        int mb = b->o.micro_batch_size;
        b->n_eval_batches = (n + mb - 1) / mb;
        b->eval_batches = xmalloc((size_t)b->n_eval_batches * sizeof *b->eval_batches);
        for (int k = 0; k < b->n_eval_batches; k++) {
            int lo = k * mb, hi = lo + mb < n ? lo + mb : n;
            b->eval_batches[k] = batcher_make_batch(b, rows + lo, hi - lo);
        }
        free(rows);
    }
    for (int i = 0; i < n; i++) enc_ex_free(&ev[i]);
    free(ev);
    return rc;
}

// ---- open / close -----------------------------------------------------------------------------

static uint64_t fp_mix(uint64_t h, uint64_t v) { return rng_splitmix64(h ^ v); }
static uint64_t fp_str(uint64_t h, const char *s) { return fp_mix(h, data_hash_str(s ? s : "")); }

static uint64_t options_fingerprint(const data_options *o, const tokenizer *tok) {
    uint64_t h = 0x6d6f7366u;
    h = fp_mix(h, (uint64_t)o->n_sources);
    for (int i = 0; i < o->n_sources; i++) {
        const data_source_spec *s = &o->sources[i];
        uint64_t wbits;
        memcpy(&wbits, &s->weight, sizeof wbits);
        h = fp_str(fp_str(h, s->path), s->format);
        h = fp_mix(fp_mix(h, wbits), (uint64_t)s->max_records);
        h = fp_str(fp_str(h, s->tasks), s->exclude_tasks);
        h = fp_mix(h, (uint64_t)s->zero_shot_per_task << 32 ^ (uint64_t)s->few_shot_per_task << 16 ^ (uint64_t)s->n_few_shot);
    }
    h = fp_str(h, o->eos_text);
    h = fp_mix(h, (uint64_t)o->max_seq_len << 32 ^ (uint64_t)o->micro_batch_size);
    h = fp_mix(h, (uint64_t)(uint32_t)o->pad_id << 32 ^ (uint64_t)o->pad_to_multiple);
    h = fp_mix(h, (uint64_t)o->eval_examples << 32 ^ (uint64_t)o->shuffle_buffer);
    h = fp_mix(h, (uint64_t)o->epochs << 32 ^ (uint64_t)o->group_by_length << 16 ^ (uint64_t)o->group_size);
    h = fp_mix(fp_mix(h, o->seed), o->template_seed);
    h = fp_mix(h, (uint64_t)tokenizer_vocab_size(tok));
    return h;
}

static char *dup_or_null(const char *s) { return s ? xstrdup(s) : NULL; }

int batcher_open(batcher **out, const data_options *o, tokenizer *tok) {
    *out = NULL;
    if (o->n_sources <= 0) return mosft_fail(MOSFT_ERR_INPUT, "data.sources: expected at least one source, got none");
    if (o->micro_batch_size <= 0 || o->max_seq_len < 2 || o->shuffle_buffer < 1)
        return mosft_fail(MOSFT_ERR_INPUT, "data options: expected micro_batch_size >= 1, max_seq_len >= 2, "
                          "shuffle_buffer >= 1, got %d, %d, %d", o->micro_batch_size, o->max_seq_len, o->shuffle_buffer);
    batcher *b = xcalloc(1, sizeof *b);
    b->o = *o;
    b->o.eos_text = xstrdup(o->eos_text ? o->eos_text : "");
    if (b->o.group_size <= 0) b->o.group_size = 50;
    if (b->o.pad_to_multiple <= 0) b->o.pad_to_multiple = 1;
    b->n_src = o->n_sources;
    b->specs = xcalloc((size_t)b->n_src, sizeof *b->specs);
    for (int i = 0; i < b->n_src; i++) {
        b->specs[i] = o->sources[i];
        b->specs[i].path = dup_or_null(o->sources[i].path);
        b->specs[i].format = dup_or_null(o->sources[i].format);
        b->specs[i].tasks = dup_or_null(o->sources[i].tasks);
        b->specs[i].exclude_tasks = dup_or_null(o->sources[i].exclude_tasks);
    }
    b->o.sources = b->specs;
    b->tok = tok;
    chat_encoder_init(&b->enc, tok, b->o.eos_text, o->max_seq_len);
    data_stats_init(&b->stats, o->max_seq_len);
    data_stats_init(&b->snap, o->max_seq_len);
    data_stats_init(&b->out_stats, o->max_seq_len);
    pthread_mutex_init(&b->state_mu, NULL);
    pthread_mutex_init(&b->q_mu, NULL);
    pthread_cond_init(&b->q_cond, NULL);
    pthread_cond_init(&b->space_cond, NULL);
    b->threaded = o->prefetch > 0;
    b->ds = xcalloc((size_t)b->n_src, sizeof *b->ds);
    b->weight = xmalloc((size_t)b->n_src * sizeof(double));
    b->active = xmalloc((size_t)b->n_src);
    b->pass_yield = xcalloc((size_t)b->n_src, sizeof(int64_t));
    int rc = MOSFT_OK;
    for (int i = 0; i < b->n_src && rc == MOSFT_OK; i++) {
        if (!(o->sources[i].weight > 0)) {
            rc = mosft_fail(MOSFT_ERR_INPUT, "data.sources[%d].weight: expected a number > 0, got %g", i, o->sources[i].weight);
            break;
        }
        b->weight[i] = o->sources[i].weight;
        b->active[i] = 1;
        rc = dataset_open(&b->ds[i], i, &b->specs[i], &b->o, &b->stats);
    }
    if (rc == MOSFT_OK) rc = build_eval(b);
    if (rc != MOSFT_OK) {
        batcher_close(b);
        return rc;
    }
    rng_seed(&b->mix_rng, rng_key(RNG_DATA_MIX, o->seed, 0, 0, 0));
    rng_seed(&b->shuf_rng, rng_key(RNG_DATA_SHUF, o->seed, 0, 0, 0));
    rng_seed(&b->group_rng, rng_key(RNG_DATA_GROUP, o->seed, 0, 0, 0));
    b->fingerprint = options_fingerprint(&b->o, tok);
    data_stats_copy(&b->snap, &b->stats);
    *out = b;
    return MOSFT_OK;
}

void batcher_close(batcher *b) {
    if (!b) return;
    if (b->th_started) {
        pthread_mutex_lock(&b->q_mu);
        b->stop = 1;
        pthread_cond_broadcast(&b->space_cond);
        pthread_mutex_unlock(&b->q_mu);
        pthread_join(b->th, NULL);
    }
    for (int i = 0; i < b->n_src; i++) dataset_close(b->ds[i]);
    for (int i = 0; i < b->n_src; i++) {
        free((char *)b->specs[i].path);
        free((char *)b->specs[i].format);
        free((char *)b->specs[i].tasks);
        free((char *)b->specs[i].exclude_tasks);
    }
    free(b->specs);
    free(b->ds);
    free(b->weight);
    free(b->active);
    free(b->pass_yield);
    for (int i = 0; i < b->buf_n; i++) enc_ex_free(&b->buf[i]);
    free(b->buf);
    free(b->eval_ids);
    for (int i = 0; i < b->n_eval_batches; i++) data_batch_free(b->eval_batches[i]);
    free(b->eval_batches);
    while (b->q_len) data_batch_free(q_pop_locked(b));
    free(b->q);
    data_batch_free(b->current);
    data_stats_free(&b->stats);
    data_stats_free(&b->snap);
    data_stats_free(&b->out_stats);
    chat_tokens_free(&b->scratch);
    chat_encoder_free(&b->enc);
    free((char *)b->o.eos_text);
    pthread_mutex_destroy(&b->state_mu);
    pthread_mutex_destroy(&b->q_mu);
    pthread_cond_destroy(&b->q_cond);
    pthread_cond_destroy(&b->space_cond);
    free(b);
}

// ---- the loader thread and the consumer -------------------------------------------------------

static void *loader_main(void *arg) {
    batcher *b = arg;
    for (;;) {
        pthread_mutex_lock(&b->q_mu);
        while (!b->stop && b->q_len >= b->o.prefetch) pthread_cond_wait(&b->space_cond, &b->q_mu);
        int stop = b->stop;
        pthread_mutex_unlock(&b->q_mu);
        if (stop) break;
        pthread_mutex_lock(&b->state_mu);
        int rc = produce(b);
        int finished = b->src_finished;
        pthread_mutex_unlock(&b->state_mu);
        if (rc != MOSFT_OK || finished) {
            pthread_mutex_lock(&b->q_mu);
            if (rc != MOSFT_OK) {
                b->q_err = rc;
                snprintf(b->q_errmsg, sizeof b->q_errmsg, "%s", mosft_error());
            }
            b->q_finished = 1;
            pthread_cond_broadcast(&b->q_cond);
            pthread_mutex_unlock(&b->q_mu);
            break;
        }
    }
    return NULL;
}

int batcher_next(batcher *b, const data_batch **out) {
    *out = NULL;
    b->handed = 1;
    data_batch_free(b->current);
    b->current = NULL;
    if (!b->threaded) {
        while (!b->q_len && !b->src_finished) {
            int rc = produce(b);
            if (rc != MOSFT_OK) return rc;
        }
        b->current = q_pop_locked(b);
        *out = b->current;
        return MOSFT_OK;
    }
    if (!b->th_started) {
        if (pthread_create(&b->th, NULL, loader_main, b) != 0)
            return mosft_fail(MOSFT_ERR_RUNTIME, "data loader: could not start its thread");
        b->th_started = 1;
    }
    pthread_mutex_lock(&b->q_mu);
    while (!b->q_len && !b->q_finished) pthread_cond_wait(&b->q_cond, &b->q_mu);
    b->current = q_pop_locked(b);
    int err = b->q_len == 0 && !b->current ? b->q_err : 0;
    if (b->current) pthread_cond_signal(&b->space_cond);
    pthread_mutex_unlock(&b->q_mu);
    if (err) return mosft_fail(err, "%s", b->q_errmsg);
    *out = b->current;
    return MOSFT_OK;
}

int batcher_eval_count(const batcher *b) { return b->n_eval_batches; }

const data_batch *batcher_eval_batch(const batcher *b, int i) {
    return i >= 0 && i < b->n_eval_batches ? b->eval_batches[i] : NULL;
}

const data_stats *batcher_stats(batcher *b) {
    pthread_mutex_lock(&b->q_mu);
    data_stats_copy(&b->out_stats, &b->snap);
    pthread_mutex_unlock(&b->q_mu);
    return &b->out_stats;
}

int batcher_epoch(const batcher *b) { return (int)b->epoch; }
