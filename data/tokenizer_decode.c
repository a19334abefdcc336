// tokenizer_decode.c: ids -> text, as HF tokenizers' Tokenizer::decode: ids become their token strings
// (added tokens by content; unknown ids are skipped; special ones too with skip_special), each decoder
// of the chain maps the list of strings to a new list, and the result is their concatenation ("" joined;
// " " joined when the tokenizer has no decoder).
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer_internal.h"
#include "data/unicode.h"

// ---- the GPT-2 byte <-> character table -----------------------------------------------------------
// Printable Latin-1 bytes map to themselves; the other 68 bytes to U+0100 + k, in byte order.
static inline int byte_is_printable(int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; }

uint32_t tok_byte_to_char(uint8_t b) {
    if (byte_is_printable(b)) return b;
    uint32_t k = 0;
    for (int c = 0; c < b; c++) k += !byte_is_printable(c);
    return 0x100 + k;
}

int tok_char_to_byte(uint32_t cp) {
    if (cp < 0x100) return byte_is_printable((int)cp) ? (int)cp : -1;
    if (cp >= 0x100 + 68) return -1;
    uint32_t k = cp - 0x100;
    for (int b = 0; b < 256; b++)
        if (!byte_is_printable(b) && k-- == 0) return b;
    return -1;
}

// ---- a list of strings in an arena ---------------------------------------------------------------------
typedef struct {
    mosft_buf text;
    size_t *off, *len;
    size_t n, cap;
} strlist;

static void sl_begin(strlist *l) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 64;
        l->off = xrealloc(l->off, l->cap * sizeof *l->off);
        l->len = xrealloc(l->len, l->cap * sizeof *l->len);
    }
    l->off[l->n] = l->text.len;
    l->len[l->n] = 0;
    l->n++;
}
static void sl_add(strlist *l, const void *p, size_t n) {  // append to the last string
    buf_append(&l->text, p, n);
    l->len[l->n - 1] += n;
}
static void sl_free(strlist *l) {
    buf_free(&l->text);
    free(l->off);
    free(l->len);
}
static inline const char *sl_str(const strlist *l, size_t i) { return l->text.data + l->off[i]; }

// ---- decoders -------------------------------------------------------------------------------------------

// Rust u8::from_str_radix(s, 16) on the 2 bytes of "<0xAB>" (an optional '+', then hex digits).
static int parse_hex_byte(const char *s) {
    int v = 0, i = s[0] == '+' ? 1 : 0;
    if (i == 2) return -1;
    for (; i < 2; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static void flush_bytes(strlist *dst, mosft_buf *bytes) {
    if (!bytes->len) return;
    if (utf8_valid_prefix((const uint8_t *)bytes->data, bytes->len) == bytes->len) {
        sl_begin(dst);
        sl_add(dst, bytes->data, bytes->len);
    } else {
        for (size_t k = 0; k < bytes->len; k++) {  // HF: one U+FFFD per byte when the run is not UTF-8
            sl_begin(dst);
            sl_add(dst, "\xEF\xBF\xBD", 3);
        }
    }
    bytes->len = 0;
}

static void decode_step(const tok_decoder *d, const strlist *src, strlist *dst) {
    dst->n = 0;
    dst->text.len = 0;
    switch (d->kind) {
    case DEC_REPLACE:
        for (size_t i = 0; i < src->n; i++) {
            const char *s = sl_str(src, i);
            size_t n = src->len[i], a = 0;
            sl_begin(dst);
            while (a < n) {
                const char *p = d->a_len ? memmem(s + a, n - a, d->a, d->a_len) : NULL;
                if (!p) break;
                sl_add(dst, s + a, (size_t)(p - (s + a)));
                sl_add(dst, d->b, d->b_len);
                a = (size_t)(p - s) + d->a_len;
            }
            sl_add(dst, s + a, n - a);
        }
        break;
    case DEC_BYTEFALLBACK: {
        mosft_buf bytes = {0};
        for (size_t i = 0; i < src->n; i++) {
            const char *s = sl_str(src, i);
            int b = -1;
            if (src->len[i] == 6 && !memcmp(s, "<0x", 3) && s[5] == '>') b = parse_hex_byte(s + 3);
            if (b >= 0) {
                char c = (char)b;
                buf_append(&bytes, &c, 1);
                continue;
            }
            flush_bytes(dst, &bytes);
            sl_begin(dst);
            sl_add(dst, s, src->len[i]);
        }
        flush_bytes(dst, &bytes);
        buf_free(&bytes);
        break;
    }
    case DEC_FUSE:
        sl_begin(dst);
        for (size_t i = 0; i < src->n; i++) sl_add(dst, sl_str(src, i), src->len[i]);
        break;
    case DEC_STRIP: {
        char cs[4];
        size_t cl = utf8_encode(d->strip_char, cs);
        for (size_t i = 0; i < src->n; i++) {
            const char *s = sl_str(src, i);
            size_t a = 0, b = src->len[i];
            for (int k = 0; k < d->start && b - a >= cl && !memcmp(s + a, cs, cl); k++) a += cl;
            for (int k = 0; k < d->stop && b - a >= cl && !memcmp(s + b - cl, cs, cl); k++) b -= cl;
            sl_begin(dst);
            sl_add(dst, s + a, b - a);
        }
        break;
    }
    case DEC_BYTELEVEL: {
        // Every token whose characters are all in the table becomes its bytes; any other one stays as
        // its UTF-8. All of it is then read back as UTF-8, lossily, into one string.
        mosft_buf bytes = {0};
        for (size_t i = 0; i < src->n; i++) {
            const uint8_t *s = (const uint8_t *)sl_str(src, i);
            size_t n = src->len[i], mark = bytes.len, l;
            int all = 1;
            for (size_t k = 0; k < n; k += l) {
                int b = tok_char_to_byte(utf8_decode_valid(s + k, &l));
                if (b < 0) {
                    all = 0;
                    break;
                }
                char c = (char)b;
                buf_append(&bytes, &c, 1);
            }
            if (!all) {
                bytes.len = mark;
                buf_append(&bytes, s, n);
            }
        }
        sl_begin(dst);
        utf8_append_lossy(&dst->text, (const uint8_t *)bytes.data, bytes.len);
        dst->len[0] = dst->text.len;
        buf_free(&bytes);
        break;
    }
    case DEC_METASPACE: {
        char rs[4];
        size_t rl = utf8_encode(d->strip_char, rs);
        for (size_t i = 0; i < src->n; i++) {
            const char *s = sl_str(src, i);
            size_t n = src->len[i], a = 0;
            sl_begin(dst);
            while (a < n) {
                const char *p = memmem(s + a, n - a, rs, rl);
                if (!p) break;
                sl_add(dst, s + a, (size_t)(p - (s + a)));
                if (!(i == 0 && d->prepend_scheme != PREPEND_NEVER)) sl_add(dst, " ", 1);
                a = (size_t)(p - s) + rl;
            }
            sl_add(dst, s + a, n - a);
        }
        break;
    }
    }
}

char *tokenizer_decode(const tokenizer *t, const int32_t *ids, size_t n, int skip_special) {
    strlist a = {0}, b = {0};
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->n_ids || t->str_off[id] == UINT32_MAX) continue;
        if (skip_special && t->added_of[id] >= 0 && t->added[t->added_of[id]].special) continue;
        sl_begin(&a);
        sl_add(&a, tok_arena(t, t->str_off[id]), t->str_len[id]);
    }
    mosft_buf out = {0};
    if (t->has_decoder) {
        strlist *src = &a, *dst = &b;
        for (int k = 0; k < t->n_dec; k++) {
            decode_step(&t->dec[k], src, dst);
            strlist *tmp = src;
            src = dst;
            dst = tmp;
        }
        for (size_t i = 0; i < src->n; i++) buf_append(&out, sl_str(src, i), src->len[i]);
    } else {
        for (size_t i = 0; i < a.n; i++) {
            if (i) buf_append(&out, " ", 1);
            buf_append(&out, sl_str(&a, i), a.len[i]);
        }
    }
    sl_free(&a);
    sl_free(&b);
    return buf_cstr(&out);
}
