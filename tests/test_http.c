// test_http.c: HTTP(S) sources against a local server with injected faults
// (tests/http_fault_server.py on 127.0.0.1): dropped connections, 503/429, stalls past the
// timeout, servers that ignore Range, chunked bodies torn mid-chunk, gzip over HTTP, 404s.
// Every test checks that every record arrives exactly once and in order.
#include <signal.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <sys/wait.h>
#include <zlib.h>

#include "data/records.h"
#include "data/source.h"
#include "test_util.h"

#define N_RECORDS 30000

static pid_t g_server = -1;
static int g_port = 0;
static char g_root[256];
static uint64_t g_line_offset[N_RECORDS + 1];  // byte offset where record i starts

static void write_fixtures(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/data.jsonl", g_root);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    uint64_t off = 0;
    for (int i = 0; i < N_RECORDS; i++) {
        g_line_offset[i] = off;
        int n = fprintf(f, "{\"i\": %d, \"pad\": \"%.*s\"}\n", i, 40 + i % 50,
                        "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghij");
        off += (uint64_t)n;
    }
    g_line_offset[N_RECORDS] = off;
    fclose(f);
    // The same records as a two-member gzip file (members are appended, as `cat a.gz b.gz`).
    snprintf(path, sizeof path, "%s/data.jsonl.gz", g_root);
    for (int part = 0; part < 2; part++) {
        gzFile g = gzopen(path, part == 0 ? "wb6" : "ab6");
        ck_assert_ptr_nonnull(g);
        for (int i = part * N_RECORDS / 2; i < (part + 1) * N_RECORDS / 2; i++)
            gzprintf(g, "{\"i\": %d, \"pad\": \"%.*s\"}\n", i, 40 + i % 50,
                     "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghij");
        gzclose(g);
    }
    // The chat vectors as a gzip'd messages file, for the CLI test.
    if (shared_available()) {
        char cmd[1024];
        snprintf(cmd, sizeof cmd, "gzip -c %s > %s/chat.jsonl.gz", shared_path("tokenizers/llama2/chat_vectors.jsonl"), g_root);
        ck_assert_int_eq(run_cmd(cmd), 0);
    }
}

static void server_start(void) {
    char *d = test_tmpdir();
    ck_assert_ptr_nonnull(d);
    snprintf(g_root, sizeof g_root, "%s", d);
    write_fixtures();
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    g_server = fork();
    if (g_server == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        execlp("python3", "python3", "tests/http_fault_server.py", g_root, (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    FILE *in = fdopen(fds[0], "r");
    char line[64] = "";
    if (!fgets(line, sizeof line, in) || sscanf(line, "PORT %d", &g_port) != 1) {
        fprintf(stderr, "could not start tests/http_fault_server.py (python3 needed)\n");
        abort();
    }
    fclose(in);
}

static void server_stop(void) {
    if (g_server > 0) {
        kill(g_server, SIGTERM);
        waitpid(g_server, NULL, 0);
        g_server = -1;
    }
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_root);
    run_cmd(cmd);
}

static source_http_opts fast_opts(void) {
    source_http_opts o;
    source_http_opts_default(&o);
    o.connect_timeout_s = 2;
    o.stall_timeout_s = 0.5;
    o.max_retries = 5;
    o.backoff_base_s = 0.01;
    o.backoff_max_s = 0.1;
    return o;
}

static char *url(const char *route) {
    static char buf[4][512];
    static int k;
    k = (k + 1) & 3;
    snprintf(buf[k], sizeof buf[k], "http://127.0.0.1:%d/%s", g_port, route);
    return buf[k];
}

// Read every record of `u` starting at record `first`; check i == first, first+1, ...; return the
// reader's retry count.
static int read_all_records(const char *u, int first, const record_pos *at) {
    source_http_opts o = fast_opts();
    record_reader *r;
    int rc = record_reader_open(&r, u, REC_JSONL, at, &o);
    if (rc != MOSFT_OK) ck_abort_msg("open %s: %s", u, mosft_error());
    int expect = first;
    for (;;) {
        cJSON *j;
        int64_t line;
        rc = record_next(r, &j, &line);
        if (rc != MOSFT_OK) ck_abort_msg("%s: record %d: %s", u, expect, mosft_error());
        if (!j) break;
        const cJSON *i = cJSON_GetObjectItem(j, "i");
        ck_assert_msg(cJSON_IsNumber(i) && i->valueint == expect, "%s: expected record %d, got %d", u, expect,
                      cJSON_IsNumber(i) ? i->valueint : -1);
        ck_assert_int_eq(line, expect + 1);
        cJSON_Delete(j);
        expect++;
    }
    ck_assert_int_eq(expect, N_RECORDS);
    int retries = record_reader_retries(r);
    record_reader_close(r);
    return retries;
}

// How many logged requests for `needle` carried a Range header.
static int logged_ranges(const char *needle) {
    byte_source *s;
    ck_assert_int_eq(source_open(&s, url("_log"), NULL), MOSFT_OK);
    mosft_buf b = {0};
    char tmp[4096];
    int64_t n;
    while ((n = source_read(s, tmp, sizeof tmp)) > 0) buf_append(&b, tmp, (size_t)n);
    source_close(s);
    cJSON *log = cJSON_Parse(buf_cstr(&b));
    buf_free(&b);
    int count = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, log) {
        const cJSON *p = cJSON_GetObjectItem(e, "path"), *r = cJSON_GetObjectItem(e, "range");
        if (strstr(p->valuestring, needle) && cJSON_IsString(r)) count++;
    }
    cJSON_Delete(log);
    return count;
}

START_TEST(test_http_plain) { ck_assert_int_eq(read_all_records(url("ok/data.jsonl"), 0, NULL), 0); }
END_TEST

START_TEST(test_http_dropped_mid_body) {
    ck_assert_int_eq(read_all_records(url("f/drop=3/t1/data.jsonl"), 0, NULL), 3);
    ck_assert_int_eq(logged_ranges("/t1/"), 3);  // each retry resumed with a Range request
}
END_TEST

START_TEST(test_http_503_then_success) { ck_assert_int_eq(read_all_records(url("f/e503=2/t2/data.jsonl"), 0, NULL), 2); }
END_TEST

START_TEST(test_http_429) { ck_assert_int_eq(read_all_records(url("f/e429=1/t3/data.jsonl"), 0, NULL), 1); }
END_TEST

START_TEST(test_http_stall_past_timeout) {
    double t0 = mosft_now();
    ck_assert_int_eq(read_all_records(url("f/stall=1,stallsec=4/t4/data.jsonl"), 0, NULL), 1);
    ck_assert_msg(mosft_now() - t0 < 3.5, "the stall was waited out instead of timed out");
    ck_assert_int_eq(logged_ranges("/t4/"), 1);
}
END_TEST

START_TEST(test_http_no_range_support) {
    // The server answers 200 with the whole file to a Range request: the prefix is skipped.
    ck_assert_int_eq(read_all_records(url("f/norange,drop=3/t5/data.jsonl"), 0, NULL), 3);
}
END_TEST

START_TEST(test_http_chunked_torn) { ck_assert_int_eq(read_all_records(url("f/chunked,drop=2/t6/data.jsonl"), 0, NULL), 2); }
END_TEST

START_TEST(test_http_gzip) {
    ck_assert_int_eq(read_all_records(url("ok/data.jsonl.gz"), 0, NULL), 0);
    ck_assert_int_eq(read_all_records(url("f/drop=2/t7/data.jsonl.gz"), 0, NULL), 2);
    ck_assert_int_eq(read_all_records(url("f/norange,drop=2/t8/data.jsonl.gz"), 0, NULL), 2);
    ck_assert_int_eq(read_all_records(url("f/stall=1,stallsec=3/t9/data.jsonl.gz"), 0, NULL), 1);
}
END_TEST

START_TEST(test_http_open_at_offset) {
    int k = 12345;
    record_pos at = {g_line_offset[k], k + 1, 0, REC_JSONL};
    read_all_records(url("ok/data.jsonl"), k, &at);                 // Range from the offset
    read_all_records(url("f/norange/t10/data.jsonl"), k, &at);      // 200: skip to it
    read_all_records(url("ok/data.jsonl.gz"), k, &at);              // gzip: inflate and skip
    read_all_records(url("f/drop=2/t11/data.jsonl"), k, &at);       // and faults after that
}
END_TEST

START_TEST(test_http_404) {
    source_http_opts o = fast_opts();
    byte_source *s;
    int rc = source_open(&s, url("ok/missing.jsonl"), &o);
    ck_assert_int_eq(rc, MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "404") && strstr(mosft_error(), "missing.jsonl"), "%s", mosft_error());
    ck_assert_ptr_null(strchr(mosft_error(), '\n'));  // one line
    ck_assert_int_eq(source_probe(url("ok/missing.jsonl"), &o), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "404"), "%s", mosft_error());
    ck_assert_int_eq(source_probe(url("ok/data.jsonl"), &o), MOSFT_OK);
    ck_assert_int_eq(source_probe(url("f/e503=1/t12/data.jsonl"), &o), MOSFT_OK);  // HEAD: no faults
}
END_TEST

START_TEST(test_http_gives_up) {
    source_http_opts o = fast_opts();
    o.max_retries = 2;
    byte_source *s;
    double t0 = mosft_now();
    int rc = source_open(&s, url("f/e503=100/t13/data.jsonl"), &o);
    ck_assert_int_ne(rc, MOSFT_OK);
    ck_assert_msg(strstr(mosft_error(), "503") && strstr(mosft_error(), "2 retries"), "%s", mosft_error());
    // Nothing listens on this port: connection refused, retried, then a clear error.
    int sock = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001), .sin_port = 0};
    socklen_t al = sizeof a;
    ck_assert_int_eq(bind(sock, (struct sockaddr *)&a, sizeof a), 0);
    getsockname(sock, (struct sockaddr *)&a, &al);
    close(sock);
    char u[128];
    snprintf(u, sizeof u, "http://127.0.0.1:%d/x.jsonl", ntohs(a.sin_port));
    rc = source_open(&s, u, &o);
    ck_assert_int_eq(rc, MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), u), "%s", mosft_error());
    ck_assert_msg(mosft_now() - t0 < 5, "giving up took too long");
    // A malformed URL fails at once.
    ck_assert_int_eq(source_open(&s, "http://", &o), MOSFT_ERR_INPUT);
}
END_TEST

// The binary: a 404 source fails before anything is trained or written, exit 2, one line.
START_TEST(test_http_cli_404) {
    REQUIRE_SHARED();
    char cmd[1024], *out;
    snprintf(cmd, sizeof cmd, "build/mosft data encode --tokenizer %s --format messages %s",
             shared_path("tokenizers/llama2/tokenizer.json"), url("ok/missing.jsonl"));
    ck_assert_int_eq(run_capture(cmd, &out), 2);
    ck_assert_msg(!strncmp(out, "error: ", 7) && strstr(out, "404") && strchr(out, '\n') == out + strlen(out) - 1, "%s", out);
    free(out);
    // And a good URL streams (gzip over HTTP, with a dropped connection on the way).
    snprintf(cmd, sizeof cmd, "(build/mosft data encode --tokenizer %s --format messages %s > /dev/null)",
             shared_path("tokenizers/llama2/tokenizer.json"), url("f/drop=1/t14/chat.jsonl.gz"));
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    ck_assert_msg(strstr(out, "encode: 5 examples written"), "%s", out);
    free(out);
}
END_TEST

static Suite *http_suite(void) {
    Suite *s = suite_create("http");
    TCase *tc = tcase_create("faults");
    tcase_add_unchecked_fixture(tc, server_start, server_stop);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_http_plain);
    tcase_add_test(tc, test_http_dropped_mid_body);
    tcase_add_test(tc, test_http_503_then_success);
    tcase_add_test(tc, test_http_429);
    tcase_add_test(tc, test_http_stall_past_timeout);
    tcase_add_test(tc, test_http_no_range_support);
    tcase_add_test(tc, test_http_chunked_torn);
    tcase_add_test(tc, test_http_gzip);
    tcase_add_test(tc, test_http_open_at_offset);
    tcase_add_test(tc, test_http_404);
    tcase_add_test(tc, test_http_gives_up);
    tcase_add_test(tc, test_http_cli_404);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(http_suite)
