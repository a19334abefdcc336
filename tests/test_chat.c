// test_chat.c: the chat encoding against ../shared/data/tokenizers/{llama2,llama3}/chat_vectors.jsonl
// (input_ids and labels made by open-instruct's encode_with_messages_format with HF tokenizers), in
// the library and through `mosft data encode`; truncation; prompt/completion masks; and the CLI's
// `mosft data` output and error lines.
#include "core/fileio.h"
#include "data/chat.h"
#include "data/formats.h"
#include "data/records.h"
#include "test_util.h"

#define MOSFT_BIN "build/mosft"

typedef struct {
    cJSON *v[8];
    int n;
} vectors;

static vectors load_vectors(const char *tok) {
    char rel[128];
    snprintf(rel, sizeof rel, "tokenizers/%s/chat_vectors.jsonl", tok);
    vectors vs = {{0}, 0};
    record_reader *r;
    ck_assert_int_eq(record_reader_open(&r, shared_path(rel), REC_JSONL, NULL, NULL), MOSFT_OK);
    for (;;) {
        cJSON *j;
        int64_t line;
        ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
        if (!j) break;
        vs.v[vs.n++] = j;
    }
    record_reader_close(r);
    ck_assert_int_eq(vs.n, 5);
    return vs;
}

static void free_vectors(vectors *vs) {
    for (int i = 0; i < vs->n; i++) cJSON_Delete(vs->v[i]);
}

static int json_ints(const cJSON *a, int32_t *out, int cap) {
    int n = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, a) {
        ck_assert_int_lt(n, cap);
        out[n++] = (int32_t)e->valueint;
    }
    return n;
}

// Encode every vector with max_seq_len `max` and compare with the vector cut to `max` tokens.
static void check_vectors(const char *name, int max) {
    REQUIRE_SHARED();
    char rel[128];
    snprintf(rel, sizeof rel, "tokenizers/%s/tokenizer.json", name);
    tokenizer *tok;
    ck_assert_msg(tokenizer_load(&tok, shared_path(rel)) == MOSFT_OK, "%s", mosft_error());
    vectors vs = load_vectors(name);
    for (int i = 0; i < vs.n; i++) {
        const cJSON *v = vs.v[i];
        chat_encoder enc;
        chat_encoder_init(&enc, tok, cJSON_GetObjectItem(v, "eos_text")->valuestring, max);
        chat_example ex = {0};
        data_rng r = {0, 0};
        ck_assert_int_eq(format_record(FMT_MESSAGES, v, &r, &ex), MOSFT_OK);
        chat_tokens t = {0};
        ck_assert_int_eq(chat_encode(&enc, &ex, &t), MOSFT_OK);
        static int32_t ids[4096], labels[4096];
        int n = json_ints(cJSON_GetObjectItem(v, "input_ids"), ids, 4096);
        ck_assert_int_eq(json_ints(cJSON_GetObjectItem(v, "labels"), labels, 4096), n);
        int want = n < max ? n : max;
        ck_assert_msg(t.n == want, "%s vector %d: %d tokens, expected %d", name, i, t.n, want);
        ck_assert_int_eq(t.truncated, n > max);
        for (int k = 0; k < want; k++) {
            ck_assert_msg(t.ids[k] == ids[k], "%s vector %d: input_ids[%d] = %d, expected %d", name, i, k, t.ids[k], ids[k]);
            ck_assert_msg(t.labels[k] == labels[k], "%s vector %d: labels[%d] = %d, expected %d", name, i, k, t.labels[k],
                          labels[k]);
        }
        chat_tokens_free(&t);
        chat_example_free(&ex);
        chat_encoder_free(&enc);
    }
    free_vectors(&vs);
    tokenizer_free(tok);
}

START_TEST(test_vectors_llama2) { check_vectors("llama2", 2048); }
END_TEST
START_TEST(test_vectors_llama3) { check_vectors("llama3", 2048); }
END_TEST
// Truncation keeps the left part: the labels are the full labels cut at max_seq_len (the mask loop
// clips every boundary the same way), including a cut inside the first answer of the multi-turn.
START_TEST(test_vectors_truncated) {
    check_vectors("llama2", 40);
    check_vectors("llama3", 40);
    check_vectors("llama3", 56);
}
END_TEST

// The same through the binary: `mosft data encode --format messages chat_vectors.jsonl`, with the
// EOS text from tokenizer_config.json beside tokenizer.json (DATA.md section 0).
static void check_cli_vectors(const char *name) {
    REQUIRE_SHARED();
    char cmd[1024], rel[128], *out;
    snprintf(rel, sizeof rel, "tokenizers/%s/chat_vectors.jsonl", name);
    char vec_path[512];
    snprintf(vec_path, sizeof vec_path, "%s", shared_path(rel));
    snprintf(rel, sizeof rel, "tokenizers/%s/tokenizer.json", name);
    snprintf(cmd, sizeof cmd, "(" MOSFT_BIN " data encode --tokenizer %s --format messages %s 2>/dev/null)", shared_path(rel),
             vec_path);
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    vectors vs = load_vectors(name);
    char *line = out;
    for (int i = 0; i < vs.n; i++) {
        char *nl = strchr(line, '\n');
        ck_assert_ptr_nonnull(nl);
        *nl = 0;
        cJSON *got = cJSON_Parse(line);
        ck_assert_msg(got, "not JSON: %s", line);
        ck_assert(cJSON_Compare(cJSON_GetObjectItem(got, "input_ids"), cJSON_GetObjectItem(vs.v[i], "input_ids"), 1));
        ck_assert(cJSON_Compare(cJSON_GetObjectItem(got, "labels"), cJSON_GetObjectItem(vs.v[i], "labels"), 1));
        cJSON_Delete(got);
        line = nl + 1;
    }
    ck_assert_str_eq(line, "");
    free_vectors(&vs);
    free(out);
}

START_TEST(test_cli_encode_vectors) {
    check_cli_vectors("llama2");
    check_cli_vectors("llama3");
}
END_TEST

// prompt_completion: the prompt's tokens (with BOS) are masked, the completion and EOS trained.
START_TEST(test_prompt_completion_mask) {
    REQUIRE_SHARED();
    tokenizer *tok;
    ck_assert_int_eq(tokenizer_load(&tok, shared_path("tokenizers/llama2/tokenizer.json")), MOSFT_OK);
    chat_encoder enc;
    chat_encoder_init(&enc, tok, "</s>", 64);
    chat_example ex = {0};
    chat_example_add(&ex, ROLE_USER, "Question: 2+2?", 14);
    chat_example_add(&ex, ROLE_ASSISTANT, "4", 1);
    ex.prompt_completion = 1;
    chat_tokens t = {0};
    chat_encode(&enc, &ex, &t);
    tok_ids p = {0}, full = {0};
    tokenizer_encode(tok, "Question: 2+2?", 14, 1, &p);
    tokenizer_encode(tok, "Question: 2+2? 4</s>", 20, 1, &full);
    ck_assert_int_eq(t.n, (int)full.n);
    for (int i = 0; i < t.n; i++) {
        ck_assert_int_eq(t.ids[i], full.ids[i]);
        ck_assert_int_eq(t.labels[i], i < (int)p.n ? -100 : full.ids[i]);
    }
    ck_assert_int_eq(t.ids[t.n - 1], 2);  // "</s>" is the EOS token
    ck_assert_int_eq(t.n_supervised, t.n - (int)p.n);
    tok_ids_free(&p);
    tok_ids_free(&full);
    chat_tokens_free(&t);
    chat_example_free(&ex);
    chat_encoder_free(&enc);
    tokenizer_free(tok);
}
END_TEST

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

START_TEST(test_cli_show_and_errors) {
    REQUIRE_SHARED();
    char *dir = test_tmpdir(), cfg[512], cmd[2048], *out;
    snprintf(cfg, sizeof cfg, "%s/cfg.json", dir);
    snprintf(cmd, sizeof cmd,
             "{\"tokenizer\": {\"path\": \"%s\"}, \"data\": {\"max_seq_len\": 256, \"sources\": ["
             "{\"path\": \"%s\", \"format\": \"codealpaca\", \"max_records\": 50},"
             "{\"path\": \"tests/fixtures/data/flan_v2_cot.jsonl\", \"format\": \"flan_v2\"}]}}",
             shared_path("tokenizers/llama2/tokenizer.json"), shared_path("datasets/codealpaca/code_alpaca_2k.json.gz"));
    write_text(cfg, cmd);
    snprintf(cmd, sizeof cmd, MOSFT_BIN " data %s --show 2", cfg);
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    // The mask, visible: BOS, tags and prompt inside [[...]], the answer outside.
    ck_assert_msg(strstr(out, "[[<s>") && strstr(out, "<|user|>\nWhat are the distinct values") &&
                      strstr(out, "<|assistant|>\n]]The distinct values from the given list are 3, 5, 7 and 9.</s>\n"),
                  "%s", out);
    ck_assert_msg(strstr(out, "records            141") && strstr(out, "tokens/example     mean") &&
                      strstr(out, "supervised         ") && strstr(out, "truncated          "), "%s", out);
    free(out);
    // A missing source file: exit 2, one line naming it.
    snprintf(cmd, sizeof cmd, MOSFT_BIN " data %s --set data.sources[1].path=/nonexistent/x.jsonl", cfg);
    ck_assert_int_eq(run_capture(cmd, &out), 2);
    ck_assert_msg(!strncmp(out, "error: ", 7) && strstr(out, "/nonexistent/x.jsonl") && strchr(out, '\n') == out + strlen(out) - 1,
                  "%s", out);
    free(out);
    // A bad record with on_bad_record = fail: exit 2, "error: file:line: reason".
    char bad[512];
    snprintf(bad, sizeof bad, "%s/bad.jsonl", dir);
    write_text(bad, "{\"inputs\": \"a\", \"targets\": \"b\"}\n{\"inputs\": \"a\"}\n");
    snprintf(cmd, sizeof cmd, MOSFT_BIN " data %s --set data.sources[1].path=%s --set data.on_bad_record=fail --show 0",
             cfg, bad);
    ck_assert_int_eq(run_capture(cmd, &out), 2);
    char want[700];
    snprintf(want, sizeof want, "error: %s:2: \"targets\": expected a string, got nothing (missing)\n", bad);
    ck_assert_str_eq(out, want);
    free(out);
    // skip (the default): counted and shown.
    snprintf(cmd, sizeof cmd, MOSFT_BIN " data %s --set data.sources[1].path=%s --show 0", cfg, bad);
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    ck_assert_msg(strstr(out, "bad records        1 skipped") && strstr(out, want + 7), "%s", out);
    free(out);
    // encode: usage errors and a missing file.
    ck_assert_int_eq(run_capture(MOSFT_BIN " data encode --format messages x.jsonl", &out), 2);
    ck_assert_msg(strstr(out, "--tokenizer"), "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, MOSFT_BIN " data encode --tokenizer %s --format messages /nonexistent/y.jsonl",
             shared_path("tokenizers/llama2/tokenizer.json"));
    ck_assert_int_eq(run_capture(cmd, &out), 2);
    ck_assert_msg(!strncmp(out, "error: /nonexistent/y.jsonl: ", 29), "%s", out);
    free(out);
}
END_TEST

static Suite *chat_suite(void) {
    Suite *s = suite_create("chat");
    TCase *tc = tcase_create("vectors");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_vectors_llama2);
    tcase_add_test(tc, test_vectors_llama3);
    tcase_add_test(tc, test_vectors_truncated);
    tcase_add_test(tc, test_cli_encode_vectors);
    tcase_add_test(tc, test_prompt_completion_mask);
    tcase_add_test(tc, test_cli_show_and_errors);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(chat_suite)
