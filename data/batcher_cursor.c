// batcher_cursor.c: the data cursor: the batcher's exact position as bytes for checkpoints (see
// batcher.h). Layout: "MOSFTDC1", u32 version, u64 fingerprint of the data options, u64 raw size,
// then zlib(level 1) of: per source its dataset_pos, activity and pass yield; epoch and end flags;
// the mixture, shuffle and group PRNG states; the shuffle buffer's examples; the prepared but not
// yet handed out micro-batches; the statistics. Examples are token ids as varints and the loss mask
// as alternating run lengths (labels are ids or -100).
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "core/common.h"
#include "data/batcher_internal.h"


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
        const data_batch *x = batcher_q_at(b, k);
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
        if (got == B) batcher_q_push_locked(b, batcher_make_batch(b, rp, (int)B));
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
