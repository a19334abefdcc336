// common.h: error reporting, check macros, allocation, logging and small helpers shared by every
// part of mosft (cli, core, data, cuda). Nothing here knows about models or data.
//
// Error convention. Library functions never print and never exit on bad input: they record one line
// with mosft_fail() and return its code. The command line prints "error: <line>" (and "hint: ..."
// when there is one) and exits with that code:
//   MOSFT_OK 0, MOSFT_ERR_RUNTIME 1 (a failure of the machine: I/O, out of memory, CUDA),
//   MOSFT_ERR_INPUT 2 (the user's input is wrong: config, file, record, URL, argument).
// The line reads "<file>: <where>: <what was expected>, got <what was found>".
//
// Invariants of our own code (not user input) use MOSFT_ASSERT, which is always on and aborts.
#ifndef MOSFT_COMMON_H
#define MOSFT_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { MOSFT_OK = 0, MOSFT_ERR_RUNTIME = 1, MOSFT_ERR_INPUT = 2 };

#if defined(__GNUC__)
#define MOSFT_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define MOSFT_NORETURN __attribute__((noreturn))
#else
#define MOSFT_PRINTF(a, b)
#define MOSFT_NORETURN
#endif

// Record an error message (thread-local) and return `code`. Usage:
//   return mosft_fail(MOSFT_ERR_INPUT, "%s: train.lr: expected a number > 0, got \"%s\"", path, s);
int mosft_fail(int code, const char *fmt, ...) MOSFT_PRINTF(2, 3);
// The same, with a hint line for the user ("try train.recompute=full").
int mosft_fail_hint(int code, const char *hint, const char *fmt, ...) MOSFT_PRINTF(3, 4);
// Prefix the recorded message with "<prefix>: " (to add context on the way up), returns `code`.
int mosft_fail_prefix(int code, const char *fmt, ...) MOSFT_PRINTF(2, 3);
const char *mosft_error(void);       // the last recorded message ("" if none)
const char *mosft_error_hint(void);  // its hint ("" if none)
int mosft_error_code(void);          // the code of the last mosft_fail (0 if none)
void mosft_error_clear(void);
// Print "error: <msg>" and "hint: <hint>" to stderr (the CLI's way out).
void mosft_error_print(void);

// Always-on invariant check (our bug, not the user's): prints file:line and aborts.
#define MOSFT_ASSERT(cond)                                                                         \
    do {                                                                                           \
        if (!(cond)) mosft_assert_fail(#cond, __FILE__, __LINE__);                                 \
    } while (0)
MOSFT_NORETURN void mosft_assert_fail(const char *expr, const char *file, int line);

// Fatal runtime failure with a hint (used where returning is not possible, e.g. inside a thread).
MOSFT_NORETURN void mosft_die(const char *file, int line, const char *hint, const char *fmt, ...)
    MOSFT_PRINTF(4, 5);

// Allocation that never returns NULL: on failure prints file:line, the size and a hint, exits 1.
#define xmalloc(n) mosft_xmalloc((n), __FILE__, __LINE__)
#define xcalloc(n, s) mosft_xcalloc((n), (s), __FILE__, __LINE__)
#define xrealloc(p, n) mosft_xrealloc((p), (n), __FILE__, __LINE__)
#define xstrdup(s) mosft_xstrdup((s), __FILE__, __LINE__)
void *mosft_xmalloc(size_t n, const char *file, int line);
void *mosft_xcalloc(size_t n, size_t size, const char *file, int line);
void *mosft_xrealloc(void *p, size_t n, const char *file, int line);
char *mosft_xstrdup(const char *s, const char *file, int line);
// 64-byte aligned allocation (free with free()).
#define xmalloc_aligned(n) mosft_xmalloc_aligned((n), __FILE__, __LINE__)
void *mosft_xmalloc_aligned(size_t n, const char *file, int line);

// Logging to stderr. Level 0 = quiet (errors only), 1 = normal, 2 = verbose.
extern int mosft_verbosity;
void mosft_log(const char *fmt, ...) MOSFT_PRINTF(1, 2);
void mosft_logv(const char *fmt, ...) MOSFT_PRINTF(1, 2);  // only at verbosity >= 2

// Growable byte buffer.
typedef struct {
    char *data;
    size_t len, cap;
} mosft_buf;
void buf_reserve(mosft_buf *b, size_t cap);
void buf_append(mosft_buf *b, const void *p, size_t n);
void buf_append_str(mosft_buf *b, const char *s);
void buf_printf(mosft_buf *b, const char *fmt, ...) MOSFT_PRINTF(2, 3);
void buf_free(mosft_buf *b);
char *buf_cstr(mosft_buf *b);  // NUL-terminated view (len unchanged)

// Time and formatting.
double mosft_now(void);                                  // seconds, monotonic
void mosft_fmt_bytes(char *out, size_t n, double bytes);  // "9.8 GiB"
void mosft_fmt_count(char *out, size_t n, double count);  // "4,997,120"
void mosft_fmt_duration(char *out, size_t n, double s);   // "1h12m", "43s"

// A JSON-ish quoted, shortened rendering of a user's value for messages ("fast" -> "\"fast\"").
void mosft_quote(char *out, size_t n, const char *s);

// Number of worker threads to use on CPU (MOSFT_THREADS env, else online cores).
int mosft_num_threads(void);

#ifdef __cplusplus
}
#endif
#endif
