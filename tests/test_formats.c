// test_formats.c: records -> chat examples, checked against the texts of the chat vectors in
// ../shared/data/tokenizers/*/chat_vectors.jsonl (made by open-instruct's code), the real CodeAlpaca
// and SuperNI files, the Flan v2 CoT fixture, and hand-written cases. No tokenizer needed.
#include "core/fileio.h"
#include "data/dataset.h"
#include "data/formats.h"
#include "test_util.h"

static cJSON *read_json_file(const char *path) {
    char *s;
    size_t n;
    ck_assert_msg(file_read_all(path, &s, &n) == MOSFT_OK, "%s", mosft_error());
    cJSON *j = cJSON_ParseWithLength(s, n);
    free(s);
    ck_assert_ptr_nonnull(j);
    return j;
}

// The i-th line of chat_vectors.jsonl of `tok` ("llama2" / "llama3").
static cJSON *vector_at(const char *tok, int i) {
    char rel[128];
    snprintf(rel, sizeof rel, "tokenizers/%s/chat_vectors.jsonl", tok);
    record_reader *r;
    ck_assert_int_eq(record_reader_open(&r, shared_path(rel), REC_JSONL, NULL, NULL), MOSFT_OK);
    cJSON *j = NULL;
    int64_t line;
    for (int k = 0; k <= i; k++) {
        cJSON_Delete(j);
        ck_assert_int_eq(record_next(r, &j, &line), MOSFT_OK);
        ck_assert_ptr_nonnull(j);
    }
    record_reader_close(r);
    return j;
}

static const char *msg_content(const cJSON *vec, int i) {
    return cJSON_GetArrayItem(cJSON_GetObjectItem(vec, "messages"), i)->child->next->valuestring;
}

// The template text (the whole rendered, stripped string) equals the vector's "text".
START_TEST(test_render_equals_vector_text) {
    REQUIRE_SHARED();
    const char *toks[] = {"llama2", "llama3"};
    for (int t = 0; t < 2; t++)
        for (int i = 0; i < 5; i++) {
            cJSON *v = vector_at(toks[t], i);
            chat_example ex = {0};
            data_rng r;
            data_rng_init(&r, 42, 0, 0);
            ck_assert_int_eq(format_record(FMT_MESSAGES, v, &r, &ex), MOSFT_OK);
            mosft_buf b = {0};
            chat_render(&ex, cJSON_GetObjectItem(v, "eos_text")->valuestring, &b);
            ck_assert_str_eq(buf_cstr(&b), cJSON_GetObjectItem(v, "text")->valuestring);
            buf_free(&b);
            chat_example_free(&ex);
            cJSON_Delete(v);
        }
}
END_TEST

// CodeAlpaca records 0 and 3 of the 2k file with the templates the vectors name.
START_TEST(test_codealpaca_templates_match_vectors) {
    REQUIRE_SHARED();
    cJSON *data = read_json_file(shared_path("datasets/codealpaca/code_alpaca_2k.json"));
    static const int k_rec[] = {0, 3};
    for (int k = 0; k < 2; k++) {
        cJSON *v = vector_at("llama2", k);
        const cJSON *rec = cJSON_GetArrayItem(data, k_rec[k]);
        const char *tn = cJSON_GetObjectItem(v, "template")->valuestring;  // "w_input[0]" / "wo_input[0]"
        int with_input = !strncmp(tn, "w_", 2), idx = atoi(strchr(tn, '[') + 1);
        chat_example ex = {0};
        template_apply(&ex, with_input, idx, cJSON_GetObjectItem(rec, "instruction")->valuestring,
                       cJSON_GetObjectItem(rec, "input")->valuestring, cJSON_GetObjectItem(rec, "output")->valuestring);
        ck_assert_str_eq(ex.msgs[0].text, msg_content(v, 0));
        ck_assert_str_eq(ex.msgs[1].text, msg_content(v, 1));
        ck_assert_str_eq(ex.template_name, tn);
        // The record's own input decides which family is drawn from.
        data_rng r;
        data_rng_init(&r, 42, 0, (uint64_t)k_rec[k]);
        chat_example drawn = {0};
        ck_assert_int_eq(format_record(FMT_CODEALPACA, rec, &r, &drawn), MOSFT_OK);
        ck_assert_int_eq(!strncmp(drawn.template_name, "w_", 2), with_input);
        chat_example_free(&ex);
        chat_example_free(&drawn);
        cJSON_Delete(v);
    }
    cJSON_Delete(data);
}
END_TEST

// All 28 templates, by hand: instruction/input/output are stripped and substituted once.
START_TEST(test_template_texts) {
    chat_example ex = {0};
    template_apply(&ex, 1, 13, "  Do it. ", "\tX {input}\n", " out ");
    ck_assert_str_eq(ex.msgs[0].text,
                     "Below is an instruction that describes a task, paired with an input that provides further context. "
                     "Write a response that appropriately completes the request.\n\n### Instruction:\nDo it.\n\n"
                     "### Input:\nX {input}\n\n### Response:");
    ck_assert_str_eq(ex.msgs[1].text, "out");
    chat_example_clear(&ex);
    template_apply(&ex, 0, 2, "Say hi", "", "hi");  // completion "\n{output}"
    ck_assert_str_eq(ex.msgs[0].text, "Say hi");
    ck_assert_str_eq(ex.msgs[1].text, "\nhi");
    chat_example_clear(&ex);
    template_apply(&ex, 0, 11, "Q", "", "A");
    ck_assert_str_eq(ex.msgs[0].text, "Plase answer the following request: Q\nAnswer:");
    chat_example_free(&ex);
}
END_TEST

// The weighted draw follows the weights (0.2, 0.1, 0.1, 0.05 x 9, 0.1 for with-input).
START_TEST(test_template_weights) {
    static const double w[N_TEMPLATES] = {0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.1};
    int count[N_TEMPLATES] = {0};
    const int n = 200000;
    for (int i = 0; i < n; i++) {
        data_rng r;
        data_rng_init(&r, 42, 0, (uint64_t)i);
        count[template_draw(&r, 1)]++;
    }
    for (int i = 0; i < N_TEMPLATES; i++)
        ck_assert_msg(fabs((double)count[i] / n - w[i]) < 0.004, "template %d: %.4f vs %.2f", i, (double)count[i] / n, w[i]);
    data_rng a, b;  // the same key draws the same template
    data_rng_init(&a, 42, 3, 99);
    data_rng_init(&b, 42, 3, 99);
    ck_assert_int_eq(template_draw(&a, 0), template_draw(&b, 0));
}
END_TEST

static const cJSON *obj(const cJSON *j, const char *k) { return cJSON_GetObjectItemCaseSensitive(j, k); }

// SuperNI few-shot: the vector's prompt is Definition + exemplars 0 and 1 + instance 0.
START_TEST(test_superni_few_shot_matches_vector) {
    REQUIRE_SHARED();
    cJSON *task = read_json_file(shared_path("datasets/superni/tasks/task1159_bard_analogical_reasoning_containers.json"));
    cJSON *v = vector_at("llama3", 2);
    const cJSON *pos = obj(task, "Positive Examples"), *inst = cJSON_GetArrayItem(obj(task, "Instances"), 0);
    const char *ein[2] = {obj(cJSON_GetArrayItem(pos, 0), "input")->valuestring, obj(cJSON_GetArrayItem(pos, 1), "input")->valuestring};
    const char *eout[2] = {obj(cJSON_GetArrayItem(pos, 0), "output")->valuestring, obj(cJSON_GetArrayItem(pos, 1), "output")->valuestring};
    chat_example ex = {0};
    format_few_shot_example(&ex, cJSON_GetArrayItem(obj(task, "Definition"), 0)->valuestring, ein, eout, 2,
                            obj(inst, "input")->valuestring, cJSON_GetArrayItem(obj(inst, "output"), 0)->valuestring);
    ck_assert_str_eq(ex.msgs[0].text, msg_content(v, 0));
    ck_assert_str_eq(ex.msgs[1].text, msg_content(v, 1));
    chat_example_free(&ex);
    cJSON_Delete(v);
    cJSON_Delete(task);
}
END_TEST

START_TEST(test_superni_sampling) {
    REQUIRE_SHARED();
    cJSON *task = read_json_file(shared_path("datasets/superni/tasks/task1159_bard_analogical_reasoning_containers.json"));
    const char *def = cJSON_GetArrayItem(obj(task, "Definition"), 0)->valuestring;
    // 6 + 4 >= 10 instances: all, in file order; the first 6 zero-shot, the last 4 few-shot.
    superni_opts o = {6, 4, 2};
    data_rng r;
    data_rng_init(&r, 42, 0, 1);
    chat_example *v;
    int n, bad;
    ck_assert_int_eq(superni_task_examples(task, &o, &r, &v, &n, &bad, NULL, 0), MOSFT_OK);
    ck_assert_int_eq(n, 10);
    ck_assert_int_eq(bad, 0);
    for (int i = 0; i < 10; i++) {
        const cJSON *in = cJSON_GetArrayItem(obj(task, "Instances"), i);
        const char *want_out = cJSON_GetArrayItem(obj(in, "output"), 0)->valuestring;  // output[0]: "jug" of ["jug","bottle"]
        ck_assert_str_eq(v[i].msgs[1].text, want_out);
        ck_assert_msg(strstr(v[i].msgs[0].text, obj(in, "input")->valuestring), "%s", v[i].msgs[0].text);
        if (i < 6) {
            ck_assert_msg(v[i].template_name[0] == 'w', "%s", v[i].template_name);  // input present: with-input family
            ck_assert_msg(strstr(v[i].msgs[0].text, def), "zero-shot prompt lacks the definition");
        } else {
            ck_assert_str_eq(v[i].template_name, "few_shot");
            // Definition + "\n\n" + 2 distinct exemplars of the 3 + the query.
            ck_assert(!strncmp(v[i].msgs[0].text, def, strlen(def)) && !strncmp(v[i].msgs[0].text + strlen(def), "\n\nInput:\n", 9));
            int found = 0;
            for (int k = 0; k < 3; k++) {
                char want[256];
                const cJSON *pe = cJSON_GetArrayItem(obj(task, "Positive Examples"), k);
                snprintf(want, sizeof want, "Input:\n%s\nOutput:\n%s\n\n", obj(pe, "input")->valuestring, obj(pe, "output")->valuestring);
                found += strstr(v[i].msgs[0].text, want) != NULL;
            }
            ck_assert_int_eq(found, 2);
            char tail[256];
            snprintf(tail, sizeof tail, "Input:\n%s\nOutput:\n", obj(in, "input")->valuestring);
            size_t tl = strlen(tail), pl = strlen(v[i].msgs[0].text);
            ck_assert_str_eq(v[i].msgs[0].text + pl - tl, tail);
        }
        chat_example_free(&v[i]);
    }
    free(v);
    // 3 + 2 < 10: a random sample of 5 distinct instances.
    o = (superni_opts){3, 2, 2};
    data_rng_init(&r, 42, 0, 2);
    ck_assert_int_eq(superni_task_examples(task, &o, &r, &v, &n, &bad, NULL, 0), MOSFT_OK);
    ck_assert_int_eq(n, 5);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < i; j++) ck_assert_str_ne(v[i].msgs[0].text, v[j].msgs[0].text);
    for (int i = 0; i < 5; i++) chat_example_free(&v[i]);
    free(v);
    // An older file: Definition a string, instances without id.
    cJSON_ReplaceItemInObject(task, "Definition", cJSON_CreateString("Fill the container."));
    cJSON *first = cJSON_GetArrayItem(obj(task, "Instances"), 0);
    cJSON_DeleteItemFromObject(first, "id");
    o = (superni_opts){10, 0, 2};
    ck_assert_int_eq(superni_task_examples(task, &o, &r, &v, &n, &bad, NULL, 0), MOSFT_OK);
    ck_assert_int_eq(n, 10);
    ck_assert_msg(strstr(v[0].msgs[0].text, "Fill the container."), "%s", v[0].msgs[0].text);
    for (int i = 0; i < n; i++) chat_example_free(&v[i]);
    free(v);
    // A broken instance is skipped and counted; a task without Instances is an error.
    cJSON_ReplaceItemInObject(first, "output", cJSON_CreateNumber(3));
    char why[256];
    ck_assert_int_eq(superni_task_examples(task, &o, &r, &v, &n, &bad, why, sizeof why), MOSFT_OK);
    ck_assert_int_eq(n, 9);
    ck_assert_int_eq(bad, 1);
    ck_assert_msg(strstr(why, "Instances[0]"), "%s", why);
    for (int i = 0; i < n; i++) chat_example_free(&v[i]);
    free(v);
    cJSON_DeleteItemFromObject(task, "Instances");
    ck_assert_int_eq(superni_task_examples(task, &o, &r, &v, &n, &bad, NULL, 0), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "\"Instances\": expected an array"), "%s", mosft_error());
    cJSON_Delete(task);
}
END_TEST

// Task selection: split lists, exclusion of the default test split, _mmmlu_ tasks, .gz duplicates.
static int count_examples(const data_source_spec *spec, data_stats *st) {
    data_options o;
    data_options_default(&o);
    dataset *d;
    int rc = dataset_open(&d, 0, spec, &o, st);
    if (rc != MOSFT_OK) return -1;
    int n = 0, got;
    dataset_item it;
    while (dataset_next(d, &it, &got) == MOSFT_OK && got) n++;
    dataset_close(d);
    return n;
}

START_TEST(test_superni_task_lists) {
    REQUIRE_SHARED();
    data_stats st;
    data_stats_init(&st, 16);
    data_source_spec spec = {shared_path("datasets/superni/tasks"), "superni", 1, 0, NULL, NULL, 60, 20, 2};
    ck_assert_int_eq(count_examples(&spec, &st), 26);
    ck_assert_int_eq(st.tasks_skipped, 1);  // task1344 .json.gz after .json
    // The default test split lists task1159 and task1344: excluding it leaves task1146 (10).
    spec.exclude_tasks = shared_path("datasets/superni/splits/default/test_tasks.txt");
    ck_assert_int_eq(count_examples(&spec, &st), 10);
    spec.exclude_tasks = NULL;
    spec.tasks = shared_path("datasets/superni/splits/default/test_tasks.txt");
    ck_assert_int_eq(count_examples(&spec, &st), 16);
    // A directory with an _mmmlu_ task and a README: both ignored.
    char *dir = test_tmpdir(), cmd[1024];
    snprintf(cmd, sizeof cmd,
             "cp %s %s/task001_x_mmmlu_y.json && cp %s %s/task002_ok.json.gz && echo hi > %s/README.md",
             shared_path("datasets/superni/tasks/task1146_country_capital.json"), dir,
             shared_path("datasets/superni/tasks/task1344_glue_entailment_classification.json.gz"), dir, dir);
    ck_assert_int_eq(run_cmd(cmd), 0);
    data_source_spec s2 = {dir, "superni", 1, 0, NULL, NULL, 60, 20, 2};
    ck_assert_int_eq(count_examples(&s2, &st), 6);
    // A split file selecting nothing is an error at open.
    snprintf(cmd, sizeof cmd, "%s/none.txt", dir);
    FILE *f = fopen(cmd, "w");
    fputs("task9999_nothing\n", f);
    fclose(f);
    s2.tasks = cmd;
    ck_assert_int_eq(count_examples(&s2, &st), -1);
    ck_assert_msg(strstr(mosft_error(), "expected SuperNI task files"), "%s", mosft_error());
    data_stats_free(&st);
}
END_TEST

static void flan_prompt(const char *inputs, const char *want) {
    cJSON *rec = cJSON_CreateObject();
    cJSON_AddStringToObject(rec, "inputs", inputs);
    cJSON_AddStringToObject(rec, "targets", "T");
    chat_example ex = {0};
    data_rng r = {0, 0};
    ck_assert_int_eq(format_record(FMT_FLAN_V2, rec, &r, &ex), MOSFT_OK);
    ck_assert_str_eq(ex.msgs[0].text, want);
    ck_assert_str_eq(ex.msgs[1].text, "T");
    chat_example_free(&ex);
    cJSON_Delete(rec);
}

START_TEST(test_flan_newline_rule) {
    flan_prompt("abc", "abc\n");
    flan_prompt("abc\n", "abc\n");
    flan_prompt("Answer:", "Answer:");
    flan_prompt("Answer: \n ", "Answer: \n ");  // ends with "\n"? no: rstrip ends with ":", unchanged
    flan_prompt("Answer:  ", "Answer:  ");
    flan_prompt("", "\n");
    flan_prompt("a:b", "a:b\n");
}
END_TEST

// The fixture parses completely: 7 x 12 zero-shot + 7 few-shot records; the rule on real prompts.
START_TEST(test_flan_fixture) {
    REQUIRE_SHARED();
    data_options o;
    data_options_default(&o);
    data_source_spec spec = {"tests/fixtures/data/flan_v2_cot.jsonl", "flan_v2", 1, 0, NULL, NULL, 0, 0, 0};
    for (int gz = 0; gz < 2; gz++) {
        char path[512];
        if (gz) {  // the same file gzip-compressed
            snprintf(path, sizeof path, "%s/flan.jsonl.gz", test_tmpdir());
            char cmd[700];
            snprintf(cmd, sizeof cmd, "gzip -c tests/fixtures/data/flan_v2_cot.jsonl > %s", path);
            ck_assert_int_eq(run_cmd(cmd), 0);
            spec.path = path;
        }
        dataset *d;
        ck_assert_int_eq(dataset_open(&d, 0, &spec, &o, NULL), MOSFT_OK);
        int n = 0, got, with_nl = 0;
        dataset_item it;
        cJSON *v = vector_at("llama2", 3);
        while (dataset_next(d, &it, &got) == MOSFT_OK && got) {
            const char *p = it.ex->msgs[0].text;
            size_t L = strlen(p);
            with_nl += p[L - 1] == '\n';
            if (n == 1) {  // StrategyQA line 2, template cot_strategyqa[2]: the vector's record
                ck_assert_str_eq(p, msg_content(v, 0));
                ck_assert_str_eq(it.ex->msgs[1].text, msg_content(v, 1));
            }
            if (n == 0) ck_assert_str_eq(p + L - 8, "answer.\n");  // template 0 gets the newline
            n++;
        }
        ck_assert_int_eq(n, 91);
        ck_assert_int_eq(with_nl, 43);  // open-instruct's rule applied in Python to the fixture: 43 of 91
        cJSON_Delete(v);
        dataset_close(d);
    }
}
END_TEST

static int bad_record(data_format f, const char *json, const char *want) {
    cJSON *rec = cJSON_Parse(json);
    chat_example ex = {0};
    data_rng r = {0, 0};
    int rc = format_record(f, rec, &r, &ex);
    if (want) ck_assert_msg(rc == MOSFT_ERR_INPUT && strstr(mosft_error(), want), "%s -> %s", json, mosft_error());
    chat_example_free(&ex);
    cJSON_Delete(rec);
    return rc;
}

START_TEST(test_record_errors_and_messages) {
    bad_record(FMT_CODEALPACA, "{\"input\": \"\", \"output\": \"x\"}", "\"instruction\": expected a string, got nothing");
    bad_record(FMT_CODEALPACA, "{\"instruction\": 3, \"input\": \"\", \"output\": \"x\"}", "got a number");
    ck_assert_int_eq(bad_record(FMT_CODEALPACA, "{\"instruction\": \"i\", \"input\": null, \"output\": \"x\"}", NULL), MOSFT_OK);
    bad_record(FMT_FLAN_V2, "{\"inputs\": \"a\"}", "\"targets\": expected a string");
    bad_record(FMT_MESSAGES, "{\"messages\": {}}", "\"messages\": expected an array, got an object");
    bad_record(FMT_MESSAGES, "{\"messages\": []}", "expected at least one message");
    bad_record(FMT_MESSAGES, "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}", "messages[0].role");
    bad_record(FMT_MESSAGES, "{\"messages\": [{\"role\": \"user\", \"content\": null}]}", "messages[0].content");
    bad_record(FMT_PROMPT_COMPLETION, "[1]", "expected a JSON object, got an array");
    // Multi-turn with a system message, in order.
    cJSON *rec = cJSON_Parse("{\"messages\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", \"content\": \"U1\"},"
                             "{\"role\": \"assistant\", \"content\": \"A1\"}, {\"role\": \"user\", \"content\": \"U2\"},"
                             "{\"role\": \"assistant\", \"content\": \" A2 \"}]}");
    chat_example ex = {0};
    data_rng r = {0, 0};
    ck_assert_int_eq(format_record(FMT_MESSAGES, rec, &r, &ex), MOSFT_OK);
    ck_assert_int_eq(ex.n, 5);
    mosft_buf b = {0};
    chat_render(&ex, "</s>", &b);
    ck_assert_str_eq(buf_cstr(&b), "<|system|>\nS\n<|user|>\nU1\n<|assistant|>\nA1</s>\n<|user|>\nU2\n<|assistant|>\nA2</s>");
    buf_free(&b);
    chat_example_free(&ex);
    cJSON_Delete(rec);
}
END_TEST

static void pc_text(const char *p, const char *c, const char *want) {
    chat_example ex = {0};
    chat_example_add(&ex, ROLE_USER, p, strlen(p));
    chat_example_add(&ex, ROLE_ASSISTANT, c, strlen(c));
    ex.prompt_completion = 1;
    mosft_buf b = {0};
    chat_render(&ex, "</s>", &b);
    ck_assert_str_eq(buf_cstr(&b), want);
    buf_free(&b);
    chat_example_free(&ex);
}

START_TEST(test_prompt_completion_join) {
    pc_text("Q:", "A", "Q: A</s>");
    pc_text("Q: ", "A", "Q: A</s>");
    pc_text("Q:", "\nA", "Q:\nA</s>");
    pc_text("Q:\t", " A", "Q:\t A</s>");
}
END_TEST

static void strip_is(const char *s, const char *want) {
    size_t a, b;
    py_strip(s, strlen(s), &a, &b);
    ck_assert_int_eq((int)(b - a), (int)strlen(want));
    ck_assert(!strncmp(s + a, want, b - a));
}

START_TEST(test_py_strip) {
    strip_is("  x y \n", "x y");
    strip_is("\xE3\x80\x80x\xC2\xA0\n", "x");                    // U+3000 ideographic space, U+00A0 NBSP
    strip_is("\xE2\x80\x8Bx\xE2\x80\x8B", "\xE2\x80\x8Bx\xE2\x80\x8B");  // U+200B is not whitespace in Python
    strip_is("\x1c\x1dx\x1e\x1f\x85", "x\x1e\x1f\x85");           // 0x1c-0x1f are; a lone 0x85 byte is not text
    strip_is("\xC2\x85x\xE2\x80\xA8", "x");                       // U+0085, U+2028
    strip_is(" \t\r\v\f", "");
    strip_is("\xE4\xBD\xA0\xE5\xA5\xBD", "\xE4\xBD\xA0\xE5\xA5\xBD");
}
END_TEST

static Suite *formats_suite(void) {
    Suite *s = suite_create("formats");
    TCase *tc = tcase_create("formats");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_render_equals_vector_text);
    tcase_add_test(tc, test_codealpaca_templates_match_vectors);
    tcase_add_test(tc, test_template_texts);
    tcase_add_test(tc, test_template_weights);
    tcase_add_test(tc, test_superni_few_shot_matches_vector);
    tcase_add_test(tc, test_superni_sampling);
    tcase_add_test(tc, test_superni_task_lists);
    tcase_add_test(tc, test_flan_newline_rule);
    tcase_add_test(tc, test_flan_fixture);
    tcase_add_test(tc, test_record_errors_and_messages);
    tcase_add_test(tc, test_prompt_completion_join);
    tcase_add_test(tc, test_py_strip);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(formats_suite)
