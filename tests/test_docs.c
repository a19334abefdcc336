// test_docs.c: docs/CONFIG.md is generated from the schema; fail when it is stale.
#include <string.h>

#include "tests/test_util.h"

START_TEST(test_config_doc_current) {
    char *out = NULL;
    int rc = run_capture("bash scripts/gen_config_doc.sh build/mosft /tmp/mosft-config-doc.md && cmp /tmp/mosft-config-doc.md docs/CONFIG.md", &out);
    ck_assert_msg(rc == 0, "docs/CONFIG.md is stale: run scripts/gen_config_doc.sh and commit it\n%s", out);
    free(out);
}
END_TEST

// Every MOSFT_* variable mosft's sources read is explained by `mosft help env` (the tests' own are in
// docs/CUDA.md and tests/).
START_TEST(test_env_doc_complete) {
    char *src = NULL, *help = NULL;
    int rc = run_capture("grep -rhoE 'getenv\\(\"MOSFT_[A-Z0-9_]+' core cuda data cli | sed 's/.*\"//' | sort -u", &src);
    ck_assert_int_eq(rc, 0);
    ck_assert_int_eq(run_capture("build/mosft help env", &help), 0);
    int n = 0;
    for (char *line = strtok(src, "\n"); line; line = strtok(NULL, "\n")) {
        if (!*line) continue;
        n++;
        ck_assert_msg(strstr(help, line) != NULL, "%s is read by the sources but `mosft help env` does not explain it", line);
    }
    ck_assert_int_ge(n, 8);  // the grep found them
    free(src);
    free(help);
}
END_TEST

static Suite *docs_suite(void) {
    Suite *s = suite_create("docs");
    TCase *tc = tcase_create("config");
    tcase_add_test(tc, test_config_doc_current);
    tcase_add_test(tc, test_env_doc_complete);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(docs_suite)
