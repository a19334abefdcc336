// chat.c: the open-instruct chat template, tokenization and loss mask (see chat.h).
#include "data/chat.h"

#include <stdlib.h>
#include <string.h>

// ---- examples ---------------------------------------------------------------------------------

void chat_example_clear(chat_example *ex) {
    for (int i = 0; i < ex->n; i++) free(ex->msgs[i].text);
    ex->n = 0;
    ex->prompt_completion = 0;
    ex->template_name = NULL;
}

void chat_example_free(chat_example *ex) {
    chat_example_clear(ex);
    free(ex->msgs);
    ex->msgs = NULL;
    ex->cap = 0;
}

void chat_example_add(chat_example *ex, chat_role role, const char *text, size_t len) {
    if (ex->n == ex->cap) {
        ex->cap = ex->cap ? ex->cap * 2 : 4;
        ex->msgs = xrealloc(ex->msgs, (size_t)ex->cap * sizeof *ex->msgs);
    }
    chat_msg *m = &ex->msgs[ex->n++];
    m->role = role;
    m->text = xmalloc(len + 1);
    memcpy(m->text, text, len);
    m->text[len] = 0;
    m->len = len;
}

const char *chat_role_name(chat_role r) {
    return r == ROLE_SYSTEM ? "system" : r == ROLE_USER ? "user" : "assistant";
}

// ---- Python str.strip() -----------------------------------------------------------------------

int py_isspace_cp(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Decode the UTF-8 character at s[i] (n bytes total); *k = its length. Invalid bytes decode as
// themselves (never whitespace above 0x7F, as Python never sees them: json.loads gives valid text).
static uint32_t utf8_at(const unsigned char *s, size_t n, size_t i, size_t *k) {
    unsigned char c = s[i];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + (size_t)len > n) len = 1;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
    for (int j = 1; j < len; j++) cp = (cp << 6) | (s[i + (size_t)j] & 0x3Fu);
    *k = (size_t)len;
    return len == 1 && c >= 0x80 ? 0xFFFD : cp;
}

void py_strip(const char *str, size_t n, size_t *a, size_t *b) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, k;
    while (i < n) {
        if (s[i] < 0x80) {  // fast path: ASCII
            if (!py_isspace_cp(s[i])) break;
            i++;
            continue;
        }
        if (!py_isspace_cp(utf8_at(s, n, i, &k))) break;
        i += k;
    }
    size_t j = n;
    while (j > i) {
        if (s[j - 1] < 0x80) {
            if (!py_isspace_cp(s[j - 1])) break;
            j--;
            continue;
        }
        size_t st = j - 1;  // back to the lead byte
        while (st > i && (s[st] & 0xC0) == 0x80 && j - st < 4) st--;
        uint32_t cp = utf8_at(s, n, st, &k);
        if (st + k != j || !py_isspace_cp(cp)) break;
        j = st;
    }
    *a = i;
    *b = j;
}

// ---- rendering --------------------------------------------------------------------------------

static const char *role_tag(chat_role r) {
    return r == ROLE_SYSTEM ? "<|system|>\n" : r == ROLE_USER ? "<|user|>\n" : "<|assistant|>\n";
}

// The unstripped concatenation of every message; offs[i] = where message i starts (offs[n] = end).
static void render_concat(const chat_example *ex, const char *eos, mosft_buf *out, size_t *offs) {
    size_t base = out->len;
    for (int i = 0; i < ex->n; i++) {
        const chat_msg *m = &ex->msgs[i];
        if (offs) offs[i] = out->len - base;
        size_t a, b;
        py_strip(m->text, m->len, &a, &b);
        buf_append_str(out, role_tag(m->role));
        buf_append(out, m->text + a, b - a);
        if (m->role == ROLE_ASSISTANT) buf_append_str(out, eos);
        buf_append(out, "\n", 1);
    }
    if (offs) offs[ex->n] = out->len - base;
}

static int pc_ws(char c) { return c == ' ' || c == '\n' || c == '\t'; }

void chat_render(const chat_example *ex, const char *eos_text, mosft_buf *out) {
    if (ex->prompt_completion) {
        const chat_msg *p = &ex->msgs[0], *c = &ex->msgs[1];
        buf_append(out, p->text, p->len);
        if (!(p->len && pc_ws(p->text[p->len - 1])) && !(c->len && pc_ws(c->text[0]))) buf_append(out, " ", 1);
        buf_append(out, c->text, c->len);
        buf_append_str(out, eos_text);
        return;
    }
    size_t base = out->len;
    render_concat(ex, eos_text, out, NULL);
    size_t a, b;
    py_strip(out->data + base, out->len - base, &a, &b);
    memmove(out->data + base, out->data + base + a, b - a);
    out->len = base + (b - a);
    buf_cstr(out);
}

// ---- encoding ---------------------------------------------------------------------------------

void chat_tokens_free(chat_tokens *t) {
    free(t->ids);
    free(t->labels);
    memset(t, 0, sizeof *t);
}

void chat_encoder_init(chat_encoder *e, tokenizer *tok, const char *eos_text, int max_seq_len) {
    memset(e, 0, sizeof *e);
    e->tok = tok;
    e->eos_text = xstrdup(eos_text ? eos_text : "");
    e->max_seq_len = max_seq_len;
}

void chat_encoder_free(chat_encoder *e) {
    free(e->eos_text);
    buf_free(&e->text);
    tok_ids_free(&e->scratch);
    tok_ids_free(&e->full);
    free(e->offs);
    memset(e, 0, sizeof *e);
}

// Token count of tokenizer(text[0:n], truncation at max_seq_len), BOS included.
static int prefix_tokens(chat_encoder *e, const char *text, size_t n) {
    e->scratch.n = 0;
    tokenizer_encode(e->tok, text, n, 1, &e->scratch);
    return (int)e->scratch.n < e->max_seq_len ? (int)e->scratch.n : e->max_seq_len;
}

static void tokens_set(chat_encoder *e, chat_tokens *out, const tok_ids *ids) {
    int n = (int)ids->n;
    out->truncated = n > e->max_seq_len;
    if (out->truncated) n = e->max_seq_len;
    if (n > out->cap) {
        out->cap = n;
        out->ids = xrealloc(out->ids, (size_t)n * sizeof(int32_t));
        out->labels = xrealloc(out->labels, (size_t)n * sizeof(int32_t));
    }
    out->n = n;
    memcpy(out->ids, ids->ids, (size_t)n * sizeof(int32_t));
    memcpy(out->labels, ids->ids, (size_t)n * sizeof(int32_t));
}

static void mask_range(chat_tokens *out, int start, int end) {
    if (end > out->n) end = out->n;
    for (int i = start; i < end; i++) out->labels[i] = -100;
}

static void count_supervised(chat_tokens *out) {
    int s = 0;
    for (int i = 0; i < out->n; i++) s += out->labels[i] != -100;
    out->n_supervised = s;
}

int chat_encode(chat_encoder *e, const chat_example *ex, chat_tokens *out) {
    mosft_buf *t = &e->text;
    t->len = 0;
    if (ex->prompt_completion) {
        chat_render(ex, e->eos_text, t);
        e->full.n = 0;
        tokenizer_encode(e->tok, t->data, t->len, 1, &e->full);
        tokens_set(e, out, &e->full);
        mask_range(out, 0, prefix_tokens(e, ex->msgs[0].text, ex->msgs[0].len));
        count_supervised(out);
        return MOSFT_OK;
    }
    if (ex->n + 1 > e->offs_cap) {
        e->offs_cap = ex->n + 1;
        e->offs = xrealloc(e->offs, (size_t)e->offs_cap * sizeof(size_t));
    }
    render_concat(ex, e->eos_text, t, e->offs);
    size_t a, b;
    py_strip(t->data, t->len, &a, &b);
    e->full.n = 0;
    tokenizer_encode(e->tok, t->data + a, b - a, 1, &e->full);
    tokens_set(e, out, &e->full);
    // Every prefix below is a prefix of the unstripped concatenation, whose leading bytes are a role
    // tag (never whitespace), so a == 0 and prefix offsets index the same string.
    MOSFT_ASSERT(a == 0);
    static const size_t k_asst_tag = sizeof "<|assistant|>\n" - 1;
    int prev_end = -1;  // token count of concat(messages[:i]) when already known
    for (int i = 0; i < ex->n; i++) {
        if (ex->msgs[i].role == ROLE_ASSISTANT) {
            prev_end = -1;
            continue;
        }
        int start = i == 0 ? 0 : prev_end >= 0 ? prev_end : prefix_tokens(e, t->data, e->offs[i]);
        int end;
        if (i + 1 < ex->n && ex->msgs[i + 1].role == ROLE_ASSISTANT) {
            end = prefix_tokens(e, t->data, e->offs[i + 1] + k_asst_tag);
            prev_end = -1;
        } else {
            end = prefix_tokens(e, t->data, e->offs[i + 1]);
            prev_end = end;  // = start of message i+1
        }
        mask_range(out, start, end);
        if (end >= e->max_seq_len) break;
    }
    count_supervised(out);
    return MOSFT_OK;
}
