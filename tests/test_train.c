// test_train.c: `mosft train` end to end on the bundled model and data (CPU): exact resume,
// crash safety of checkpoints, signals, the learning-rate schedule, bad input before training.
#include <signal.h>
#include <sys/wait.h>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/fileio.h"
#include "core/train.h"
#include "tests/test_util.h"

// A small, fast run of the demo setup.
#define TINY                                                                                                   \
    "--set train.steps=20 --set train.micro_batch_size=4 --set train.batch_size=8 --set data.max_seq_len=96 " \
    "--set data.eval_examples=8 --set train.eval_every=10 --set output.save_every=5 --set train.log_every=5 "  \
    "--set data.shuffle_buffer=64 --set adapter.dropout=0.1 -q"

static char *g_dir;
static void setup(void) { g_dir = xstrdup(test_tmpdir()); }
static void teardown(void) {
    rm_rf(g_dir);
    free(g_dir);
}

static int run(const char *fmt, const char *a, const char *b) {
    char cmd[4096];
    snprintf(cmd, sizeof cmd, fmt, a, b);
    char *out = NULL;
    int rc = run_capture(cmd, &out);
    if (rc != 0 && rc != 1) fprintf(stderr, "%s\n-> %d\n%s\n", cmd, rc, out);
    free(out);
    return rc;
}

// The "loss" values of metrics.jsonl, as text, in order.
static char *losses(const char *run_dir) {
    char *p = path_join(run_dir, "metrics.jsonl"), *text = NULL;
    ck_assert_int_eq(file_read_all(p, &text, NULL), MOSFT_OK);
    free(p);
    mosft_buf b = {0};
    for (char *s = strstr(text, "\"loss\": "); s; s = strstr(s + 1, "\"loss\": ")) {
        char *e = strchr(s, ',');
        buf_append(&b, s, (size_t)(e - s));
        buf_append_str(&b, "\n");
    }
    free(text);
    return buf_cstr(&b);
}

static int files_equal(const char *a, const char *b) {
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    if (file_read_all(a, &x, &nx) || file_read_all(b, &y, &ny)) return 0;
    int eq = nx == ny && memcmp(x, y, nx) == 0;
    free(x);
    free(y);
    return eq;
}

START_TEST(test_resume_is_exact) {
    char *a = path_join(g_dir, "straight"), *b = path_join(g_dir, "resumed");
    ck_assert_int_eq(run("./build/mosft train configs/demo.json " TINY " --set output.dir=%s%s", a, ""), 0);
    // 10 steps, stop (with a checkpoint), then resume for the other 10.
    ck_assert_int_eq(run("./build/mosft train configs/demo.json " TINY " --set output.dir=%s --stop-after 10%s", b, ""), 0);
    char *ck = path_join(b, "checkpoint-000010");
    ck_assert_msg(dir_exists(ck), "no checkpoint after the first half");
    free(ck);
    ck_assert_int_eq(run("./build/mosft train --resume %s -q%s", b, ""), 0);
    char *la = losses(a), *lb = losses(b);
    ck_assert_msg(!strcmp(la, lb), "losses differ:\n%s\nvs\n%s", la, lb);
    ck_assert_int_eq((int)(strlen(la) > 0), 1);
    char *fa = path_join(a, "adapter.mos"), *fb = path_join(b, "adapter.mos");
    ck_assert_msg(files_equal(fa, fb), "final adapter.mos differs between the straight and the resumed run");
    // keep_last (3): checkpoints 10, 15, 20 remain of 5, 10, 15, 20.
    char *c5 = path_join(a, "checkpoint-000005"), *c20 = path_join(a, "checkpoint-000020");
    ck_assert(!dir_exists(c5));
    ck_assert(dir_exists(c20));
    // A new run into a folder that holds one is refused (exit 2);.
    ck_assert_int_eq(run("./build/mosft train configs/demo.json " TINY " --set output.dir=%s%s", a, ""), 2);
    free(c5);
    free(c20);
    free(fa);
    free(fb);
    free(la);
    free(lb);
    free(a);
    free(b);
}
END_TEST

// SIGKILL at each point of a checkpoint write: the previous checkpoint stays loadable and resuming
// from it continues exactly (same losses as an uninterrupted run).
START_TEST(test_kill_during_checkpoint) {
    const char *points[] = {"state:10", "rename:10", "latest:10"};
    char *ref = path_join(g_dir, "ref");
    ck_assert_int_eq(run("./build/mosft train configs/demo.json " TINY " --set output.dir=%s%s", ref, ""), 0);
    char *lref = losses(ref);
    for (int k = 0; k < 3; k++) {
        char name[32];
        snprintf(name, sizeof name, "killed%d", k);
        char *d = path_join(g_dir, name);
        char cmd[1024];
        snprintf(cmd, sizeof cmd, "MOSFT_TEST_KILL_AT=%s ./build/mosft train configs/demo.json " TINY " --set output.dir=%s",
                 points[k], d);
        int rc = run_cmd(cmd);
        ck_assert_msg(rc == 128 + SIGKILL, "%s: expected death by SIGKILL, got %d", points[k], rc);
        char *c5 = path_join(d, "checkpoint-000005");
        ck_assert_msg(dir_exists(c5), "%s: the previous checkpoint is gone", points[k]);
        free(c5);
        // The resume picks the newest complete checkpoint and goes on to the end.
        ck_assert_int_eq(run("./build/mosft train --resume %s -q%s", d, ""), 0);
        char *tmp = path_join(d, "checkpoint-000010.tmp");
        ck_assert_msg(!dir_exists(tmp), "%s: a temporary checkpoint folder was left behind", points[k]);
        free(tmp);
        char *l = losses(d);
        ck_assert_msg(!strcmp(l, lref), "%s: losses after the crash differ:\n%s\nvs\n%s", points[k], l, lref);
        char *fa = path_join(ref, "adapter.mos"), *fb = path_join(d, "adapter.mos");
        ck_assert_msg(files_equal(fa, fb), "%s: final adapter differs", points[k]);
        free(fa);
        free(fb);
        free(l);
        free(d);
    }
    free(lref);
    free(ref);
}
END_TEST

// SIGTERM: the current step finishes, a checkpoint is written, the message says how to resume.
START_TEST(test_sigterm_saves) {
    char *d = path_join(g_dir, "term");
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "./build/mosft train configs/demo.json " TINY " --set train.steps=100000 --set output.dir=%s > %s.log 2>&1 & "
             "pid=$!; for i in $(seq 100); do sleep 0.2; grep -q 'step 5/' %s.log && break; done; kill -TERM $pid; wait $pid",
             d, d, d);
    int rc = run_cmd(cmd);
    ck_assert_int_eq(rc, 1);
    char *log = NULL, *lp = NULL;
    asprintf(&lp, "%s.log", d);
    file_read_all(lp, &log, NULL);
    ck_assert_msg(strstr(log, "checkpoint saved") && strstr(log, "mosft train --resume"), "%s", log);
    int64_t step = 0;
    char *ck = NULL;
    ck_assert_int_eq(checkpoint_find_latest(d, &ck, &step), MOSFT_OK);
    ck_assert_int_ge(step, 5);
    free(ck);
    free(log);
    free(lp);
    free(d);
}
END_TEST

START_TEST(test_bad_inputs_fail_before_training) {
    char *out = NULL, cmd[1024];
    snprintf(cmd, sizeof cmd, "./build/mosft train configs/demo.json --set output.dir=%s/bad "
             "--set data.sources[0].path=/nonexistent/x.json -q", g_dir);
    int rc = run_capture(cmd, &out);
    ck_assert_int_eq(rc, 2);
    ck_assert_msg(strstr(out, "/nonexistent/x.json") != NULL, "%s", out);
    ck_assert_msg(strchr(out, '\n') == out + strlen(out) - 1 || strstr(out, "hint:"), "more than one line: %s", out);
    free(out);
    rc = run_capture("./build/mosft train configs/demo.json --set model.path=/nonexistent -q", &out);
    ck_assert_int_eq(rc, 2);
    free(out);
    rc = run_capture("./build/mosft train configs/demo.json --set adapter.shards=3 -q", &out);
    ck_assert_int_eq(rc, 2);
    ck_assert_msg(strstr(out, "adapter.shards") != NULL, "%s", out);
    free(out);
    rc = run_capture("./build/mosft train --resume /nonexistent/run", &out);
    ck_assert_int_eq(rc, 2);
    free(out);
    // bench checks its arguments before it looks for a GPU
    rc = run_capture("./build/mosft bench --dropout 1.5", &out);
    ck_assert_int_eq(rc, 2);
    ck_assert_msg(strstr(out, "--dropout") != NULL, "%s", out);
    free(out);
    // --dry-run prints the plan and trains nothing.
    snprintf(cmd, sizeof cmd, "./build/mosft train configs/demo.json --dry-run --set output.dir=%s/dry", g_dir);
    rc = run_capture(cmd, &out);
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(strstr(out, "memory plan") && strstr(out, "trainable parameters"), "%s", out);
    free(out);
}
END_TEST

START_TEST(test_lr_schedule) {
    mosft_config c;
    config_defaults(&c);
    // The paper's recipe: 10,000 steps, 3% warmup -> 300 warmup steps; HF get_linear_schedule_with_warmup.
    ck_assert_int_eq(train_warmup_steps(&c), 300);
    ck_assert_double_eq(train_lr_at(&c, 0), 0.0);
    ck_assert_double_eq_tol(train_lr_at(&c, 150), 1e-4, 1e-15);
    ck_assert_double_eq_tol(train_lr_at(&c, 300), 2e-4, 1e-15);
    ck_assert_double_eq_tol(train_lr_at(&c, 5150), 2e-4 * 4850.0 / 9700.0, 1e-15);
    ck_assert_double_eq(train_lr_at(&c, 10000), 0.0);
    config_set(&c, "train.steps=7");  // ceil(0.03 * 7) = 1
    ck_assert_int_eq(train_warmup_steps(&c), 1);
    config_set(&c, "train.schedule=cosine");
    config_set(&c, "train.steps=101");  // ceil(3.03) = 4 warmup steps
    ck_assert_int_eq(train_warmup_steps(&c), 4);
    ck_assert_double_eq_tol(train_lr_at(&c, 4), 2e-4, 1e-15);
    ck_assert_double_eq_tol(train_lr_at(&c, 4 + 97 / 2.0), 1e-4, 2e-6);
    config_set(&c, "train.schedule=constant");
    config_set(&c, "train.warmup_ratio=0");
    ck_assert_double_eq(train_lr_at(&c, 0), 2e-4);
    ck_assert_double_eq(train_lr_at(&c, 100), 2e-4);
    config_free(&c);
}
END_TEST

static Suite *train_suite(void) {
    Suite *s = suite_create("train");
    TCase *tc = tcase_create("e2e");
    tcase_set_timeout(tc, 600);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_lr_schedule);
    tcase_add_test(tc, test_bad_inputs_fail_before_training);
    tcase_add_test(tc, test_resume_is_exact);
    tcase_add_test(tc, test_kill_during_checkpoint);
    tcase_add_test(tc, test_sigterm_saves);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(train_suite)
