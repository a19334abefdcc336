// test_util.h: helpers shared by the check-based test programs (tests/test_*.c).
//
// Each test program defines its suite(s) and calls TEST_MAIN(suite_fn) at the end.
// Real inputs live in ../shared/data (MOSFT_SHARED_DATA overrides); fixtures the fresh clone needs
// live in tests/fixtures. Paths are relative to the repository root, where `make test` runs.
#ifndef MOSFT_TEST_UTIL_H
#define MOSFT_TEST_UTIL_H

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/common.h"

// Path of a file under the shared data folder (static buffer, one at a time per call site).
static inline const char *shared_data_dir(void) {
    const char *e = getenv("MOSFT_SHARED_DATA");
    if (e && *e) return e;
    return "../shared/data";
}
static inline char *shared_path(const char *rel) {
    static _Thread_local char buf[4][1024];
    static _Thread_local int k = 0;
    k = (k + 1) & 3;
    snprintf(buf[k], sizeof buf[k], "%s/%s", shared_data_dir(), rel);
    return buf[k];
}
static inline int shared_available(void) {
    struct stat st;
    return stat(shared_data_dir(), &st) == 0;
}
// Tests that need ../shared/data call this first: when the folder is absent they say so loudly
// (the test does not silently pass in a way that looks like a check).
#define REQUIRE_SHARED()                                                                           \
    do {                                                                                           \
        if (!shared_available()) {                                                                 \
            fprintf(stderr, "SKIPPED %s: %s not found (set MOSFT_SHARED_DATA)\n", __func__,        \
                    shared_data_dir());                                                            \
            return;                                                                                \
        }                                                                                          \
    } while (0)

// A fresh temporary directory for one test (removed by the OS's tmp cleaning; tests may rm it).
static inline char *test_tmpdir(void) {
    static _Thread_local char buf[256];
    snprintf(buf, sizeof buf, "/tmp/mosft-test-XXXXXX");
    if (!mkdtemp(buf)) return NULL;
    return buf;
}

// Relative difference |a-b| / max(|b|, floor).
static inline double rel_diff(double a, double b, double floor_) {
    double d = fabs(a - b), s = fabs(b) > floor_ ? fabs(b) : floor_;
    return d / s;
}

// Max over i of |a_i - b_i| / (atol + rtol*|b_i|) : <= 1 means within tolerance.
static inline double max_tol_ratio(const float *a, const float *b, size_t n, double atol, double rtol,
                                   size_t *worst) {
    double m = 0;
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        double r = fabs((double)a[i] - (double)b[i]) / (atol + rtol * fabs((double)b[i]));
        if (!(r <= m)) {
            m = r;
            w = i;
        }
    }
    if (worst) *worst = w;
    return m;
}

// Relative L2 error ||a-b|| / ||b||.
static inline double rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

// Run a shell command; returns its exit status (or -1).
static inline int run_cmd(const char *cmd) {
    int rc = system(cmd);
    if (rc == -1) return -1;
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
}

// Run a command and capture stdout+stderr into a malloc'd string; returns exit status.
static inline int run_capture(const char *cmd, char **out) {
    char *full = NULL;
    if (asprintf(&full, "%s 2>&1", cmd) < 0) return -1;
    FILE *p = popen(full, "r");
    free(full);
    if (!p) return -1;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while ((n = fread(buf + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (cap - len < 1024) buf = realloc(buf, cap *= 2);
    }
    buf[len] = 0;
    int rc = pclose(p);
    *out = buf;
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
}

#define TEST_MAIN(...)                                                                             \
    int main(void) {                                                                               \
        Suite *(*fns[])(void) = {__VA_ARGS__};                                                     \
        SRunner *sr = srunner_create(fns[0]());                                                    \
        for (size_t i = 1; i < sizeof fns / sizeof fns[0]; i++) srunner_add_suite(sr, fns[i]());   \
        srunner_run_all(sr, CK_NORMAL);                                                            \
        int nf = srunner_ntests_failed(sr);                                                        \
        srunner_free(sr);                                                                          \
        return nf == 0 ? 0 : 1;                                                                    \
    }

#endif
