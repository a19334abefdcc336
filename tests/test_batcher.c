// test_batcher.c: padding, the mixture over epochs (every example exactly once), the held-out eval
// split, determinism, length grouping, weights, bad records, and exact resume of the cursor in a
// second process (threaded loader, shuffle buffer, SuperNI tasks half consumed, gzip shards).
#include <sys/wait.h>

#include "core/fileio.h"
#include "data/batcher.h"
#include "test_util.h"

static tokenizer *g_tok;

static void load_tok(void) {
    if (!shared_available()) return;
    if (tokenizer_load(&g_tok, shared_path("tokenizers/llama2/tokenizer.json")) != MOSFT_OK) {
        fprintf(stderr, "tokenizer: %s\n", mosft_error());
        abort();
    }
}
static void free_tok(void) { tokenizer_free(g_tok); }

static uint64_t row_hash(const int32_t *ids, const int32_t *labels, int n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < n; i++) {
        h = (h ^ (uint32_t)ids[i]) * 0x100000001b3ull;
        h = (h ^ (uint32_t)labels[i]) * 0x100000001b3ull;
    }
    return h ^ (uint64_t)n;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

typedef struct {
    uint64_t *h;
    int *src;
    int n, cap;
} hashes;

static void hashes_add(hashes *v, uint64_t h, int src) {
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 1024;
        v->h = realloc(v->h, (size_t)v->cap * sizeof *v->h);
        v->src = realloc(v->src, (size_t)v->cap * sizeof *v->src);
    }
    v->src[v->n] = src;
    v->h[v->n++] = h;
}

static int scan_cb(void *ctx, int source, const dataset_item *item, const chat_tokens *t) {
    (void)item;
    if (t) hashes_add(ctx, row_hash(t->ids, t->labels, t->n), source);
    return 0;
}

static void batch_rows(const data_batch *b, hashes *v, int max_seq_len) {
    for (int i = 0; i < b->B; i++) {
        const int32_t *ids = b->input_ids + (size_t)i * b->S, *lab = b->labels + (size_t)i * b->S;
        ck_assert_int_le(b->lengths[i], max_seq_len);
        hashes_add(v, row_hash(ids, lab, b->lengths[i]), -1);
    }
}

static data_source_spec k_sources[3];

static void default_opts(data_options *o) {
    data_options_default(o);
    k_sources[0] = (data_source_spec){shared_path("datasets/codealpaca/code_alpaca_2k.json.gz"), "codealpaca", 2.0, 600,
                                      NULL, NULL, 60, 20, 2};
    k_sources[1] = (data_source_spec){"tests/fixtures/data/flan_v2_cot.jsonl", "flan_v2", 1.0, 0, NULL, NULL, 60, 20, 2};
    k_sources[2] = (data_source_spec){shared_path("datasets/superni/tasks"), "superni", 1.0, 0, NULL, NULL, 6, 4, 2};
    o->sources = k_sources;
    o->n_sources = 3;
    o->eos_text = "</s>";
    o->max_seq_len = 256;
    o->micro_batch_size = 4;
    o->pad_id = 0;
    o->eval_examples = 40;
    o->shuffle_buffer = 64;
    o->prefetch = 0;
    o->group_size = 8;
}

START_TEST(test_padding) {
    int32_t a[] = {1, 5, 6, 7}, al[] = {-100, -100, 6, 7}, c[] = {1, 9}, cl[] = {-100, 9};
    int32_t *ids[] = {a, c}, *lab[] = {al, cl}, lens[] = {4, 2};
    data_batch *b = data_batch_make(2, ids, lab, lens, 32000, 8);
    ck_assert_int_eq(b->B, 2);
    ck_assert_int_eq(b->S, 8);  // longest 4, rounded up to 8
    static const int32_t want_ids[] = {1, 5, 6, 7, 32000, 32000, 32000, 32000, 1, 9, 32000, 32000, 32000, 32000, 32000, 32000};
    static const int32_t want_lab[] = {-100, -100, 6, 7, -100, -100, -100, -100, -100, 9, -100, -100, -100, -100, -100, -100};
    static const int32_t want_att[] = {1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < 16; i++) {
        ck_assert_int_eq(b->input_ids[i], want_ids[i]);
        ck_assert_int_eq(b->labels[i], want_lab[i]);
        ck_assert_int_eq(b->attention_mask[i], want_att[i]);
    }
    ck_assert_int_eq(b->n_tokens, 6);
    ck_assert_int_eq(b->n_supervised, 3);
    data_batch_free(b);
}
END_TEST

// One epoch: training rows + eval rows = every kept example of one pass, as a multiset.
START_TEST(test_epoch_exactly_once) {
    REQUIRE_SHARED();
    data_options o;
    default_opts(&o);
    o.epochs = 1;
    hashes scan = {0}, got = {0};
    data_stats st, per[3];
    data_stats_init(&st, o.max_seq_len);
    for (int i = 0; i < 3; i++) data_stats_init(&per[i], o.max_seq_len);
    ck_assert_int_eq(data_scan(&o, g_tok, 0, scan_cb, &scan, per), MOSFT_OK);
    for (int i = 0; i < 3; i++) {
        data_stats_merge(&st, &per[i]);
        data_stats_free(&per[i]);
    }
    ck_assert_int_eq(st.records, 600 + 91 + 3);  // max_records 600, the 91-line fixture, 3 task files
    ck_assert_int_eq(st.examples, 600 + 91 + 26);  // SuperNI: 10 + 10 + 6 instances
    ck_assert_int_eq(st.tasks_skipped, 1);      // task1344.json.gz duplicates task1344.json
    batcher *b;
    ck_assert_int_eq(batcher_open(&b, &o, g_tok), MOSFT_OK);
    int ne = batcher_eval_count(b), n_eval_rows = 0;
    for (int i = 0; i < ne; i++) {
        batch_rows(batcher_eval_batch(b, i), &got, o.max_seq_len);
        n_eval_rows += batcher_eval_batch(b, i)->B;
    }
    ck_assert_int_eq(n_eval_rows, 40);
    int n_batches = 0, short_batches = 0;
    const data_batch *x;
    for (;;) {
        ck_assert_int_eq(batcher_next(b, &x), MOSFT_OK);
        if (!x) break;
        batch_rows(x, &got, o.max_seq_len);
        short_batches += x->B < o.micro_batch_size;
        n_batches++;
    }
    ck_assert_int_le(short_batches, 1);
    ck_assert_int_eq(got.n, scan.n);
    qsort(scan.h, (size_t)scan.n, sizeof(uint64_t), cmp_u64);
    qsort(got.h, (size_t)got.n, sizeof(uint64_t), cmp_u64);
    ck_assert(!memcmp(scan.h, got.h, (size_t)scan.n * sizeof(uint64_t)));
    const data_stats *bs = batcher_stats(b);
    ck_assert_int_eq(bs->kept, scan.n);
    ck_assert_int_eq(bs->eval, 40);
    ck_assert_int_eq(bs->dropped_empty, st.dropped_empty);
    ck_assert_int_eq(bs->tokens, st.tokens);
    batcher_close(b);
    data_stats_free(&st);
    free(scan.h), free(scan.src), free(got.h), free(got.src);
}
END_TEST

// Two epochs: every training example twice, eval rows never.
START_TEST(test_eval_never_trains) {
    REQUIRE_SHARED();
    data_options o;
    default_opts(&o);
    o.epochs = 2;
    o.prefetch = 3;
    batcher *b;
    ck_assert_int_eq(batcher_open(&b, &o, g_tok), MOSFT_OK);
    hashes ev = {0}, tr = {0};
    for (int i = 0; i < batcher_eval_count(b); i++) batch_rows(batcher_eval_batch(b, i), &ev, o.max_seq_len);
    const data_batch *x;
    while (batcher_next(b, &x) == MOSFT_OK && x) batch_rows(x, &tr, o.max_seq_len);
    qsort(ev.h, (size_t)ev.n, sizeof(uint64_t), cmp_u64);
    qsort(tr.h, (size_t)tr.n, sizeof(uint64_t), cmp_u64);
    int shared_rows = 0;
    for (int i = 0; i < tr.n; i++) shared_rows += bsearch(&tr.h[i], ev.h, (size_t)ev.n, sizeof(uint64_t), cmp_u64) != NULL;
    ck_assert_int_eq(shared_rows, 0);
    ck_assert_int_eq(tr.n % 2, 0);
    for (int i = 0; i < tr.n; i += 2) ck_assert(tr.h[i] == tr.h[i + 1]);  // each one twice (no duplicates in data)
    ck_assert_int_eq(batcher_epoch(b), 2);
    batcher_close(b);
    free(ev.h), free(ev.src), free(tr.h), free(tr.src);
}
END_TEST

static uint64_t stream_hash(const data_options *o, int n_batches, long *padded_cells) {
    batcher *b;
    ck_assert_int_eq(batcher_open(&b, o, g_tok), MOSFT_OK);
    uint64_t h = 0;
    long cells = 0;
    for (int k = 0; k < n_batches; k++) {
        const data_batch *x;
        ck_assert_int_eq(batcher_next(b, &x), MOSFT_OK);
        ck_assert_ptr_nonnull(x);
        for (int i = 0; i < x->B; i++) h = h * 31 + row_hash(x->input_ids + (size_t)i * x->S, x->labels + (size_t)i * x->S, x->S);
        cells += (long)x->B * x->S - x->n_tokens;
    }
    if (padded_cells) *padded_cells = cells;
    batcher_close(b);
    return h;
}

START_TEST(test_deterministic_and_grouping) {
    REQUIRE_SHARED();
    data_options o;
    default_opts(&o);
    o.group_by_length = 0;
    long pad_plain, pad_grouped;
    uint64_t a = stream_hash(&o, 60, &pad_plain);
    o.prefetch = 2;  // the loader thread changes nothing
    ck_assert(stream_hash(&o, 60, NULL) == a);
    o.seed = 7;
    ck_assert(stream_hash(&o, 60, NULL) != a);
    o.seed = 42;
    o.group_by_length = 1;
    stream_hash(&o, 60, &pad_grouped);
    ck_assert_msg(pad_grouped * 2 < pad_plain, "grouping should cut padding: %ld vs %ld", pad_grouped, pad_plain);
}
END_TEST

// Endless stream with weights 3:1: the share of source 0 among training rows is about 3/4.
START_TEST(test_weights_endless) {
    REQUIRE_SHARED();
    data_options o;
    default_opts(&o);
    o.n_sources = 2;
    k_sources[0].weight = 3.0;
    k_sources[0].max_records = 200;
    k_sources[1].weight = 1.0;
    hashes scan = {0};
    data_stats st[2];
    data_stats_init(&st[0], o.max_seq_len);
    data_stats_init(&st[1], o.max_seq_len);
    ck_assert_int_eq(data_scan(&o, g_tok, 0, scan_cb, &scan, st), MOSFT_OK);
    batcher *b;
    ck_assert_int_eq(batcher_open(&b, &o, g_tok), MOSFT_OK);
    int from0 = 0, total = 0;
    for (int k = 0; k < 300; k++) {  // 1200 rows: several passes over both sources
        const data_batch *x;
        ck_assert_int_eq(batcher_next(b, &x), MOSFT_OK);
        ck_assert_ptr_nonnull(x);
        for (int i = 0; i < x->B; i++) {
            uint64_t h = row_hash(x->input_ids + (size_t)i * x->S, x->labels + (size_t)i * x->S, x->lengths[i]);
            int src = -1;
            for (int j = 0; j < scan.n; j++)
                if (scan.h[j] == h) src = scan.src[j];
            ck_assert_int_ge(src, 0);
            from0 += src == 0;
            total++;
        }
    }
    double share = (double)from0 / total;
    ck_assert_msg(share > 0.70 && share < 0.80, "share of source 0: %.3f", share);
    ck_assert_int_ge(batcher_epoch(b), 2);  // source 0 cycled
    batcher_close(b);
    data_stats_free(&st[0]);
    data_stats_free(&st[1]);
    free(scan.h), free(scan.src);
}
END_TEST

// Save after K batches; a second process restores and produces the next batches; they must equal
// the uninterrupted run's.
static void check_resume(data_options *o, int K, int M) {
    char *dir = test_tmpdir();
    char path[512];
    snprintf(path, sizeof path, "%s/cursor.bin", dir);
    batcher *b;
    ck_assert_int_eq(batcher_open(&b, o, g_tok), MOSFT_OK);
    const data_batch *x;
    for (int k = 0; k < K; k++) {
        ck_assert_int_eq(batcher_next(b, &x), MOSFT_OK);
        ck_assert_ptr_nonnull(x);
    }
    uint8_t *cur;
    size_t n;
    ck_assert_int_eq(batcher_cursor_save(b, &cur, &n), MOSFT_OK);
    FILE *f = fopen(path, "wb");
    fwrite(cur, 1, n, f);
    fclose(f);
    free(cur);
    uint64_t want[256];
    for (int k = 0; k < M; k++) {
        ck_assert_int_eq(batcher_next(b, &x), MOSFT_OK);
        want[k] = x ? row_hash(x->input_ids, x->labels, x->B * x->S) ^ (uint64_t)x->B << 40 : 0;
    }
    batcher_close(b);
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    pid_t pid = fork();
    if (pid == 0) {  // a new process: open, restore, continue
        close(fds[0]);
        batcher *c;
        if (batcher_open(&c, o, g_tok) != MOSFT_OK) _exit(3);
        char *bytes;
        size_t len;
        if (file_read_all(path, &bytes, &len) != MOSFT_OK) _exit(4);
        if (batcher_cursor_restore(c, (uint8_t *)bytes, len) != MOSFT_OK) {
            fprintf(stderr, "restore: %s\n", mosft_error());
            _exit(5);
        }
        for (int k = 0; k < M; k++) {
            const data_batch *y;
            if (batcher_next(c, &y) != MOSFT_OK) _exit(6);
            uint64_t h = y ? row_hash(y->input_ids, y->labels, y->B * y->S) ^ (uint64_t)y->B << 40 : 0;
            if (write(fds[1], &h, sizeof h) != sizeof h) _exit(7);
        }
        batcher_close(c);
        _exit(0);
    }
    close(fds[1]);
    uint64_t got[256];
    size_t rd = 0;
    ssize_t r;
    while (rd < (size_t)M * sizeof(uint64_t) && (r = read(fds[0], (char *)got + rd, (size_t)M * sizeof(uint64_t) - rd)) > 0)
        rd += (size_t)r;
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "restoring process failed (%d)", WEXITSTATUS(status));
    ck_assert_uint_eq(rd, (size_t)M * sizeof(uint64_t));
    for (int k = 0; k < M; k++) ck_assert_msg(got[k] == want[k], "batch %d after the restore differs", K + k);
}

START_TEST(test_resume_exact) {
    REQUIRE_SHARED();
    data_options o;
    default_opts(&o);
    o.prefetch = 4;  // batches prepared ahead must not leak into the cursor
    check_resume(&o, 37, 60);
    o.group_by_length = 0;
    o.prefetch = 0;
    check_resume(&o, 5, 40);
    o.epochs = 1;  // across the end of a finite stream
    o.shuffle_buffer = 1;
    check_resume(&o, 150, 60);
}
END_TEST

START_TEST(test_bad_records_and_errors) {
    REQUIRE_SHARED();
    char *dir = test_tmpdir();
    char path[512];
    snprintf(path, sizeof path, "%s/m.jsonl", dir);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < 30; i++) {
        if (i == 7) fprintf(f, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, oops\n");
        else if (i == 11) fprintf(f, "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n");
        else if (i == 13) fprintf(f, "{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n");
        else fprintf(f, "{\"messages\": [{\"role\": \"user\", \"content\": \"q%d\"}, {\"role\": \"assistant\", \"content\": \"a%d\"}]}\n", i, i);
    }
    fclose(f);
    data_source_spec src = {path, "messages", 1, 0, NULL, NULL, 0, 0, 0};
    data_options o;
    default_opts(&o);
    o.sources = &src;
    o.n_sources = 1;
    o.eval_examples = 0;
    o.epochs = 1;
    batcher *b;
    ck_assert_int_eq(batcher_open(&b, &o, g_tok), MOSFT_OK);
    const data_batch *x;
    int rows = 0;
    while (batcher_next(b, &x) == MOSFT_OK && x) rows += x->B;
    ck_assert_int_eq(rows, 27);
    const data_stats *st = batcher_stats(b);
    ck_assert_int_eq(st->bad_records, 2);
    ck_assert_int_eq(st->dropped_empty, 1);  // no assistant turn
    char want[600];
    snprintf(want, sizeof want, "%s:8: ", path);
    ck_assert_msg(strstr(st->bad_first[0], want), "%s", st->bad_first[0]);
    snprintf(want, sizeof want, "%s:12: messages[0].role: expected \"system\", \"user\" or \"assistant\", got \"robot\"", path);
    ck_assert_msg(strstr(st->bad_first[1], want), "%s", st->bad_first[1]);
    batcher_close(b);
    // on_bad_record = fail: the first bad record stops the stream with its file:line.
    o.skip_bad_records = 0;
    ck_assert_int_eq(batcher_open(&b, &o, g_tok), MOSFT_OK);
    int rc;
    while ((rc = batcher_next(b, &x)) == MOSFT_OK && x) {
    }
    ck_assert_int_eq(rc, MOSFT_ERR_INPUT);
    snprintf(want, sizeof want, "%s:8: ", path);
    ck_assert_msg(strstr(mosft_error(), want), "%s", mosft_error());
    batcher_close(b);
    // A missing file fails at open, before any batch.
    src.path = "/nonexistent/data.jsonl";
    ck_assert_int_eq(batcher_open(&b, &o, g_tok), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "/nonexistent/data.jsonl"), "%s", mosft_error());
    src.path = path;
    src.format = "alpaca";
    ck_assert_int_eq(batcher_open(&b, &o, g_tok), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "data.sources[0]") && strstr(mosft_error(), "\"alpaca\""), "%s", mosft_error());
    // A cursor from other options is refused.
    src.format = "messages";
    ck_assert_int_eq(batcher_open(&b, &o, g_tok), MOSFT_OK);
    uint8_t *cur;
    size_t n;
    ck_assert_int_eq(batcher_cursor_save(b, &cur, &n), MOSFT_OK);
    batcher_close(b);
    o.seed = 1;
    ck_assert_int_eq(batcher_open(&b, &o, g_tok), MOSFT_OK);
    ck_assert_int_eq(batcher_cursor_restore(b, cur, n), MOSFT_ERR_INPUT);
    cur[40] ^= 0xff;
    ck_assert_int_eq(batcher_cursor_restore(b, cur, n), MOSFT_ERR_INPUT);
    batcher_close(b);
    free(cur);
}
END_TEST

// Short max_seq_len: rows are cut at it, prompts that fill it are dropped and counted.
START_TEST(test_truncation_and_drop) {
    REQUIRE_SHARED();
    data_options o;
    default_opts(&o);
    o.max_seq_len = 48;
    o.epochs = 1;
    o.eval_examples = 0;
    batcher *b;
    ck_assert_int_eq(batcher_open(&b, &o, g_tok), MOSFT_OK);
    const data_batch *x;
    int rows = 0;
    while (batcher_next(b, &x) == MOSFT_OK && x) {
        ck_assert_int_le(x->S, 48);
        for (int i = 0; i < x->B; i++) {
            int sup = 0;
            for (int t = 0; t < x->lengths[i]; t++) sup += x->labels[(size_t)i * x->S + t] != -100;
            ck_assert_int_gt(sup, 0);  // nothing without a target
        }
        rows += x->B;
    }
    const data_stats *st = batcher_stats(b);
    ck_assert_int_gt(st->dropped_empty, 0);
    ck_assert_int_gt(st->truncated, 0);
    ck_assert_int_eq(rows + st->dropped_empty, st->examples);
    ck_assert_int_eq(st->max_len, 48);
    batcher_close(b);
}
END_TEST

static Suite *batcher_suite(void) {
    Suite *s = suite_create("batcher");
    TCase *tc = tcase_create("stream");
    tcase_add_unchecked_fixture(tc, load_tok, free_tok);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_padding);
    tcase_add_test(tc, test_epoch_exactly_once);
    tcase_add_test(tc, test_eval_never_trains);
    tcase_add_test(tc, test_deterministic_and_grouping);
    tcase_add_test(tc, test_weights_endless);
    tcase_add_test(tc, test_resume_exact);
    tcase_add_test(tc, test_bad_records_and_errors);
    tcase_add_test(tc, test_truncation_and_drop);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(batcher_suite)
