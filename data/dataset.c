// dataset.c: one data source as a stream of chat examples; data statistics; the one-pass scan
// (see dataset.h).
#include "data/dataset.h"

#include <stdlib.h>
#include <string.h>

#include "core/common.h"

void data_options_default(data_options *o) {
    memset(o, 0, sizeof *o);
    o->eos_text = "</s>";
    o->max_seq_len = 512;
    o->micro_batch_size = 16;
    o->pad_id = 0;
    o->pad_to_multiple = 1;
    o->eval_examples = 1024;
    o->shuffle_buffer = 10000;
    o->epochs = 0;
    o->group_by_length = 1;
    o->group_size = 50;
    o->skip_bad_records = 1;
    o->seed = 42;
    o->template_seed = 42;
    o->prefetch = 4;
    source_http_opts_default(&o->http);
}

// ---- statistics -------------------------------------------------------------------------------

void data_stats_init(data_stats *st, int max_seq_len) {
    memset(st, 0, sizeof *st);
    st->hist_n = max_seq_len + 1;
    st->len_hist = xcalloc((size_t)st->hist_n, sizeof(int64_t));
}

void data_stats_free(data_stats *st) {
    free(st->len_hist);
    memset(st, 0, sizeof *st);
}

void data_stats_copy(data_stats *dst, const data_stats *src) {
    int64_t *h = dst->len_hist;
    int hn = dst->hist_n;
    *dst = *src;
    if (hn != src->hist_n) {
        free(h);
        h = xcalloc((size_t)(src->hist_n > 0 ? src->hist_n : 1), sizeof(int64_t));
    }
    if (src->hist_n) memcpy(h, src->len_hist, (size_t)src->hist_n * sizeof(int64_t));
    dst->len_hist = h;
    dst->hist_n = src->hist_n;
}

void data_stats_merge(data_stats *d, const data_stats *s) {
    d->records += s->records;
    d->bad_records += s->bad_records;
    d->bad_instances += s->bad_instances;
    for (int i = 0; i < s->n_bad_first && d->n_bad_first < DATA_STATS_BAD_KEEP; i++)
        memcpy(d->bad_first[d->n_bad_first++], s->bad_first[i], sizeof d->bad_first[0]);
    d->tasks_skipped += s->tasks_skipped;
    d->examples += s->examples;
    d->dropped_empty += s->dropped_empty;
    d->kept += s->kept;
    d->truncated += s->truncated;
    d->eval += s->eval;
    d->tokens += s->tokens;
    d->supervised += s->supervised;
    if (s->max_len > d->max_len) d->max_len = s->max_len;
    for (int i = 0; i < s->hist_n && i < d->hist_n; i++) d->len_hist[i] += s->len_hist[i];
}

void data_stats_add_kept(data_stats *st, const chat_tokens *t) {
    st->kept++;
    st->truncated += t->truncated;
    st->tokens += t->n;
    st->supervised += t->n_supervised;
    if (t->n > st->max_len) st->max_len = t->n;
    if (t->n < st->hist_n) st->len_hist[t->n]++;
}

void data_stats_add_bad(data_stats *st, const char *msg) {
    st->bad_records++;
    if (st->n_bad_first < DATA_STATS_BAD_KEEP) {
        snprintf(st->bad_first[st->n_bad_first], sizeof st->bad_first[0], "%s", msg);
        st->n_bad_first++;
    }
}

int64_t data_stats_percentile(const data_stats *st, double q) {
    int64_t total = 0;
    for (int i = 0; i < st->hist_n; i++) total += st->len_hist[i];
    if (!total) return 0;
    int64_t want = (int64_t)(q * (double)total + 0.999999);  // the smallest length covering q of them
    if (want < 1) want = 1;
    int64_t c = 0;
    for (int i = 0; i < st->hist_n; i++) {
        c += st->len_hist[i];
        if (c >= want) return i;
    }
    return st->hist_n - 1;
}

// ---- dataset ----------------------------------------------------------------------------------

struct dataset {
    int index;
    char *path;
    data_format fmt;
    char **shards;
    int n_shards;
    uint8_t *shard_skip;  // (n_shards) superni: filtered out (split lists, _mmmlu_, duplicates)
    name_set include, exclude;
    superni_opts sopts;
    int64_t max_records;
    source_http_opts http;
    uint64_t template_seed;
    int skip_bad;
    data_stats *stats;   // may be NULL
    record_reader *rd;   // reader of pos.shard, or NULL
    dataset_pos pos;
    chat_example *pending;  // examples of the last record
    int n_pending, cap_pending;
    int64_t pending_line;   // line of the record that made them
};

static void pos_start_shard(dataset *d) {
    memset(&d->pos.rec, 0, sizeof d->pos.rec);
    d->pos.rec.line = 1;
    d->pos.rec.mode = REC_AUTO;
}

static int is_task_file(const char *path) {
    size_t n = strlen(path);
    return (n > 5 && !strcmp(path + n - 5, ".json")) || (n > 8 && !strcmp(path + n - 8, ".json.gz"));
}

int dataset_open(dataset **out, int index, const data_source_spec *spec, const data_options *o, data_stats *stats) {
    *out = NULL;
    data_format fmt;
    int rc = data_format_parse(spec->format ? spec->format : "", &fmt);
    if (rc != MOSFT_OK) return mosft_fail_prefix(rc, "data.sources[%d]", index);
    dataset *d = xcalloc(1, sizeof *d);
    d->index = index;
    d->path = xstrdup(spec->path ? spec->path : "");
    d->fmt = fmt;
    d->max_records = spec->max_records;
    d->http = o->http;
    d->template_seed = o->template_seed;
    d->skip_bad = o->skip_bad_records;
    d->stats = stats;
    d->sopts.zero_shot = spec->zero_shot_per_task;
    d->sopts.few_shot = spec->few_shot_per_task;
    d->sopts.n_few_shot = spec->n_few_shot;
    if ((rc = source_list_shards(d->path, &d->shards, &d->n_shards)) != MOSFT_OK) goto fail;
    d->shard_skip = xcalloc((size_t)d->n_shards, 1);
    if (fmt == FMT_SUPERNI) {
        if (spec->tasks && *spec->tasks && (rc = name_set_load(&d->include, spec->tasks, &d->http)) != MOSFT_OK) goto fail;
        if (spec->exclude_tasks && *spec->exclude_tasks &&
            (rc = name_set_load(&d->exclude, spec->exclude_tasks, &d->http)) != MOSFT_OK)
            goto fail;
        char name[512], prev[512] = "";
        int kept = 0;
        for (int i = 0; i < d->n_shards; i++) {
            superni_task_name(d->shards[i], name, sizeof name);
            // open-instruct skips _mmmlu_ tasks (MMLU leakage); a task stored twice (.json and
            // .json.gz, sorted next to each other) is read once.
            int skip = !is_task_file(d->shards[i]) || strstr(name, "_mmmlu_") != NULL || !strcmp(name, prev) ||
                       (spec->tasks && *spec->tasks && !name_set_has(&d->include, name)) ||
                       name_set_has(&d->exclude, name);
            d->shard_skip[i] = (uint8_t)skip;
            if (is_task_file(d->shards[i])) snprintf(prev, sizeof prev, "%s", name);
            kept += !skip;
        }
        if (!kept) {
            rc = mosft_fail(MOSFT_ERR_INPUT, "data.sources[%d]: %s: expected SuperNI task files (taskNNN_*.json) that the "
                            "task lists select, got none", index, d->path);
            goto fail;
        }
    }
    // Fail before training starts: every shard must exist (files) or answer (URLs).
    for (int i = 0; i < d->n_shards; i++)
        if (!d->shard_skip[i] && (rc = source_probe(d->shards[i], &d->http)) != MOSFT_OK) goto fail;
    pos_start_shard(d);
    *out = d;
    return MOSFT_OK;
fail:
    dataset_close(d);
    return rc;
}

void dataset_close(dataset *d) {
    if (!d) return;
    record_reader_close(d->rd);
    for (int i = 0; i < d->cap_pending; i++) chat_example_free(&d->pending[i]);
    free(d->pending);
    source_free_shards(d->shards, d->n_shards);
    free(d->shard_skip);
    name_set_free(&d->include);
    name_set_free(&d->exclude);
    free(d->path);
    free(d);
}

void dataset_set_stats(dataset *d, data_stats *stats) { d->stats = stats; }
const char *dataset_path(const dataset *d) { return d->path; }
int dataset_format(const dataset *d) { return (int)d->fmt; }

void dataset_rewind(dataset *d) {
    record_reader_close(d->rd);
    d->rd = NULL;
    int64_t pass = d->pos.pass + 1;
    memset(&d->pos, 0, sizeof d->pos);
    d->pos.pass = pass;
    pos_start_shard(d);
    d->n_pending = 0;
}

static void pending_reserve(dataset *d, int n) {
    if (n <= d->cap_pending) return;
    d->pending = xrealloc(d->pending, (size_t)n * sizeof *d->pending);
    memset(d->pending + d->cap_pending, 0, (size_t)(n - d->cap_pending) * sizeof *d->pending);
    d->cap_pending = n;
}

// Turn record `j` (ordinal rec_ord, at file:line) into the pending examples. Returns MOSFT_OK (maybe
// with no examples), or MOSFT_ERR_INPUT with "file:line: reason" (a bad record).
static int make_examples(dataset *d, const cJSON *j, int64_t rec_ord, const char *file, int64_t line, int count) {
    for (int i = 0; i < d->n_pending; i++) chat_example_clear(&d->pending[i]);
    d->n_pending = 0;
    data_rng r;
    if (d->fmt == FMT_SUPERNI) {
        char name[512];
        superni_task_name(file, name, sizeof name);
        data_rng_init(&r, d->template_seed, (uint64_t)d->index, data_hash_str(name));
        chat_example *v;
        int n, n_bad;
        char why[256];
        int rc = superni_task_examples(j, &d->sopts, &r, &v, &n, &n_bad, why, sizeof why);
        if (rc != MOSFT_OK) return mosft_fail_prefix(rc, "%s:%lld", file, (long long)line);
        pending_reserve(d, n);
        for (int i = 0; i < n; i++) {
            chat_example_free(&d->pending[i]);
            d->pending[i] = v[i];  // moves ownership
        }
        free(v);
        d->n_pending = n;
        if (count && d->stats && n_bad) {
            d->stats->bad_instances += n_bad;
            char msg[320];
            snprintf(msg, sizeof msg, "%s: %s (%d such instances skipped)", file, why, n_bad);
            if (d->stats->n_bad_first < DATA_STATS_BAD_KEEP)
                snprintf(d->stats->bad_first[d->stats->n_bad_first++], sizeof d->stats->bad_first[0], "%s", msg);
        }
        return MOSFT_OK;
    }
    data_rng_init(&r, d->template_seed, (uint64_t)d->index, (uint64_t)rec_ord);
    pending_reserve(d, 1);
    int rc = format_record(d->fmt, j, &r, &d->pending[0]);
    if (rc != MOSFT_OK) return mosft_fail_prefix(rc, "%s:%lld", file, (long long)line);
    d->n_pending = 1;
    return MOSFT_OK;
}

static int open_reader(dataset *d, const record_pos *at) {
    record_reader_close(d->rd);
    d->rd = NULL;
    return record_reader_open(&d->rd, d->shards[d->pos.shard], data_format_record_mode(d->fmt), at, &d->http);
}

int dataset_next(dataset *d, dataset_item *out, int *got) {
    *got = 0;
    for (;;) {
        if (d->pos.done) return MOSFT_OK;
        if (d->pos.has_pending && d->pos.pending_used < d->n_pending) {
            out->ex = &d->pending[d->pos.pending_used++];
            out->ordinal = (uint64_t)d->pos.example_ord++;
            out->file = d->shards[d->pos.shard];
            out->line = d->pending_line;
            if (d->pos.pending_used == d->n_pending) d->pos.has_pending = 0;
            *got = 1;
            return MOSFT_OK;
        }
        d->pos.has_pending = 0;
        if (d->max_records > 0 && d->pos.record_ord >= d->max_records) {
            d->pos.done = 1;
            continue;
        }
        if (!d->rd) {
            while (d->pos.shard < d->n_shards && d->shard_skip[d->pos.shard]) {
                if (d->stats && d->fmt == FMT_SUPERNI && is_task_file(d->shards[d->pos.shard])) d->stats->tasks_skipped++;
                d->pos.shard++;
            }
            if (d->pos.shard >= d->n_shards) {
                d->pos.done = 1;
                continue;
            }
            int rc = open_reader(d, &d->pos.rec);
            if (rc != MOSFT_OK) return rc;
        }
        record_pos before;
        record_tell(d->rd, &before);
        cJSON *j;
        int64_t line;
        int rc = record_next(d->rd, &j, &line);
        if (rc != MOSFT_OK) {
            if (rc == MOSFT_ERR_INPUT && d->skip_bad && record_reader_can_continue(d->rd)) {
                if (d->stats) data_stats_add_bad(d->stats, mosft_error());
                d->pos.record_ord++;
                continue;
            }
            return rc;
        }
        if (!j) {  // end of this shard
            record_reader_close(d->rd);
            d->rd = NULL;
            d->pos.shard++;
            pos_start_shard(d);
            continue;
        }
        int64_t rec_ord = d->pos.record_ord++;
        if (d->stats) d->stats->records++;
        rc = make_examples(d, j, rec_ord, d->shards[d->pos.shard], line, 1);
        cJSON_Delete(j);
        if (rc != MOSFT_OK) {
            if (rc == MOSFT_ERR_INPUT && d->skip_bad) {
                if (d->stats) data_stats_add_bad(d->stats, mosft_error());
                continue;
            }
            return rc;
        }
        if (d->stats) d->stats->examples += d->n_pending;
        d->pending_line = line;
        d->pos.pending_rec = before;
        d->pos.pending_record_ord = rec_ord;
        d->pos.pending_used = 0;
        d->pos.has_pending = d->n_pending > 0;
    }
}

void dataset_tell(const dataset *d, dataset_pos *pos) {
    *pos = d->pos;
    if (d->rd) record_tell(d->rd, &pos->rec);
    if (!(pos->has_pending && pos->pending_used < d->n_pending)) pos->has_pending = 0;
}

int dataset_seek(dataset *d, const dataset_pos *pos) {
    record_reader_close(d->rd);
    d->rd = NULL;
    d->n_pending = 0;
    if (pos->shard < 0 || pos->shard > d->n_shards)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: data cursor: expected shard < %d, got %d; did the file list change?",
                          d->path, d->n_shards, pos->shard);
    d->pos = *pos;
    if (pos->done || !pos->has_pending) return MOSFT_OK;  // the reader opens lazily at pos->rec
    // Regenerate the partly consumed record's examples, then continue after it.
    int rc = open_reader(d, &pos->pending_rec);
    if (rc != MOSFT_OK) return rc;
    cJSON *j;
    int64_t line;
    rc = record_next(d->rd, &j, &line);
    if (rc != MOSFT_OK) return rc;
    if (!j)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: data cursor: expected a record at line %lld, got the end of the file; "
                          "did it change since the checkpoint?", d->shards[pos->shard], (long long)pos->pending_rec.line);
    rc = make_examples(d, j, pos->pending_record_ord, d->shards[pos->shard], line, 0);
    cJSON_Delete(j);
    d->pending_line = line;
    if (rc != MOSFT_OK) return rc;
    if (pos->pending_used > d->n_pending)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: data cursor: expected at least %d examples in the record at line %lld, "
                          "got %d", d->shards[pos->shard], pos->pending_used, (long long)line, d->n_pending);
    return MOSFT_OK;
}

// ---- one pass over every source ---------------------------------------------------------------

int data_scan(const data_options *o, tokenizer *tok, int64_t max_examples, data_scan_fn fn, void *ctx,
              data_stats *per_source) {
    chat_encoder enc;
    chat_encoder_init(&enc, tok, o->eos_text, o->max_seq_len);
    chat_tokens t = {0};
    int rc = MOSFT_OK, stop = 0;
    dataset **ds = xcalloc((size_t)(o->n_sources > 0 ? o->n_sources : 1), sizeof *ds);
    for (int s = 0; s < o->n_sources && rc == MOSFT_OK; s++) rc = dataset_open(&ds[s], s, &o->sources[s], o, &per_source[s]);
    for (int s = 0; s < o->n_sources && rc == MOSFT_OK && !stop; s++) {
        data_stats *stats = &per_source[s];
        for (int64_t k = 0; max_examples <= 0 || k < max_examples; k++) {
            dataset_item it;
            int got;
            if ((rc = dataset_next(ds[s], &it, &got)) != MOSFT_OK || !got) break;
            chat_encode(&enc, it.ex, &t);
            if (t.n_supervised == 0) {
                stats->dropped_empty++;
                if (fn && fn(ctx, s, &it, NULL)) stop = 1;
            } else {
                data_stats_add_kept(stats, &t);
                if (fn && fn(ctx, s, &it, &t)) stop = 1;
            }
            if (stop) break;
        }
    }
    for (int s = 0; s < o->n_sources; s++) dataset_close(ds[s]);
    free(ds);
    chat_tokens_free(&t);
    chat_encoder_free(&enc);
    return rc;
}
