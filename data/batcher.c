// batcher.c: mixture, eval split, shuffle buffer, length grouping, padding, prefetch thread and the
// resumable cursor (see batcher.h).
#include "data/batcher.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "core/common.h"
#include "core/rng.h"

// Purposes in core/rng.h's key space for the data stream's generators.
#define RNG_DATA_MIX 0x6d697800u
#define RNG_DATA_SHUF 0x73687566u
#define RNG_DATA_GROUP 0x67727000u
#define RNG_DATA_EVAL 0x6576616cu
#define EVAL_STRIDE 8  // one example in EVAL_STRIDE is eligible for the eval set

#define CURSOR_MAGIC "MOSFTDC1"
#define CURSOR_VERSION 1u

// One encoded example.
typedef struct {
    int32_t *ids, *labels;  // (n) each
    int32_t n, n_sup;
    uint32_t src;
    int32_t truncated;
    uint64_t ord;
} enc_ex;

static void enc_ex_free(enc_ex *e) {
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

struct batcher {
    data_options o;
    data_source_spec *specs;  // owned copies
    tokenizer *tok;
    chat_encoder enc;
    chat_tokens scratch;
    int n_src;
    dataset **ds;
    double *weight;       // (n_src)
    uint8_t *active;      // (n_src) epoch mode: the source still has data in this epoch
    int64_t *pass_yield;  // (n_src) training examples from the current pass
    int64_t epoch;
    int stream_ended;     // no more training examples (epochs done)
    int src_finished;     // and every batch was formed
    rng_state mix_rng, shuf_rng, group_rng;
    uint64_t fingerprint;
    enc_ex *buf;          // shuffle buffer (buf_n of cap)
    int buf_n, buf_cap;
    uint64_t *eval_ids;   // sorted (src << 48 | ordinal)
    int n_eval_ids;
    data_batch **eval_batches;
    int n_eval_batches;
    data_stats stats;     // the training stream's (guarded by state_mu)
    data_stats snap;      // snapshot after each production (guarded by q_mu)
    data_stats out_stats; // what batcher_stats returns
    // queue of prepared micro-batches (guarded by q_mu)
    data_batch **q;
    int q_head, q_len, q_cap;
    data_batch *current;  // handed to the caller
    int handed;           // batcher_next was called (no restore after)
    // loader thread
    int threaded, th_started, stop, q_finished, q_err;
    char q_errmsg[1024];
    pthread_t th;
    pthread_mutex_t state_mu, q_mu;
    pthread_cond_t q_cond, space_cond;
};

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

static data_batch *batch_from_examples(const batcher *b, enc_ex *const *rows, int n) {
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

static void q_push_locked(batcher *b, data_batch *x) {
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

static data_batch *q_at(const batcher *b, int i) { return b->q[(b->q_head + i) % b->q_cap]; }

static void q_push(batcher *b, data_batch *x) {
    pthread_mutex_lock(&b->q_mu);
    q_push_locked(b, x);
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
            q_push(b, batch_from_examples(b, rows + lo, hi - lo));
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
            b->eval_batches[k] = batch_from_examples(b, rows + lo, hi - lo);
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

// ---- cursor -----------------------------------------------------------------------------------

static void put_u64(mosft_buf *w, uint64_t v) {
    unsigned char x[8];
    for (int i = 0; i < 8; i++) x[i] = (unsigned char)(v >> (8 * i));
    buf_append(w, x, 8);
}
static void put_var(mosft_buf *w, uint64_t v) {
    unsigned char x[10];
    int n = 0;
    do {
        x[n] = (unsigned char)(v & 0x7f);
        v >>= 7;
        if (v) x[n] |= 0x80;
        n++;
    } while (v);
    buf_append(w, x, (size_t)n);
}
static void put_int(mosft_buf *w, int64_t v) { put_var(w, ((uint64_t)v << 1) ^ (uint64_t)(v >> 63)); }  // zigzag

typedef struct {
    const unsigned char *p, *end;
    int bad;
} reader;

static uint64_t get_u64(reader *r) {
    if (r->end - r->p < 8) {
        r->bad = 1;
        return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)r->p[i] << (8 * i);
    r->p += 8;
    return v;
}
static uint64_t get_var(reader *r) {
    uint64_t v = 0;
    for (int s = 0; s < 64; s += 7) {
        if (r->p >= r->end) break;
        unsigned char c = *r->p++;
        v |= (uint64_t)(c & 0x7f) << s;
        if (!(c & 0x80)) return v;
    }
    r->bad = 1;
    return 0;
}
static int64_t get_int(reader *r) {
    uint64_t u = get_var(r);
    return (int64_t)(u >> 1) ^ -(int64_t)(u & 1);
}

// Token ids as varints; the loss mask as alternating run lengths, starting with a masked run.
static void put_row(mosft_buf *w, const int32_t *ids, const int32_t *labels, int n) {
    put_var(w, (uint64_t)n);
    for (int i = 0; i < n; i++) put_var(w, (uint32_t)ids[i]);
    int i = 0, masked = 1;
    while (i < n) {
        int j = i;
        while (j < n && (labels[j] == -100) == masked) j++;
        put_var(w, (uint64_t)(j - i));
        i = j;
        masked = !masked;
    }
}

static int get_row(reader *r, enc_ex *e, int max_len) {
    uint64_t n = get_var(r);
    if (r->bad || n > (uint64_t)max_len) return r->bad = 1, -1;
    e->n = (int32_t)n;
    e->truncated = 0;
    e->ids = xmalloc((n ? n : 1) * sizeof(int32_t));
    e->labels = xmalloc((n ? n : 1) * sizeof(int32_t));
    e->n_sup = 0;
    for (uint64_t i = 0; i < n; i++) e->ids[i] = (int32_t)get_var(r);
    uint64_t i = 0;
    int masked = 1;
    while (i < n && !r->bad) {
        uint64_t k = get_var(r);
        if (k > n - i) return r->bad = 1, -1;
        for (uint64_t t = i; t < i + k; t++) e->labels[t] = masked ? -100 : e->ids[t];
        if (!masked) e->n_sup += (int32_t)k;
        i += k;
        masked = !masked;
    }
    return r->bad ? -1 : 0;
}

static void put_recpos(mosft_buf *w, const record_pos *p) {
    put_var(w, p->offset);
    put_int(w, p->line);
    put_int(w, p->state);
    put_int(w, p->mode);
}
static void get_recpos(reader *r, record_pos *p) {
    p->offset = get_var(r);
    p->line = get_int(r);
    p->state = (int32_t)get_int(r);
    p->mode = (int32_t)get_int(r);
}

static void put_stats(mosft_buf *w, const data_stats *s) {
    int64_t v[] = {s->records, s->bad_records, s->bad_instances, s->tasks_skipped, s->examples, s->dropped_empty,
                   s->kept, s->truncated, s->eval, s->tokens, s->supervised, s->max_len};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) put_int(w, v[i]);
    put_var(w, (uint64_t)s->n_bad_first);
    for (int i = 0; i < s->n_bad_first; i++) {
        size_t n = strlen(s->bad_first[i]);
        put_var(w, n);
        buf_append(w, s->bad_first[i], n);
    }
    put_var(w, (uint64_t)s->hist_n);
    for (int i = 0; i < s->hist_n; i++) put_var(w, (uint64_t)s->len_hist[i]);
}
static void get_stats(reader *r, data_stats *s) {
    int64_t *v[] = {&s->records, &s->bad_records, &s->bad_instances, &s->tasks_skipped, &s->examples, &s->dropped_empty,
                    &s->kept, &s->truncated, &s->eval, &s->tokens, &s->supervised, &s->max_len};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) *v[i] = get_int(r);
    uint64_t nb = get_var(r);
    if (nb > DATA_STATS_BAD_KEEP) {
        r->bad = 1;
        return;
    }
    s->n_bad_first = (int)nb;
    for (int i = 0; i < s->n_bad_first && !r->bad; i++) {
        uint64_t n = get_var(r);
        if (n >= sizeof s->bad_first[0] || (uint64_t)(r->end - r->p) < n) {
            r->bad = 1;
            return;
        }
        memcpy(s->bad_first[i], r->p, n);
        s->bad_first[i][n] = 0;
        r->p += n;
    }
    uint64_t hn = get_var(r);
    if (hn != (uint64_t)s->hist_n) {
        r->bad = 1;
        return;
    }
    for (int i = 0; i < s->hist_n; i++) s->len_hist[i] = (int64_t)get_var(r);
}

static void serialize_state(batcher *b, mosft_buf *w) {
    put_var(w, (uint64_t)b->n_src);
    for (int i = 0; i < b->n_src; i++) {
        dataset_pos p;
        dataset_tell(b->ds[i], &p);
        put_int(w, p.pass);
        put_int(w, p.shard);
        put_int(w, p.done);
        put_recpos(w, &p.rec);
        put_int(w, p.record_ord);
        put_int(w, p.example_ord);
        put_int(w, p.has_pending);
        put_int(w, p.pending_used);
        put_recpos(w, &p.pending_rec);
        put_int(w, p.pending_record_ord);
        put_var(w, b->active[i]);
        put_int(w, b->pass_yield[i]);
    }
    put_int(w, b->epoch);
    put_var(w, (uint64_t)b->stream_ended);
    put_var(w, (uint64_t)b->src_finished);
    const rng_state *rs[3] = {&b->mix_rng, &b->shuf_rng, &b->group_rng};
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < 4; i++) put_u64(w, rs[k]->s[i]);
    put_var(w, (uint64_t)b->buf_n);
    for (int i = 0; i < b->buf_n; i++) {
        put_var(w, b->buf[i].src);
        put_var(w, b->buf[i].ord);
        put_row(w, b->buf[i].ids, b->buf[i].labels, b->buf[i].n);
    }
    put_var(w, (uint64_t)b->q_len);
    for (int k = 0; k < b->q_len; k++) {
        const data_batch *x = q_at(b, k);
        put_var(w, (uint64_t)x->B);
        for (int i = 0; i < x->B; i++)
            put_row(w, x->input_ids + (size_t)i * x->S, x->labels + (size_t)i * x->S, x->lengths[i]);
    }
    put_stats(w, &b->stats);
}

int batcher_cursor_save(batcher *b, uint8_t **bytes, size_t *len) {
    *bytes = NULL;
    *len = 0;
    mosft_buf w = {0};
    if (b->th_started) pthread_mutex_lock(&b->state_mu);
    pthread_mutex_lock(&b->q_mu);
    serialize_state(b, &w);
    pthread_mutex_unlock(&b->q_mu);
    if (b->th_started) pthread_mutex_unlock(&b->state_mu);
    uLongf clen = compressBound((uLong)w.len);
    size_t hdr = 8 + 4 + 8 + 8;
    uint8_t *out = xmalloc(hdr + clen);
    memcpy(out, CURSOR_MAGIC, 8);
    for (int i = 0; i < 4; i++) out[8 + i] = (uint8_t)(CURSOR_VERSION >> (8 * i));
    for (int i = 0; i < 8; i++) out[12 + i] = (uint8_t)(b->fingerprint >> (8 * i));
    for (int i = 0; i < 8; i++) out[20 + i] = (uint8_t)((uint64_t)w.len >> (8 * i));
    if (compress2(out + hdr, &clen, (const Bytef *)w.data, (uLong)w.len, 1) != Z_OK) {
        free(out);
        buf_free(&w);
        return mosft_fail(MOSFT_ERR_RUNTIME, "data cursor: zlib compress failed");
    }
    buf_free(&w);
    *bytes = out;
    *len = hdr + clen;
    return MOSFT_OK;
}

int batcher_cursor_restore(batcher *b, const uint8_t *bytes, size_t len) {
    if (b->handed) return mosft_fail(MOSFT_ERR_RUNTIME, "data cursor: restore after batches were taken (restore first)");
    if (len < 28 || memcmp(bytes, CURSOR_MAGIC, 8))
        return mosft_fail(MOSFT_ERR_INPUT, "data cursor: expected the bytes of batcher_cursor_save (magic %s), got %zu "
                          "other bytes", CURSOR_MAGIC, len);
    uint32_t ver = 0;
    uint64_t fp = 0, raw = 0;
    for (int i = 0; i < 4; i++) ver |= (uint32_t)bytes[8 + i] << (8 * i);
    for (int i = 0; i < 8; i++) fp |= (uint64_t)bytes[12 + i] << (8 * i);
    for (int i = 0; i < 8; i++) raw |= (uint64_t)bytes[20 + i] << (8 * i);
    if (ver != CURSOR_VERSION)
        return mosft_fail(MOSFT_ERR_INPUT, "data cursor: expected version %u, got %u", CURSOR_VERSION, ver);
    if (fp != b->fingerprint)
        return mosft_fail_hint(MOSFT_ERR_INPUT, "resume with the data config of the checkpoint's run (config.json in the run directory)",
                               "data cursor: expected the data options it was saved with (sources, seeds, max_seq_len, "
                               "micro_batch_size, tokenizer), got different ones");
    if (raw > ((uint64_t)1 << 36)) return mosft_fail(MOSFT_ERR_INPUT, "data cursor: implausible size %llu", (unsigned long long)raw);
    unsigned char *data = xmalloc(raw ? raw : 1);
    uLongf dl = (uLongf)raw;
    if (uncompress(data, &dl, bytes + 28, (uLong)(len - 28)) != Z_OK || dl != raw) {
        free(data);
        return mosft_fail(MOSFT_ERR_INPUT, "data cursor: expected zlib data, got corrupt bytes");
    }
    reader r = {data, data + raw, 0};
    int rc = MOSFT_OK;
    if (get_var(&r) != (uint64_t)b->n_src) r.bad = 1;
    for (int i = 0; i < b->n_src && !r.bad && rc == MOSFT_OK; i++) {
        dataset_pos p;
        memset(&p, 0, sizeof p);
        p.pass = get_int(&r);
        p.shard = (int32_t)get_int(&r);
        p.done = (int32_t)get_int(&r);
        get_recpos(&r, &p.rec);
        p.record_ord = get_int(&r);
        p.example_ord = get_int(&r);
        p.has_pending = (int32_t)get_int(&r);
        p.pending_used = (int32_t)get_int(&r);
        get_recpos(&r, &p.pending_rec);
        p.pending_record_ord = get_int(&r);
        b->active[i] = (uint8_t)get_var(&r);
        b->pass_yield[i] = get_int(&r);
        if (!r.bad) rc = dataset_seek(b->ds[i], &p);
    }
    b->epoch = get_int(&r);
    b->stream_ended = (int)get_var(&r);
    b->src_finished = (int)get_var(&r);
    rng_state *rs[3] = {&b->mix_rng, &b->shuf_rng, &b->group_rng};
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < 4; i++) rs[k]->s[i] = get_u64(&r);
    uint64_t nbuf = get_var(&r);
    if (nbuf > (uint64_t)b->o.shuffle_buffer) r.bad = 1;
    for (uint64_t i = 0; i < nbuf && !r.bad && rc == MOSFT_OK; i++) {
        enc_ex e;
        e.src = (uint32_t)get_var(&r);
        e.ord = get_var(&r);
        if (get_row(&r, &e, b->o.max_seq_len) < 0) break;
        if (b->buf_n == b->buf_cap) {
            b->buf_cap = b->buf_cap ? b->buf_cap * 2 : 256;
            b->buf = xrealloc(b->buf, (size_t)b->buf_cap * sizeof *b->buf);
        }
        b->buf[b->buf_n++] = e;
    }
    uint64_t nq = get_var(&r);
    for (uint64_t k = 0; k < nq && !r.bad; k++) {
        uint64_t B = get_var(&r);
        if (B == 0 || B > (uint64_t)b->o.micro_batch_size) {
            r.bad = 1;
            break;
        }
        enc_ex *rows = xcalloc(B, sizeof *rows);
        enc_ex **rp = xcalloc(B, sizeof *rp);
        uint64_t got = 0;
        for (; got < B; got++) {
            if (get_row(&r, &rows[got], b->o.max_seq_len) < 0) break;
            rp[got] = &rows[got];
        }
        if (got == B) q_push_locked(b, batch_from_examples(b, rp, (int)B));
        for (uint64_t i = 0; i < got; i++) enc_ex_free(&rows[i]);
        free(rows);
        free(rp);
    }
    if (!r.bad) get_stats(&r, &b->stats);
    free(data);
    if (rc != MOSFT_OK) return rc;
    if (r.bad) return mosft_fail(MOSFT_ERR_INPUT, "data cursor: expected a complete cursor, got truncated or corrupt data");
    data_stats_copy(&b->snap, &b->stats);
    return MOSFT_OK;
}
