// train_data.c: the configured data (tokenizer, sources, batcher from data/) as the training loop's
// train_data (core/train.h).
#include <stdlib.h>
#include <string.h>

#include "core/data_glue.h"
#include "core/train.h"
#include "data/batcher.h"

typedef struct {
    data_setup setup;
    batcher *b;
} td_impl;

static void to_micro(const data_batch *db, micro_batch *mb) {
    mb->B = db->B;
    mb->S = db->S;
    mb->input_ids = db->input_ids;
    mb->labels = db->labels;
    mb->attn_mask = db->attention_mask;
}

static int td_next(train_data *d, micro_batch *mb, int *rc) {
    td_impl *t = d->impl;
    const data_batch *db = NULL;
    *rc = batcher_next(t->b, &db);
    if (*rc || !db) return 0;
    to_micro(db, mb);
    return 1;
}

static int td_n_eval(train_data *d) { return batcher_eval_count(((td_impl *)d->impl)->b); }

static void td_eval_batch(train_data *d, int i, micro_batch *mb) {
    to_micro(batcher_eval_batch(((td_impl *)d->impl)->b, i), mb);
}

static int td_save(train_data *d, mosft_buf *out) {
    uint8_t *bytes = NULL;
    size_t n = 0;
    int rc = batcher_cursor_save(((td_impl *)d->impl)->b, &bytes, &n);
    if (rc) return rc;
    out->len = 0;
    buf_append(out, bytes, n);
    free(bytes);
    return MOSFT_OK;
}

static int td_restore(train_data *d, const void *bytes, size_t n) {
    return batcher_cursor_restore(((td_impl *)d->impl)->b, bytes, n);
}

static void td_stats(train_data *d, FILE *f) {
    const data_stats *s = batcher_stats(((td_impl *)d->impl)->b);
    fprintf(f, "data: %lld records, %lld examples, %lld dropped, %lld malformed\n", (long long)s->records,
            (long long)s->examples, (long long)s->dropped_empty, (long long)s->bad_records);
}

static void td_close(train_data *d) {
    if (!d) return;
    td_impl *t = d->impl;
    batcher_close(t->b);
    data_setup_free(&t->setup);
    free(t);
    free(d);
}

int train_data_open(train_data **out, const mosft_config *cfg, int *pad_id) {
    *out = NULL;
    td_impl *t = xcalloc(1, sizeof *t);
    int rc = data_setup_init(&t->setup, cfg);
    if (rc) {
        free(t);
        return rc;
    }
    rc = batcher_open(&t->b, &t->setup.opts, t->setup.tok);
    if (rc) {
        data_setup_free(&t->setup);
        free(t);
        return rc;
    }
    if (pad_id) *pad_id = t->setup.opts.pad_id;
    train_data *d = xcalloc(1, sizeof *d);
    d->next = td_next;
    d->n_eval = td_n_eval;
    d->eval_batch = td_eval_batch;
    d->save_cursor = td_save;
    d->restore_cursor = td_restore;
    d->print_stats = td_stats;
    d->close = td_close;
    d->impl = t;
    *out = d;
    return MOSFT_OK;
}
