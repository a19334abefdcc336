// test_config.c: config defaults, every validation error class, --set overrides, round trip, the
// shipped configs, and the CLI's handling of a bad config (exit code 2, one line).
#include <dirent.h>

#include "core/config.h"
#include "core/fileio.h"
#include "tests/test_util.h"

static char *g_dir;

static char *write_cfg(const char *name, const char *text) {
    char *p = path_join(g_dir, name);
    ck_assert_int_eq(atomic_write_file(p, text, strlen(text)), MOSFT_OK);
    return p;
}

// Loading `text` must fail with an input error whose message equals `want` after the file name.
static void expect_error(const char *text, const char *want) {
    char *p = write_cfg("bad.json", text);
    mosft_config c;
    config_defaults(&c);
    mosft_error_clear();
    int rc = config_load(&c, p);
    if (rc == MOSFT_OK) rc = config_validate(&c);
    ck_assert_msg(rc == MOSFT_ERR_INPUT, "config %s: expected an input error, got %d", text, rc);
    char full[1024];
    snprintf(full, sizeof full, "%s: %s", p, want);
    ck_assert_msg(!strcmp(mosft_error(), full), "message\n  \"%s\"\nexpected\n  \"%s\"", mosft_error(), full);
    config_free(&c);
    free(p);
}

static void expect_set_error(const char *assignment, const char *want) {
    mosft_config c;
    config_defaults(&c);
    mosft_error_clear();
    int rc = config_set(&c, assignment);
    ck_assert_msg(rc == MOSFT_ERR_INPUT, "--set %s: expected an input error", assignment);
    ck_assert_msg(strstr(mosft_error(), want) != NULL, "message \"%s\" lacks \"%s\"", mosft_error(), want);
    config_free(&c);
}

static void setup(void) { g_dir = xstrdup(test_tmpdir()); }
static void teardown(void) {
    rm_rf(g_dir);
    free(g_dir);
}

START_TEST(test_defaults_are_the_paper_recipe) {
    mosft_config c;
    config_defaults(&c);
    ck_assert_double_eq(c.adapter.alpha, 16);
    ck_assert_double_eq(c.adapter.dropout, 0.1);
    ck_assert_double_eq(c.train.lr, 2e-4);
    ck_assert_int_eq(c.train.batch_size, 16);
    ck_assert_int_eq(c.data.max_seq_len, 512);
    ck_assert_double_eq(c.train.max_grad_norm, 0.3);
    ck_assert_str_eq(c.train.schedule, "linear");
    ck_assert_double_eq(c.train.warmup_ratio, 0.03);
    ck_assert_double_eq(c.train.beta1, 0.9);
    ck_assert_double_eq(c.train.beta2, 0.999);
    ck_assert_double_eq(c.train.eps, 1e-8);
    ck_assert_double_eq(c.train.weight_decay, 0);
    ck_assert_int_eq(c.train.steps, 10000);
    ck_assert_int_eq(c.data.eval_examples, 1024);
    ck_assert_str_eq(c.model.quantization, "nf4");
    ck_assert_int_eq(c.model.double_quant, 1);
    ck_assert_str_eq(c.adapter.method, "mos");
    for (int m = 0; m < MOD_COUNT; m++) ck_assert_int_eq(c.adapter.targets[m], 1);
    ck_assert_str_eq(c.device, "auto");
    ck_assert_int_eq(c.data.n_sources, 0);
    ck_assert_int_eq(config_validate(&c), MOSFT_OK);
    config_free(&c);
}
END_TEST

START_TEST(test_load_valid) {
    char *p = write_cfg("ok.json",
                        "{\"model\": {\"path\": \"m\", \"quantization\": \"none\"},\n"
                        " \"adapter\": {\"method\": \"lora\", \"r\": 4, \"targets\": [\"q_proj\", \"v\"]},\n"
                        " \"data\": {\"sources\": [{\"path\": \"a.jsonl\", \"format\": \"flan_v2\", \"weight\": 2},\n"
                        "                        {\"path\": \"t/\", \"format\": \"superni\", \"n_few_shot\": 1}]},\n"
                        " \"train\": {\"lr\": 1e-3, \"steps\": 20, \"batch_size\": 8, \"micro_batch_size\": 2},\n"
                        " \"_comment\": \"keys starting with _ are comments\",\n"
                        " \"device\": \"cpu\"}\n");
    mosft_config c;
    config_defaults(&c);
    ck_assert_int_eq(config_load(&c, p), MOSFT_OK);
    ck_assert_int_eq(config_validate(&c), MOSFT_OK);
    ck_assert_str_eq(c.model.path, "m");
    ck_assert_str_eq(c.model.quantization, "none");
    ck_assert_str_eq(c.adapter.method, "lora");
    ck_assert_int_eq(c.adapter.r, 4);
    ck_assert_int_eq(c.adapter.targets[MOD_Q], 1);
    ck_assert_int_eq(c.adapter.targets[MOD_K], 0);
    ck_assert_int_eq(c.adapter.targets[MOD_V], 1);
    ck_assert_int_eq(c.data.n_sources, 2);
    ck_assert_double_eq(c.data.sources[0].weight, 2);
    ck_assert_str_eq(c.data.sources[1].format, "superni");
    ck_assert_int_eq(c.data.sources[1].n_few_shot, 1);
    ck_assert_int_eq(c.data.sources[1].zero_shot_per_task, 60);  // source defaults filled
    ck_assert_double_eq(c.train.lr, 1e-3);
    ck_assert_double_eq(c.adapter.alpha, 16);  // untouched keys keep defaults
    ck_assert_str_eq(c.device, "cpu");
    config_free(&c);
    free(p);
}
END_TEST

START_TEST(test_validation_errors) {
    // The exact example of the issue.
    expect_error("{\"train\": {\"lr\": \"fast\"}}", "train.lr: expected a number > 0, got \"fast\"");
    // Unknown keys, with a suggestion.
    expect_error("{\"train\": {\"lrr\": 1}}", "train.lrr: unknown key (did you mean \"train.lr\"?)");
    expect_error("{\"trian\": {}}", "trian: unknown key (did you mean \"train\"?)");
    expect_error("{\"adapter\": {\"rank\": 8}}", "adapter.rank: unknown key (did you mean \"adapter.r\"?)");
    expect_error("{\"data\": {\"sources\": [{\"path\": \"x\", \"format\": \"flan_v2\", \"wieght\": 1}]}}",
                 "data.sources[0].wieght: unknown key (did you mean \"weight\"?)");
    // Wrong types.
    expect_error("{\"train\": {\"steps\": 2.5}}", "train.steps: expected an integer >= 1, got 2.5");
    expect_error("{\"train\": {\"steps\": \"10\"}}", "train.steps: expected an integer >= 1, got \"10\"");
    expect_error("{\"model\": {\"path\": 3}}", "model.path: expected a string, got 3");
    expect_error("{\"model\": {\"double_quant\": \"yes\"}}", "model.double_quant: expected true or false, got \"yes\"");
    expect_error("{\"train\": 5}", "train: expected an object");
    expect_error("[1]", "expected a JSON object at the top level");
    // Out of range.
    expect_error("{\"train\": {\"steps\": 0}}", "train.steps: expected an integer >= 1, got 0");
    expect_error("{\"adapter\": {\"dropout\": 1}}", "adapter.dropout: expected a number in [0, 1), got 1");
    expect_error("{\"train\": {\"warmup_ratio\": -0.1}}", "train.warmup_ratio: expected a number in [0, 1], got -0.1");
    expect_error("{\"adapter\": {\"alpha\": 0}}", "adapter.alpha: expected a number > 0, got 0");
    // Enumerations.
    expect_error("{\"model\": {\"quantization\": \"int8\"}}",
                 "model.quantization: expected one of \"nf4\", \"none\", got \"int8\"");
    expect_error("{\"device\": \"tpu\"}", "device: expected one of \"auto\", \"cpu\", \"cuda\", got \"tpu\"");
    // Targets.
    expect_error("{\"adapter\": {\"targets\": [\"q\", \"lm_head\"]}}",
                 "adapter.targets: expected a list of q, k, v, o, gate, up, down (or \"all\"), got [\"q\",\"lm_head\"]");
    expect_error("{\"adapter\": {\"targets\": []}}",
                 "adapter.targets: expected a list of q, k, v, o, gate, up, down (or \"all\"), got []");
    // Sources.
    expect_error("{\"data\": {\"sources\": {\"path\": \"x\"}}}",
                 "data.sources: expected an array of {\"path\", \"format\"} objects");
    expect_error("{\"data\": {\"sources\": [{\"format\": \"flan_v2\"}]}}",
                 "data.sources[0].path: expected a file, directory or URL, got nothing");
    expect_error("{\"data\": {\"sources\": [{\"path\": \"x\"}]}}",
                 "data.sources[0].format: expected one of \"codealpaca\", \"superni\", \"flan_v2\", \"messages\", "
                 "\"prompt_completion\", got nothing");
    expect_error("{\"data\": {\"sources\": [{\"path\": \"x\", \"format\": \"alpaca\"}]}}",
                 "data.sources[0].format: expected one of \"codealpaca\", \"superni\", \"flan_v2\", \"messages\", "
                 "\"prompt_completion\", got \"alpaca\"");
    // Cross-field checks.
    expect_error("{\"train\": {\"batch_size\": 10, \"micro_batch_size\": 4}}",
                 "train.batch_size: expected a multiple of train.micro_batch_size (4), got 10");
    expect_error("{\"adapter\": {\"tied_lora_trainable\": \"vBx\"}}",
                 "adapter.tied_lora_trainable: expected letters of \"vBuA\", got \"vBx\"");
}
END_TEST

START_TEST(test_bad_json_position) {
    char *p = write_cfg("syntax.json", "{\n  \"train\": {\n    \"lr\": 1e-4,\n  }\n}\n");
    mosft_config c;
    config_defaults(&c);
    ck_assert_int_eq(config_load(&c, p), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "line 4") != NULL, "%s", mosft_error());
    ck_assert_msg(strstr(mosft_error(), "expected valid JSON") != NULL, "%s", mosft_error());
    config_free(&c);
    free(p);
    config_defaults(&c);
    ck_assert_int_eq(config_load(&c, "/nonexistent/config.json"), MOSFT_ERR_INPUT);
    ck_assert_ptr_nonnull(strstr(mosft_error(), "/nonexistent/config.json"));
    config_free(&c);
}
END_TEST

START_TEST(test_set_overrides) {
    mosft_config c;
    config_defaults(&c);
    ck_assert_int_eq(config_set(&c, "train.lr=1e-4"), MOSFT_OK);
    ck_assert_double_eq(c.train.lr, 1e-4);
    ck_assert_int_eq(config_set(&c, "model.path=/models/Llama-2-7b-hf"), MOSFT_OK);  // bare string
    ck_assert_str_eq(c.model.path, "/models/Llama-2-7b-hf");
    ck_assert_int_eq(config_set(&c, "adapter.targets=q,v"), MOSFT_OK);
    ck_assert_int_eq(c.adapter.targets[MOD_Q] + c.adapter.targets[MOD_V], 2);
    ck_assert_int_eq(c.adapter.targets[MOD_K] + c.adapter.targets[MOD_DOWN], 0);
    ck_assert_int_eq(config_set(&c, "adapter.targets=all"), MOSFT_OK);
    ck_assert_int_eq(c.adapter.targets[MOD_K], 1);
    ck_assert_int_eq(config_set(&c, "adapter.targets=[\"up\"]"), MOSFT_OK);
    ck_assert_int_eq(c.adapter.targets[MOD_UP] + c.adapter.targets[MOD_Q], 1);
    ck_assert_int_eq(config_set(&c, "model.double_quant=false"), MOSFT_OK);
    ck_assert_int_eq(c.model.double_quant, 0);
    ck_assert_int_eq(config_set(&c, "device=cpu"), MOSFT_OK);
    ck_assert_str_eq(c.device, "cpu");
    // Sources: append by index, then edit.
    ck_assert_int_eq(config_set(&c, "data.sources[0].path=a.json"), MOSFT_OK);
    ck_assert_int_eq(config_set(&c, "data.sources[0].format=codealpaca"), MOSFT_OK);
    ck_assert_int_eq(config_set(&c, "data.sources.0.weight=3"), MOSFT_OK);
    ck_assert_int_eq(c.data.n_sources, 1);
    ck_assert_str_eq(c.data.sources[0].format, "codealpaca");
    ck_assert_double_eq(c.data.sources[0].weight, 3);
    ck_assert_int_eq(config_set(&c, "data.sources=[{\"path\":\"b\",\"format\":\"messages\"}]"), MOSFT_OK);
    ck_assert_str_eq(c.data.sources[0].path, "b");
    config_free(&c);
    // Errors through --set name the key.
    expect_set_error("train.lr=fast", "--set: train.lr: expected a number > 0, got \"fast\"");
    expect_set_error("train.lrr=1", "train.lrr: unknown key (did you mean \"train.lr\"?)");
    expect_set_error("train.lr", "expected key=value");
    expect_set_error("data.sources[5].path=x", "index 5 is out of range");
    expect_set_error("data.sources[0].colour=x", "unknown key");
}
END_TEST

START_TEST(test_round_trip_json) {
    mosft_config c, d;
    config_defaults(&c);
    config_set(&c, "train.lr=0.00123");
    config_set(&c, "adapter.targets=q,k");
    config_set(&c, "data.sources[0].path=x.jsonl");
    config_set(&c, "data.sources[0].format=messages");
    config_set(&c, "adapter.seed=12345678901");
    char *j1 = config_to_json(&c);
    char *p = write_cfg("resolved.json", j1);
    config_defaults(&d);
    ck_assert_int_eq(config_load(&d, p), MOSFT_OK);
    char *j2 = config_to_json(&d);
    ck_assert_str_eq(j1, j2);
    ck_assert_int_eq(d.adapter.seed, 12345678901ull);
    char *table = config_table(&d);
    ck_assert_ptr_nonnull(strstr(table, "train.lr"));
    ck_assert_ptr_nonnull(strstr(table, "x.jsonl"));
    char *doc = config_doc_markdown();
    ck_assert_ptr_nonnull(strstr(doc, "`train.max_grad_norm`"));
    free(doc);
    free(table);
    free(j1);
    free(j2);
    free(p);
    config_free(&c);
    config_free(&d);
}
END_TEST

START_TEST(test_shipped_configs_load) {
    DIR *d = opendir("configs");
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l < 6 || strcmp(e->d_name + l - 5, ".json")) continue;
        char *p = path_join("configs", e->d_name);
        mosft_config c;
        config_defaults(&c);
        int rc = config_load(&c, p);
        if (rc == MOSFT_OK) rc = config_validate(&c);
        ck_assert_msg(rc == MOSFT_OK, "%s: %s", p, mosft_error());
        ck_assert_msg(c.data.n_sources >= 1, "%s has no data source", p);
        ck_assert_msg(c.model.path[0], "%s has no model.path", p);
        config_free(&c);
        free(p);
        n++;
    }
    closedir(d);
    ck_assert_int_ge(n, 10);  // demo + 4 datasets x 2 Llama 2 sizes + Llama 3.2 3B
}
END_TEST

START_TEST(test_cli_bad_config_exit_code) {
    char *p = write_cfg("cli.json", "{\"train\": {\"lr\": \"fast\"}}");
    char cmd[1024], *out = NULL;
    snprintf(cmd, sizeof cmd, "./build/mosft info %s", p);
    int rc = run_capture(cmd, &out);
    ck_assert_int_eq(rc, 2);
    char want[1024];
    snprintf(want, sizeof want, "error: %s: train.lr: expected a number > 0, got \"fast\"\n", p);
    ck_assert_str_eq(out, want);
    free(out);
    snprintf(cmd, sizeof cmd, "./build/mosft info configs/demo.json --set train.lrr=1");
    rc = run_capture(cmd, &out);
    ck_assert_int_eq(rc, 2);
    ck_assert_msg(strstr(out, "did you mean \"train.lr\"") != NULL, "%s", out);
    free(out);
    rc = run_capture("./build/mosft frobnicate", &out);
    ck_assert_int_eq(rc, 2);
    free(out);
    rc = run_capture("./build/mosft help config", &out);
    ck_assert_int_eq(rc, 0);
    ck_assert_ptr_nonnull(strstr(out, "adapter.equiv_rank"));
    free(out);
    free(p);
}
END_TEST

static Suite *config_suite(void) {
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_defaults_are_the_paper_recipe);
    tcase_add_test(tc, test_load_valid);
    tcase_add_test(tc, test_validation_errors);
    tcase_add_test(tc, test_bad_json_position);
    tcase_add_test(tc, test_set_overrides);
    tcase_add_test(tc, test_round_trip_json);
    tcase_add_test(tc, test_shipped_configs_load);
    tcase_add_test(tc, test_cli_bad_config_exit_code);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(config_suite)
