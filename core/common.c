// common.c: see common.h.
#include "core/common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int mosft_verbosity = 1;

static _Thread_local char g_err[2048];
static _Thread_local char g_hint[512];
static _Thread_local int g_code;

int mosft_fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    g_hint[0] = 0;
    g_code = code;
    return code;
}

int mosft_fail_hint(int code, const char *hint, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    snprintf(g_hint, sizeof g_hint, "%s", hint ? hint : "");
    g_code = code;
    return code;
}

int mosft_fail_prefix(int code, const char *fmt, ...) {
    char prefix[512], old[sizeof g_err];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, g_err, sizeof old);
    int n = snprintf(g_err, sizeof g_err, "%s: ", prefix);
    if (n > 0 && (size_t)n < sizeof g_err) {
        size_t room = sizeof g_err - (size_t)n - 1, ol = strlen(old);
        if (ol > room) ol = room;
        memcpy(g_err + n, old, ol);
        g_err[(size_t)n + ol] = 0;
    }
    g_code = code;
    return code;
}

const char *mosft_error(void) { return g_err; }
const char *mosft_error_hint(void) { return g_hint; }
int mosft_error_code(void) { return g_code; }
void mosft_error_clear(void) {
    g_err[0] = 0;
    g_hint[0] = 0;
    g_code = 0;
}

void mosft_error_print(void) {
    fprintf(stderr, "error: %s\n", g_err[0] ? g_err : "unknown error");
    if (g_hint[0]) fprintf(stderr, "hint: %s\n", g_hint);
}

void mosft_assert_fail(const char *expr, const char *file, int line) {
    fprintf(stderr, "internal error: %s:%d: assertion failed: %s\n", file, line, expr);
    fprintf(stderr, "hint: this is a bug in mosft; please report it with the command that caused it\n");
    abort();
}

void mosft_die(const char *file, int line, const char *hint, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "error: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (%s:%d)\n", file, line);
    if (hint && hint[0]) fprintf(stderr, "hint: %s\n", hint);
    exit(MOSFT_ERR_RUNTIME);
}

static void oom(size_t n, const char *file, int line) {
    char b[32];
    mosft_fmt_bytes(b, sizeof b, (double)n);
    mosft_die(file, line, "free memory, or reduce train.micro_batch_size / data.max_seq_len",
              "out of host memory allocating %s", b);
}

void *mosft_xmalloc(size_t n, const char *file, int line) {
    void *p = malloc(n ? n : 1);
    if (!p) oom(n, file, line);
    return p;
}
void *mosft_xcalloc(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) oom(n * size, file, line);
    return p;
}
void *mosft_xrealloc(void *p, size_t n, const char *file, int line) {
    void *q = realloc(p, n ? n : 1);
    if (!q) oom(n, file, line);
    return q;
}
char *mosft_xstrdup(const char *s, const char *file, int line) {
    size_t n = strlen(s) + 1;
    char *p = mosft_xmalloc(n, file, line);
    memcpy(p, s, n);
    return p;
}
void *mosft_xmalloc_aligned(size_t n, const char *file, int line) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) oom(n, file, line);
    return p;
}

void mosft_log(const char *fmt, ...) {
    if (mosft_verbosity < 1) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}
void mosft_logv(const char *fmt, ...) {
    if (mosft_verbosity < 2) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}

void buf_reserve(mosft_buf *b, size_t cap) {
    if (cap + 1 <= b->cap) return;
    size_t nc = b->cap ? b->cap : 64;
    while (nc < cap + 1) nc *= 2;
    b->data = xrealloc(b->data, nc);
    b->cap = nc;
}
void buf_append(mosft_buf *b, const void *p, size_t n) {
    buf_reserve(b, b->len + n);
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
}
void buf_append_str(mosft_buf *b, const char *s) { buf_append(b, s, strlen(s)); }
void buf_printf(mosft_buf *b, const char *fmt, ...) {
    va_list ap, ap2;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        va_end(ap2);
        return;
    }
    buf_reserve(b, b->len + (size_t)n);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap2);
    va_end(ap2);
    b->len += (size_t)n;
}
void buf_free(mosft_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
char *buf_cstr(mosft_buf *b) {
    buf_reserve(b, b->len);
    b->data[b->len] = 0;
    return b->data;
}

double mosft_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void mosft_fmt_bytes(char *out, size_t n, double bytes) {
    const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024.0 && u < 4) {
        bytes /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(out, n, "%.0f B", bytes);
    else
        snprintf(out, n, "%.*f %s", bytes < 10 ? 2 : 1, bytes, units[u]);
}

void mosft_fmt_count(char *out, size_t n, double count) {
    char digits[64];
    snprintf(digits, sizeof digits, "%.0f", count < 0 ? -count : count);
    size_t len = strlen(digits), o = 0;
    if (count < 0 && o + 1 < n) out[o++] = '-';
    for (size_t i = 0; i < len && o + 1 < n; i++) {
        if (i > 0 && (len - i) % 3 == 0 && o + 1 < n) out[o++] = ',';
        if (o + 1 < n) out[o++] = digits[i];
    }
    out[o] = 0;
}

void mosft_fmt_duration(char *out, size_t n, double s) {
    if (!(s >= 0) || s > 1e9) {
        snprintf(out, n, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t < 60)
        snprintf(out, n, "%lds", t);
    else if (t < 3600)
        snprintf(out, n, "%ldm%02lds", t / 60, t % 60);
    else if (t < 86400)
        snprintf(out, n, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
    else
        snprintf(out, n, "%ldd%02ldh", t / 86400, (t % 86400) / 3600);
}

void mosft_quote(char *out, size_t n, const char *s) {
    size_t o = 0, lim = n > 48 ? 48 : n;
    if (!s) {
        snprintf(out, n, "null");
        return;
    }
    if (o + 1 < lim) out[o++] = '"';
    for (const char *p = s; *p && o + 5 < lim; p++) {
        if (*p == '"' || *p == '\\') out[o++] = '\\';
        out[o++] = (*p == '\n') ? ' ' : *p;
    }
    if (*s && strlen(s) + 2 > lim - 4 && o + 4 < n) {
        out[o++] = '.';
        out[o++] = '.';
        out[o++] = '.';
    }
    if (o + 1 < n) out[o++] = '"';
    out[o] = 0;
}

int mosft_num_threads(void) {
    const char *e = getenv("MOSFT_THREADS");
    if (e && atoi(e) > 0) return atoi(e);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
