// test_docs.c: docs/CONFIG.md is generated from the schema; fail when it is stale.
#include "tests/test_util.h"

START_TEST(test_config_doc_current) {
    char *out = NULL;
    int rc = run_capture("bash scripts/gen_config_doc.sh build/mosft /tmp/mosft-config-doc.md && cmp /tmp/mosft-config-doc.md docs/CONFIG.md", &out);
    ck_assert_msg(rc == 0, "docs/CONFIG.md is stale: run scripts/gen_config_doc.sh and commit it\n%s", out);
    free(out);
}
END_TEST

static Suite *docs_suite(void) {
    Suite *s = suite_create("docs");
    TCase *tc = tcase_create("config");
    tcase_add_test(tc, test_config_doc_current);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(docs_suite)
