// test_source.c: local byte sources (plain, gzip single/multi-member, seeks), shard listing, and the
// JSON record readers (JSONL, streamed arrays, whole files) on the real shards of ../shared/data.
#include <zlib.h>

#include "core/fileio.h"
#include "data/records.h"
#include "data/source.h"
#include "test_util.h"

static char *read_source_all(const char *path, uint64_t offset, size_t *len, int *rc_out) {
    byte_source *s;
    int rc = source_open_at(&s, path, offset, NULL);
    *rc_out = rc;
    if (rc != MOSFT_OK) return NULL;
    mosft_buf b = {0};
    char tmp[7919];  // odd size: reads straddle inflate and buffer boundaries
    int64_t n;
    while ((n = source_read(s, tmp, sizeof tmp)) > 0) buf_append(&b, tmp, (size_t)n);
    if (n < 0) *rc_out = mosft_error_code();
    ck_assert_uint_eq(source_tell(s), offset + b.len);
    source_close(s);
    *len = b.len;
    return b.data ? b.data : xcalloc(1, 1);
}

static void check_same_bytes(const char *plain, const char *other, uint64_t offset) {
    char *a;
    size_t na;
    ck_assert_int_eq(file_read_all(plain, &a, &na), MOSFT_OK);
    size_t nb;
    int rc;
    char *b = read_source_all(other, offset, &nb, &rc);
    ck_assert_msg(rc == MOSFT_OK, "%s: %s", other, mosft_error());
    ck_assert_uint_eq(nb, na - offset);
    ck_assert_msg(!memcmp(a + offset, b, nb), "%s differs from %s", other, plain);
    free(a);
    free(b);
}

START_TEST(test_gzip_equals_plain) {
    REQUIRE_SHARED();
    static const char *const k_pairs[] = {"datasets/codealpaca/code_alpaca_2k.json",
                                          "datasets/superni/tasks/task1344_glue_entailment_classification.json",
                                          "datasets/flan_v2/cot_data/strategyqa_train.tsv"};
    for (int i = 0; i < 3; i++) {
        char gz[512];
        snprintf(gz, sizeof gz, "%s.gz", shared_path(k_pairs[i]));
        check_same_bytes(shared_path(k_pairs[i]), shared_path(k_pairs[i]), 0);
        check_same_bytes(shared_path(k_pairs[i]), gz, 0);
        check_same_bytes(shared_path(k_pairs[i]), gz, 1000);                       // seek by inflating
        check_same_bytes(shared_path(k_pairs[i]), shared_path(k_pairs[i]), 1000);  // seek by lseek
    }
    // The strategyqa TSV has 2,061 lines (SOURCE.md), through gzip too.
    char gz[512];
    snprintf(gz, sizeof gz, "%s.gz", shared_path("datasets/flan_v2/cot_data/strategyqa_train.tsv"));
    size_t n;
    int rc;
    char *b = read_source_all(gz, 0, &n, &rc);
    int lines = 0;
    for (size_t i = 0; i < n; i++) lines += b[i] == '\n';
    ck_assert_int_eq(lines, 2061);
    free(b);
}
END_TEST

static void write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(data, 1, n, f), n);
    fclose(f);
}

START_TEST(test_gzip_multi_member_and_damage) {
    char *dir = test_tmpdir();
    char gz[512], plain[512];
    snprintf(gz, sizeof gz, "%s/m.jsonl.gz", dir);
    snprintf(plain, sizeof plain, "%s/m.jsonl", dir);
    FILE *p = fopen(plain, "wb");
    for (int part = 0; part < 3; part++) {  // three members, as `cat a.gz b.gz c.gz`
        gzFile g = gzopen(gz, part ? "ab" : "wb");
        for (int i = 0; i < 5000; i++) {
            gzprintf(g, "{\"part\": %d, \"i\": %d}\n", part, i);
            fprintf(p, "{\"part\": %d, \"i\": %d}\n", part, i);
        }
        gzclose(g);
    }
    fclose(p);
    check_same_bytes(plain, gz, 0);
    check_same_bytes(plain, gz, 70000);  // inside the second member
    // Zero padding after the last member is tolerated (tape-style padding).
    FILE *f = fopen(gz, "ab");
    fwrite("\0\0\0\0", 1, 4, f);
    fclose(f);
    check_same_bytes(plain, gz, 0);
    // A truncated file is an error naming it, not a short read.
    char *all;
    size_t n, gz_len;
    ck_assert_int_eq(file_read_all(gz, &all, &gz_len), MOSFT_OK);
    n = gz_len;
    char cut[512];
    snprintf(cut, sizeof cut, "%s/cut.jsonl.gz", dir);
    write_file(cut, all, gz_len / 2);
    int rc;
    free(read_source_all(cut, 0, &n, &rc));
    ck_assert_int_eq(rc, MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "cut.jsonl.gz") && strstr(mosft_error(), "truncated"), "%s", mosft_error());
    // Corrupt bytes in the middle.
    char bad[512];
    snprintf(bad, sizeof bad, "%s/bad.jsonl.gz", dir);
    for (size_t i = 2000; i < 2100; i++) all[i] ^= 0x5a;
    write_file(bad, all, gz_len);
    free(read_source_all(bad, 0, &n, &rc));
    ck_assert_int_eq(rc, MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "bad.jsonl.gz"), "%s", mosft_error());
    // A .gz name on plain bytes.
    char fake[512];
    snprintf(fake, sizeof fake, "%s/fake.jsonl.gz", dir);
    write_file(fake, "{\"a\": 1}\n", 9);
    byte_source *s;
    ck_assert_int_eq(source_open(&s, fake, NULL), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "expected gzip data"), "%s", mosft_error());
    free(all);
}
END_TEST

START_TEST(test_missing_and_shards) {
    REQUIRE_SHARED();
    byte_source *s;
    ck_assert_int_eq(source_open(&s, "/nonexistent/x.jsonl", NULL), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "/nonexistent/x.jsonl"), "%s", mosft_error());
    ck_assert_ptr_null(strchr(mosft_error(), '\n'));
    ck_assert_int_eq(source_probe("/nonexistent/x.jsonl", NULL), MOSFT_ERR_INPUT);
    ck_assert_int_eq(source_probe(shared_path("datasets/superni/tasks"), NULL), MOSFT_ERR_INPUT);  // a directory
    char **v;
    int n;
    ck_assert_int_eq(source_list_shards(shared_path("datasets/superni/tasks"), &v, &n), MOSFT_OK);
    ck_assert_int_eq(n, 4);  // three task files and one .gz copy, sorted
    ck_assert_msg(strstr(v[0], "task1146_country_capital.json"), "%s", v[0]);
    ck_assert_msg(strstr(v[3], "task1344_glue_entailment_classification.json.gz"), "%s", v[3]);
    source_free_shards(v, n);
    char pat[512];
    snprintf(pat, sizeof pat, "%s/*.tsv", shared_path("datasets/flan_v2/cot_data"));
    ck_assert_int_eq(source_list_shards(pat, &v, &n), MOSFT_OK);
    ck_assert_int_eq(n, 7);
    ck_assert_msg(strstr(v[0], "aqua_train.tsv") && strstr(v[6], "strategyqa_train.tsv"), "%s %s", v[0], v[6]);
    source_free_shards(v, n);
    snprintf(pat, sizeof pat, "%s/*.nothing", shared_path("datasets/flan_v2/cot_data"));
    ck_assert_int_eq(source_list_shards(pat, &v, &n), MOSFT_ERR_INPUT);
    ck_assert_int_eq(source_list_shards("/nonexistent/dir", &v, &n), MOSFT_ERR_INPUT);
    ck_assert_int_eq(source_list_shards("http://example.invalid/a.jsonl", &v, &n), MOSFT_OK);
    ck_assert_int_eq(n, 1);
    source_free_shards(v, n);
}
END_TEST

// Count the CodeAlpaca records and their empty fields (SOURCE.md: 2,017 records, 1,011 empty
// inputs, 2 empty outputs), streamed element by element.
static void check_codealpaca(const char *path) {
    record_reader *r;
    ck_assert_int_eq(record_reader_open(&r, path, REC_AUTO, NULL, NULL), MOSFT_OK);
    int n = 0, empty_in = 0, empty_out = 0;
    int64_t first_line = 0, last_line = 0;
    for (;;) {
        cJSON *j;
        int64_t line;
        int rc = record_next(r, &j, &line);
        ck_assert_msg(rc == MOSFT_OK, "%s", mosft_error());
        if (!j) break;
        ck_assert(cJSON_IsString(cJSON_GetObjectItem(j, "instruction")));
        empty_in += !strcmp(cJSON_GetObjectItem(j, "input")->valuestring, "");
        empty_out += !strcmp(cJSON_GetObjectItem(j, "output")->valuestring, "");
        if (!n) first_line = line;
        last_line = line;
        n++;
        cJSON_Delete(j);
    }
    ck_assert_int_eq(n, 2017);
    ck_assert_int_eq(empty_in, 1011);
    ck_assert_int_eq(empty_out, 2);
    ck_assert_int_eq(first_line, 2);  // "[" is line 1, the first "{" line 2
    ck_assert_int_eq(last_line, 2 + 5 * 2016);  // 5 lines per pretty-printed element
    record_reader_close(r);
}

START_TEST(test_codealpaca_array) {
    REQUIRE_SHARED();
    check_codealpaca(shared_path("datasets/codealpaca/code_alpaca_2k.json"));
    check_codealpaca(shared_path("datasets/codealpaca/code_alpaca_2k.json.gz"));
}
END_TEST

START_TEST(test_superni_whole) {
    REQUIRE_SHARED();
    static const char *const k_files[] = {"task1146_country_capital.json", "task1159_bard_analogical_reasoning_containers.json",
                                          "task1344_glue_entailment_classification.json",
                                          "task1344_glue_entailment_classification.json.gz"};
    static const int k_inst[] = {10, 10, 6, 6}, k_pos[] = {2, 3, 4, 4};
    for (int i = 0; i < 4; i++) {
        char rel[256];
        snprintf(rel, sizeof rel, "datasets/superni/tasks/%s", k_files[i]);
        record_reader *r;
        ck_assert_int_eq(record_reader_open(&r, shared_path(rel), REC_WHOLE, NULL, NULL), MOSFT_OK);
        cJSON *j;
        int64_t line;
        ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
        ck_assert_ptr_nonnull(j);
        ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(j, "Instances")), k_inst[i]);
        ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(j, "Positive Examples")), k_pos[i]);
        ck_assert(cJSON_IsArray(cJSON_GetObjectItem(j, "Definition")));
        cJSON_Delete(j);
        ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
        ck_assert_ptr_null(j);
        record_reader_close(r);
    }
}
END_TEST

// Read records [k, end) of `path` after restoring the position saved at record k, and compare each
// with a straight read.
static void check_resume(const char *path, record_mode mode, int k) {
    record_reader *a, *b;
    ck_assert_int_eq(record_reader_open(&a, path, mode, NULL, NULL), MOSFT_OK);
    cJSON *j;
    int64_t line;
    for (int i = 0; i < k; i++) {
        ck_assert_int_eq(record_next(a, &j, &line), MOSFT_OK);
        ck_assert_ptr_nonnull(j);
        cJSON_Delete(j);
    }
    record_pos pos;
    record_tell(a, &pos);
    ck_assert_int_eq(record_reader_open(&b, path, mode, &pos, NULL), MOSFT_OK);
    int n = 0;
    for (;;) {
        cJSON *x, *y;
        int64_t lx, ly;
        ck_assert_int_eq(record_next(a, &x, &lx), MOSFT_OK);
        ck_assert_int_eq(record_next(b, &y, &ly), MOSFT_OK);
        ck_assert((x == NULL) == (y == NULL));
        if (!x) break;
        ck_assert_int_eq(lx, ly);
        ck_assert(cJSON_Compare(x, y, 1));
        cJSON_Delete(x);
        cJSON_Delete(y);
        n++;
    }
    ck_assert_int_gt(n, 0);
    record_reader_close(a);
    record_reader_close(b);
}

START_TEST(test_record_resume) {
    REQUIRE_SHARED();
    check_resume(shared_path("datasets/codealpaca/code_alpaca_2k.json"), REC_AUTO, 1000);
    check_resume(shared_path("datasets/codealpaca/code_alpaca_2k.json.gz"), REC_AUTO, 1234);
    check_resume("tests/fixtures/data/flan_v2_cot.jsonl", REC_AUTO, 40);
}
END_TEST

START_TEST(test_jsonl_bad_lines) {
    char *dir = test_tmpdir();
    char path[512];
    snprintf(path, sizeof path, "%s/bad.jsonl", dir);
    const char *text = "\xEF\xBB\xBF{\"a\": 1}\r\n"
                       "\n"
                       "{\"a\": 2, oops}\n"
                       "   \n"
                       "{\"a\": 3}\n"
                       "[1, 2]\n"
                       "{\"a\": 4}";  // no final newline
    write_file(path, text, strlen(text));
    record_reader *r;
    ck_assert_int_eq(record_reader_open(&r, path, REC_AUTO, NULL, NULL), MOSFT_OK);
    cJSON *j;
    int64_t line;
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
    ck_assert_int_eq(cJSON_GetObjectItem(j, "a")->valueint, 1);
    ck_assert_int_eq(line, 1);
    cJSON_Delete(j);
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_ERR_INPUT);
    char want[600];
    snprintf(want, sizeof want, "%s:3: expected one JSON value per line, got invalid JSON at column", path);
    ck_assert_msg(strstr(mosft_error(), want), "%s", mosft_error());
    ck_assert(record_reader_can_continue(r));
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
    ck_assert_int_eq(cJSON_GetObjectItem(j, "a")->valueint, 3);
    ck_assert_int_eq(line, 5);
    cJSON_Delete(j);
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);  // an array is valid JSON: the format judges it
    ck_assert(cJSON_IsArray(j));
    cJSON_Delete(j);
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
    ck_assert_int_eq(cJSON_GetObjectItem(j, "a")->valueint, 4);
    ck_assert_int_eq(line, 7);
    cJSON_Delete(j);
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
    ck_assert_ptr_null(j);
    record_reader_close(r);
}
END_TEST

START_TEST(test_array_errors) {
    char *dir = test_tmpdir();
    char path[512];
    snprintf(path, sizeof path, "%s/a.json", dir);
    // Element 2 is malformed but well nested: skipped; strings hold brackets and escaped quotes.
    const char *text = "[\n {\"s\": \"a ] } \\\" [\"},\n {\"bad\": tru},\n {\"s\": \"x\"},\n 7, \"str\", null\n]\n";
    write_file(path, text, strlen(text));
    record_reader *r;
    ck_assert_int_eq(record_reader_open(&r, path, REC_AUTO, NULL, NULL), MOSFT_OK);
    cJSON *j;
    int64_t line;
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
    ck_assert_str_eq(cJSON_GetObjectItem(j, "s")->valuestring, "a ] } \" [");
    cJSON_Delete(j);
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "a.json:3: expected a JSON array element"), "%s", mosft_error());
    ck_assert(record_reader_can_continue(r));
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
    ck_assert_str_eq(cJSON_GetObjectItem(j, "s")->valuestring, "x");
    ck_assert_int_eq(line, 4);
    cJSON_Delete(j);
    for (int k = 0; k < 3; k++) {
        ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
        ck_assert_ptr_nonnull(j);
        ck_assert_int_eq(line, 5);
        cJSON_Delete(j);
    }
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
    ck_assert_ptr_null(j);
    record_reader_close(r);
    // An array that never closes: a layout error, no continuing.
    write_file(path, "[{\"a\": 1}, {\"a\": 2", 18);
    ck_assert_int_eq(record_reader_open(&r, path, REC_AUTO, NULL, NULL), MOSFT_OK);
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
    cJSON_Delete(j);
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "the end of the file"), "%s", mosft_error());
    ck_assert(!record_reader_can_continue(r));
    record_reader_close(r);
    // Bytes after the closing bracket.
    write_file(path, "[1]\n[2]\n", 8);
    ck_assert_int_eq(record_reader_open(&r, path, REC_AUTO, NULL, NULL), MOSFT_OK);
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
    cJSON_Delete(j);
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "a.json:2: expected nothing after the closing ']'"), "%s", mosft_error());
    record_reader_close(r);
    // A malformed whole document names the line of the error.
    write_file(path, "{\n  \"a\": 1,\n  \"b\": ]\n}\n", 23);
    ck_assert_int_eq(record_reader_open(&r, path, REC_WHOLE, NULL, NULL), MOSFT_OK);
    ck_assert_int_eq(record_next(r, &j, &line), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "a.json:1: expected one JSON document, got invalid JSON at line 3"), "%s",
                  mosft_error());
    record_reader_close(r);
}
END_TEST

static Suite *source_suite(void) {
    Suite *s = suite_create("source");
    TCase *tc = tcase_create("local");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_gzip_equals_plain);
    tcase_add_test(tc, test_gzip_multi_member_and_damage);
    tcase_add_test(tc, test_missing_and_shards);
    tcase_add_test(tc, test_codealpaca_array);
    tcase_add_test(tc, test_superni_whole);
    tcase_add_test(tc, test_record_resume);
    tcase_add_test(tc, test_jsonl_bad_lines);
    tcase_add_test(tc, test_array_errors);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(source_suite)
