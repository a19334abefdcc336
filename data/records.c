// records.c: JSONL, streamed JSON arrays and whole-file JSON (see records.h).
#include "data/records.h"

#include <stdlib.h>
#include <string.h>

#include "core/common.h"

enum { ARR_BEFORE = 0, ARR_FIRST, ARR_NEXT, ARR_AFTER, ARR_DONE };  // JSON array states
enum { WHOLE_BEFORE = 0, WHOLE_DONE };

struct record_reader {
    byte_source *src;
    char *name;
    record_mode mode;
    int state;
    unsigned char *buf;  // unread bytes: buf[pos..len); buf[0] is at stream offset buf_off
    size_t len, pos, cap;
    uint64_t buf_off;
    int eof;             // the source reached its end
    int64_t line;        // line number at buf[pos]
    int broken;          // a layout error or I/O failure: no further records
};

static int reader_fill(record_reader *r) {
    if (r->eof) return 0;
    if (r->pos > 0) {  // keep the unread part at the front
        memmove(r->buf, r->buf + r->pos, r->len - r->pos);
        r->len -= r->pos;
        r->buf_off += r->pos;
        r->pos = 0;
    }
    if (r->cap - r->len < 64 * 1024) {
        r->cap = r->cap ? r->cap * 2 : 256 * 1024;
        r->buf = xrealloc(r->buf, r->cap + 1);
    }
    int64_t n = source_read(r->src, r->buf + r->len, r->cap - r->len);
    if (n < 0) {
        r->broken = 1;
        return -1;
    }
    if (n == 0) r->eof = 1;
    r->len += (size_t)n;
    return (int)(n > 0);
}

static int is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Skip blanks (counting lines); returns the next byte, -1 at the end, -2 on an I/O error.
static int skip_ws(record_reader *r) {
    for (;;) {
        while (r->pos < r->len && is_ws(r->buf[r->pos])) {
            if (r->buf[r->pos] == '\n') r->line++;
            r->pos++;
        }
        if (r->pos < r->len) return r->buf[r->pos];
        int f = reader_fill(r);
        if (f < 0) return -2;
        if (f == 0 && r->pos >= r->len) return -1;
    }
}

// "x.json:12: expected ..., got invalid JSON at line 14 column 3": locate a cJSON parse error.
static int parse_fail(record_reader *r, int64_t line, const unsigned char *text, size_t n, const char *end,
                      const char *what) {
    const unsigned char *e = (const unsigned char *)end;
    if (!e || e < text || e > text + n) e = text;
    int64_t l = line, col = 1;
    for (const unsigned char *p = text; p < e; p++) {
        if (*p == '\n') {
            l++;
            col = 1;
        } else {
            col++;
        }
    }
    char near[40];
    size_t k = 0;
    for (const unsigned char *p = e; p < text + n && k < 24; p++) near[k++] = (*p == '\n' || *p == '\t') ? ' ' : (char)*p;
    near[k] = 0;
    if (l == line)
        return mosft_fail(MOSFT_ERR_INPUT, "%s:%lld: expected %s, got invalid JSON at column %lld near \"%s\"", r->name,
                          (long long)line, what, (long long)col, near);
    return mosft_fail(MOSFT_ERR_INPUT, "%s:%lld: expected %s, got invalid JSON at line %lld column %lld near \"%s\"",
                      r->name, (long long)line, what, (long long)l, (long long)col, near);
}

static cJSON *parse_span(const unsigned char *p, size_t n, const char **end) {
    *end = NULL;
    return cJSON_ParseWithLengthOpts((const char *)p, n, end, 0);
}

static int next_jsonl(record_reader *r, cJSON **out, int64_t *line) {
    for (;;) {
        size_t scan = r->pos;
        unsigned char *nl = NULL;
        for (;;) {
            nl = r->len > scan ? memchr(r->buf + scan, '\n', r->len - scan) : NULL;
            if (nl || r->eof) break;
            size_t rel = r->len - r->pos;
            if (reader_fill(r) < 0) return mosft_error_code();
            scan = r->pos + rel;
        }
        size_t end = nl ? (size_t)(nl - r->buf) : r->len;
        if (!nl && end == r->pos) return MOSFT_OK;  // end of the shard
        unsigned char *p = r->buf + r->pos;
        size_t n = end - r->pos;
        int64_t this_line = r->line;
        r->pos = nl ? end + 1 : end;
        r->line++;
        size_t a = 0;
        while (a < n && is_ws(p[a])) a++;
        if (a == n) continue;  // blank line
        const char *pe;
        cJSON *j = parse_span(p, n, &pe);
        if (!j) return parse_fail(r, this_line, p, n, pe, "one JSON value per line");
        *out = j;
        *line = this_line;
        return MOSFT_OK;
    }
}

// Find the end of the JSON value starting at buf[pos] (its first byte is not blank). On success
// *n is its length and the lines it spans are counted in *nl. Returns 1, 0 (the stream ended
// inside it) or -1 (I/O).
static int scan_value(record_reader *r, size_t *n, int64_t *nl) {
    size_t i = 0;
    int depth = 0, in_str = 0, esc = 0;
    int64_t lines = 0;
    unsigned char c0 = r->buf[r->pos];
    int composite = c0 == '{' || c0 == '[' || c0 == '"';
    for (;;) {
        unsigned char *p = r->buf + r->pos;
        size_t avail = r->len - r->pos;
        for (; i < avail; i++) {
            unsigned char c = p[i];
            if (c == '\n') lines++;
            if (in_str) {
                if (esc) esc = 0;
                else if (c == '\\') esc = 1;
                else if (c == '"') {
                    in_str = 0;
                    if (depth == 0) {  // a top-level string element
                        *n = i + 1;
                        *nl = lines;
                        return 1;
                    }
                }
                continue;
            }
            if (!composite) {  // number, true, false, null: ends at a delimiter
                if (c == ',' || c == ']' || is_ws(c)) {
                    *n = i;
                    *nl = lines - (c == '\n');
                    return 1;
                }
                continue;
            }
            if (c == '"') in_str = 1;
            else if (c == '{' || c == '[') depth++;
            else if (c == '}' || c == ']') {
                if (--depth == 0) {
                    *n = i + 1;
                    *nl = lines;
                    return 1;
                }
            }
        }
        int f = reader_fill(r);
        if (f < 0) return -1;
        if (f == 0) {
            if (!composite && i > 0) {
                *n = i;
                *nl = lines;
                return 1;
            }
            return 0;
        }
    }
}

static int layout_fail(record_reader *r, const char *expected, int c) {
    r->broken = 1;
    if (c == -2) return mosft_error_code();
    char got[32];
    if (c < 0) snprintf(got, sizeof got, "the end of the file");
    else if (c >= 32 && c < 127) snprintf(got, sizeof got, "'%c'", c);
    else snprintf(got, sizeof got, "byte 0x%02x", c);
    return mosft_fail(MOSFT_ERR_INPUT, "%s:%lld: expected %s, got %s", r->name, (long long)r->line, expected, got);
}

static int next_array(record_reader *r, cJSON **out, int64_t *line) {
    for (;;) {
        int c = skip_ws(r);
        switch (r->state) {
        case ARR_BEFORE:
            if (c != '[') return layout_fail(r, "a JSON array '['", c);
            r->pos++;
            r->state = ARR_FIRST;
            continue;
        case ARR_FIRST:
            if (c == ']') {
                r->pos++;
                r->state = ARR_DONE;
                continue;
            }
            break;
        case ARR_AFTER:
            if (c == ',') {
                r->pos++;
                r->state = ARR_NEXT;
                continue;
            }
            if (c == ']') {
                r->pos++;
                r->state = ARR_DONE;
                continue;
            }
            return layout_fail(r, "',' or ']' after an array element", c);
        case ARR_DONE:
            if (c != -1) return layout_fail(r, "nothing after the closing ']'", c);
            return MOSFT_OK;
        default: break;
        }
        // ARR_FIRST / ARR_NEXT: an element starts here.
        if (c < 0 || c == ']' || c == ',') return layout_fail(r, "an array element", c);
        size_t n = 0;
        int64_t nl = 0;
        int s = scan_value(r, &n, &nl);
        if (s < 0) return mosft_error_code();
        if (s == 0) return layout_fail(r, "the end of an array element", -1);
        unsigned char *p = r->buf + r->pos;
        int64_t this_line = r->line;
        r->pos += n;
        r->line += nl;
        r->state = ARR_AFTER;
        const char *pe;
        cJSON *j = parse_span(p, n, &pe);
        if (!j) return parse_fail(r, this_line, p, n, pe, "a JSON array element");
        *out = j;
        *line = this_line;
        return MOSFT_OK;
    }
}

static int next_whole(record_reader *r, cJSON **out, int64_t *line) {
    if (r->state == WHOLE_DONE) return MOSFT_OK;
    for (;;) {
        int f = reader_fill(r);
        if (f < 0) return mosft_error_code();
        if (f == 0) break;
    }
    r->state = WHOLE_DONE;
    unsigned char *p = r->buf + r->pos;
    size_t n = r->len - r->pos;
    int64_t this_line = r->line;
    for (size_t i = 0; i < n; i++)
        if (p[i] == '\n') r->line++;
    r->pos = r->len;
    const char *pe;
    cJSON *j = parse_span(p, n, &pe);
    if (!j) return parse_fail(r, this_line, p, n, pe, "one JSON document");
    *out = j;
    *line = this_line;
    return MOSFT_OK;
}

int record_next(record_reader *r, cJSON **out, int64_t *line) {
    *out = NULL;
    *line = r->line;
    if (r->broken) return mosft_fail(MOSFT_ERR_INPUT, "%s:%lld: the file cannot be read further", r->name, (long long)r->line);
    if (r->mode == REC_AUTO) {
        if (r->buf_off + r->pos == 0) {  // a UTF-8 byte order mark is not JSON
            while (r->len - r->pos < 3 && !r->eof)
                if (reader_fill(r) < 0) return mosft_error_code();
            if (r->len - r->pos >= 3 && !memcmp(r->buf + r->pos, "\xEF\xBB\xBF", 3)) r->pos += 3;
        }
        int c = skip_ws(r);
        if (c == -2) return mosft_error_code();
        r->mode = c == '[' ? REC_JSON_ARRAY : REC_JSONL;
        r->state = 0;
    }
    switch (r->mode) {
    case REC_JSONL: return next_jsonl(r, out, line);
    case REC_JSON_ARRAY: return next_array(r, out, line);
    default: return next_whole(r, out, line);
    }
}

int record_reader_open(record_reader **out, const char *path, record_mode mode, const record_pos *at,
                       const source_http_opts *http) {
    *out = NULL;
    byte_source *src;
    int rc = source_open_at(&src, path, at ? at->offset : 0, http);
    if (rc != MOSFT_OK) return rc;
    record_reader *r = xcalloc(1, sizeof *r);
    r->src = src;
    r->name = xstrdup(path);
    r->mode = at && at->mode != REC_AUTO ? (record_mode)at->mode : mode;
    r->state = at ? at->state : 0;
    r->line = at ? at->line : 1;
    r->buf_off = at ? at->offset : 0;
    if (at && at->mode == REC_AUTO && at->offset != 0) r->mode = mode;  // never saved this way; be safe
    *out = r;
    return MOSFT_OK;
}

int record_reader_can_continue(const record_reader *r) { return !r->broken; }

void record_tell(const record_reader *r, record_pos *pos) {
    pos->offset = r->buf_off + r->pos;
    pos->line = r->line;
    pos->state = r->state;
    pos->mode = r->mode;
}

const char *record_reader_name(const record_reader *r) { return r->name; }
int record_reader_retries(const record_reader *r) { return source_retries(r->src); }

void record_reader_close(record_reader *r) {
    if (!r) return;
    source_close(r->src);
    free(r->buf);
    free(r->name);
    free(r);
}
