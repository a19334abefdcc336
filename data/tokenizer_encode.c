// tokenizer_encode.c: text -> ids, in HF tokenizers' order:
//   1. added tokens matched in the raw text (non-normalized ones; leftmost-longest, with single_word,
//      lstrip, rstrip), each becoming its id;
//   2. every other segment normalized on its own (so Llama 2's Prepend("▁") applies after each added
//      token), then split on the normalized added tokens;
//   3. the pre-tokenizers split each piece (Llama 3's regex, ByteLevel, Metaspace, literal Split);
//   4. the BPE model encodes each piece (tokenizer_bpe.c);
//   5. the post-processor puts its special tokens around the sequence (add_special only).
// Pre-tokenization streams: each step hands its pieces straight to the next one, nothing is collected.
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer_internal.h"
#include "data/unicode.h"

// ---- the added-token trie ------------------------------------------------------------------------

static int32_t trie_node_new(tok_trie *tr, uint8_t byte) {
    if (tr->n == tr->cap) {
        tr->cap = tr->cap ? tr->cap * 2 : 64;
        tr->nodes = xrealloc(tr->nodes, (size_t)tr->cap * sizeof *tr->nodes);
    }
    tok_trie_node *nd = &tr->nodes[tr->n];
    nd->child = nd->sibling = nd->term = -1;
    nd->byte = byte;
    return tr->n++;
}

static void trie_insert(tok_trie *tr, const uint8_t *p, size_t n, int32_t term) {
    int32_t node = tr->root[p[0]];
    if (node < 0) node = tr->root[p[0]] = trie_node_new(tr, p[0]);
    for (size_t i = 1; i < n; i++) {
        int32_t c = tr->nodes[node].child;
        while (c >= 0 && tr->nodes[c].byte != p[i]) c = tr->nodes[c].sibling;
        if (c < 0) {
            c = trie_node_new(tr, p[i]);
            tr->nodes[c].sibling = tr->nodes[node].child;
            tr->nodes[node].child = c;
        }
        node = c;
    }
    if (tr->nodes[node].term < 0) tr->nodes[node].term = term;  // the first of equal patterns wins
}

// HF's pattern order: special tokens first, then the others, each in file order.
void tok_trie_build(tokenizer *t, tok_trie *tr, int want_normalized) {
    memset(tr, 0, sizeof *tr);
    for (int i = 0; i < 256; i++) tr->root[i] = -1;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < t->n_added; i++) {
            const tok_added *a = &t->added[i];
            if (a->special != (pass == 0) || a->normalized != want_normalized || a->pat_len == 0) continue;
            trie_insert(tr, (const uint8_t *)tok_arena(t, a->pat_off), a->pat_len, i);
        }
}

void tok_trie_free(tok_trie *tr) {
    free(tr->nodes);
    tr->nodes = NULL;
    tr->n = tr->cap = 0;
}

// ---- character classes at byte positions (valid UTF-8) ----------------------------------------------

static inline unsigned cls_at(const uint8_t *s, size_t i, size_t *len) {
    if (s[i] < 0x80) {
        *len = 1;
        return unicode_class(s[i]);
    }
    return unicode_class(utf8_decode_valid(s + i, len));
}

// Start of the last character before byte position i (> 0).
static inline size_t prev_char(const uint8_t *s, size_t i) {
    do i--;
    while (i > 0 && (s[i] & 0xC0) == 0x80);
    return i;
}

// ---- normalizers --------------------------------------------------------------------------------------

static void norm_apply(const tok_norm_op *op, const char *s, size_t n, mosft_buf *out) {
    out->len = 0;
    switch (op->kind) {
    case NORM_PREPEND:
        if (n) buf_append(out, op->a, op->a_len);
        buf_append(out, s, n);
        break;
    case NORM_REPLACE: {
        size_t i = 0;
        while (i < n) {
            const char *p = memmem(s + i, n - i, op->a, op->a_len);
            if (!p) break;
            buf_append(out, s + i, (size_t)(p - (s + i)));
            buf_append(out, op->b, op->b_len);
            i = (size_t)(p - s) + op->a_len;
        }
        buf_append(out, s + i, n - i);
        break;
    }
    case NORM_STRIP: {
        const uint8_t *u = (const uint8_t *)s;
        size_t a = 0, b = n, l;
        if (op->left)
            while (a < b && (cls_at(u, a, &l) & UCLASS_SPACE)) a += l;
        if (op->right)
            while (b > a) {
                size_t p = prev_char(u, b);
                if (!(cls_at(u, p, &l) & UCLASS_SPACE)) break;
                b = p;
            }
        buf_append(out, s + a, b - a);
        break;
    }
    }
}

// The result ends in t->norm_a (norm_b is the other ping-pong buffer).
void tok_normalize(tokenizer *t, const char *s, size_t n, mosft_buf *out) {
    MOSFT_ASSERT(out == &t->norm_a);
    t->norm_a.len = 0;
    buf_append(&t->norm_a, s, n);
    for (int k = 0; k < t->n_norm; k++) {
        norm_apply(&t->norm[k], t->norm_a.data, t->norm_a.len, &t->norm_b);
        mosft_buf tmp = t->norm_a;
        t->norm_a = t->norm_b;
        t->norm_b = tmp;
    }
}

// ---- the pre-tokenizer regexes --------------------------------------------------------------------
// Both patterns match at every position (every character is a letter, a number, whitespace or
// something else, and each has a branch), so a split is a sequence of consecutive matches. Each function
// returns the end of the match at i (> i), trying the branches in the pattern's order with the
// backtracking engine's semantics (Oniguruma, as HF tokenizers).

enum { P_OTHER = 0 };
#define IS_L(k) ((k) & UCLASS_L)
#define IS_N(k) ((k) & UCLASS_N)
#define IS_S(k) ((k) & UCLASS_SPACE)
#define IS_P(k) (!((k) & (UCLASS_L | UCLASS_N | UCLASS_SPACE)))  // [^\s\p{L}\p{N}]

static inline size_t run_of(const uint8_t *s, size_t n, size_t i, unsigned mask) {
    size_t l;
    while (i < n && (cls_at(s, i, &l) & mask)) i += l;
    return i;
}
static inline size_t run_of_p(const uint8_t *s, size_t n, size_t i) {
    size_t l;
    while (i < n && IS_P(cls_at(s, i, &l))) i += l;
    return i;
}

// 's|'t|'re|'ve|'m|'ll|'d after the apostrophe at i; case-insensitive: Unicode simple case folding also
// folds U+017F (ſ) to s. Returns the end, or 0.
static size_t contraction(const uint8_t *s, size_t n, size_t i, int ci) {
    size_t j = i + 1;
    if (j >= n) return 0;
    uint8_t c = s[j], d = j + 1 < n ? s[j + 1] : 0;
    if (ci) {
        if (c == 0xC5 && d == 0xBF) return j + 2;  // U+017F LATIN SMALL LETTER LONG S
        c |= (c >= 'A' && c <= 'Z') ? 0x20 : 0;
        d |= (d >= 'A' && d <= 'Z') ? 0x20 : 0;
    }
    if (c == 's' || c == 't' || c == 'm' || c == 'd') return j + 1;
    if ((c == 'r' || c == 'v') && d == 'e') return j + 2;
    if (c == 'l' && d == 'l') return j + 2;
    return 0;
}

// Whitespace branches shared by both patterns: \s+(?!\S) then \s+ (GPT-2), with Llama 3's \s*[\r\n]+
// before them. `nl`: try that branch.
static size_t whitespace_branches(const uint8_t *s, size_t n, size_t i, int nl) {
    size_t e = i, last_start = i, last_nl = SIZE_MAX, l;
    while (e < n && IS_S(cls_at(s, e, &l))) {
        if (s[e] == '\r' || s[e] == '\n') last_nl = e;
        last_start = e;
        e += l;
    }
    if (nl && last_nl != SIZE_MAX) return last_nl + 1;  // \s*[\r\n]+: backtrack to the last newline
    if (e == n) return e;                                // \s+(?!\S) at the end of the text
    if (last_start > i) return last_start;               // \s+(?!\S): leave the last space to the next
    return e;                                            // \s+
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
static size_t llama3_match(const uint8_t *s, size_t n, size_t i) {
    size_t l0, l1;
    uint8_t c0 = s[i];
    unsigned k0 = cls_at(s, i, &l0);
    if (c0 == '\'') {
        size_t e = contraction(s, n, i, 1);
        if (e) return e;
    }
    if (IS_L(k0)) return run_of(s, n, i + l0, UCLASS_L);
    if (c0 != '\r' && c0 != '\n' && !IS_N(k0) && i + l0 < n && IS_L(cls_at(s, i + l0, &l1)))
        return run_of(s, n, i + l0 + l1, UCLASS_L);
    if (IS_N(k0)) {
        size_t e = i + l0;
        for (int k = 1; k < 3 && e < n && IS_N(cls_at(s, e, &l1)); k++) e += l1;
        return e;
    }
    size_t j = SIZE_MAX;
    if (IS_P(k0)) j = i;
    else if (c0 == ' ' && i + 1 < n && IS_P(cls_at(s, i + 1, &l1))) j = i + 1;
    if (j != SIZE_MAX) {
        size_t e = run_of_p(s, n, j);
        while (e < n && (s[e] == '\r' || s[e] == '\n')) e++;
        return e;
    }
    return whitespace_branches(s, n, i, 1);
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+  (GPT-2, ByteLevel use_regex)
static size_t gpt2_match(const uint8_t *s, size_t n, size_t i) {
    size_t l0, l1;
    unsigned k0 = cls_at(s, i, &l0);
    if (s[i] == '\'') {
        size_t e = contraction(s, n, i, 0);
        if (e) return e;
    }
    size_t j = i;
    unsigned k = k0;
    if (s[i] == ' ' && i + 1 < n) {
        unsigned k1 = cls_at(s, i + 1, &l1);
        if (!IS_S(k1)) {
            j = i + 1;
            k = k1;
        }
    }
    if (IS_L(k)) return run_of(s, n, j, UCLASS_L);
    if (IS_N(k)) return run_of(s, n, j, UCLASS_N);
    if (IS_P(k)) return run_of_p(s, n, j);
    return whitespace_branches(s, n, i, 0);
}

// ---- pre-tokenizer steps --------------------------------------------------------------------------

static void pre_run(tokenizer *t, int step, const char *s, size_t n, int at_start, tok_ids *out);

// Turns HF's (offsets, is_match) sequence into pieces by a SplitDelimiterBehavior, keeping only the
// last piece pending (every behavior only ever extends the last piece).
typedef struct {
    tokenizer *t;
    int step, at_start, behavior, prev_match, has;
    const char *s;
    size_t ps, pe;
    tok_ids *out;
} splitter;

static inline void sp_emit(splitter *sp, size_t a, size_t b) {
    if (b > a) pre_run(sp->t, sp->step + 1, sp->s + a, b - a, sp->at_start && a == 0, sp->out);
}
static inline void sp_push(splitter *sp, size_t a, size_t b) {
    if (sp->has) sp_emit(sp, sp->ps, sp->pe);
    sp->ps = a;
    sp->pe = b;
    sp->has = 1;
}
static inline void sp_extend_or_push(splitter *sp, size_t a, size_t b) {
    if (sp->has) sp->pe = b;
    else sp_push(sp, a, b);
}
static void sp_feed(splitter *sp, size_t a, size_t b, int is_match) {
    switch (sp->behavior) {
    case SPLIT_ISOLATED: sp_emit(sp, a, b); break;
    case SPLIT_REMOVED:
        if (!is_match) sp_emit(sp, a, b);
        break;
    case SPLIT_MERGED_PREV:
        if (is_match && !sp->prev_match) sp_extend_or_push(sp, a, b);
        else sp_push(sp, a, b);
        break;
    case SPLIT_MERGED_NEXT:
        if (is_match && !sp->prev_match) sp_push(sp, a, b);
        else sp_extend_or_push(sp, a, b);
        break;
    case SPLIT_CONTIGUOUS:
        if (is_match == sp->prev_match) sp_extend_or_push(sp, a, b);
        else sp_push(sp, a, b);
        break;
    }
    sp->prev_match = is_match;
}
static void sp_flush(splitter *sp) {
    if (sp->has) sp_emit(sp, sp->ps, sp->pe);
    sp->has = 0;
}

static void split_regex(splitter *sp, size_t n, int gpt2, int invert) {
    const uint8_t *u = (const uint8_t *)sp->s;
    for (size_t i = 0; i < n;) {
        size_t e = gpt2 ? gpt2_match(u, n, i) : llama3_match(u, n, i);
        sp_feed(sp, i, e, !invert);
        i = e;
    }
    sp_flush(sp);
}

static void split_literal(splitter *sp, size_t n, const char *pat, size_t pn, int invert) {
    size_t prev = 0;
    for (size_t i = 0; i < n;) {
        const char *p = memmem(sp->s + i, n - i, pat, pn);
        if (!p) break;
        size_t a = (size_t)(p - sp->s);
        if (a > prev) sp_feed(sp, prev, a, invert);
        sp_feed(sp, a, a + pn, !invert);
        prev = i = a + pn;
    }
    if (prev < n) sp_feed(sp, prev, n, invert);
    sp_flush(sp);
}

static void pre_run(tokenizer *t, int step, const char *s, size_t n, int at_start, tok_ids *out) {
    if (n == 0) return;  // HF drops empty pieces
    if (step == t->n_pre) {
        tok_bpe_encode(t, s, n, out);
        return;
    }
    tok_pretok *p = &t->pre[step];
    splitter sp = {t, step, at_start, p->behavior, 0, 0, s, 0, 0, out};
    switch (p->kind) {
    case PRE_SPLIT_LLAMA3:
    case PRE_SPLIT_GPT2: split_regex(&sp, n, p->kind == PRE_SPLIT_GPT2, p->invert); break;
    case PRE_SPLIT_STRING: split_literal(&sp, n, p->pattern, p->pattern_len, p->invert); break;
    case PRE_BYTELEVEL:
        // Bytes map to characters 1:1 (GPT-2 table); the vocabulary is kept in raw bytes, so the
        // mapping itself is the identity here.
        if (p->add_prefix_space && s[0] != ' ') {
            p->scratch.len = 0;
            buf_append(&p->scratch, " ", 1);
            buf_append(&p->scratch, s, n);
            sp.s = s = p->scratch.data;
            n = p->scratch.len;
        }
        if (p->use_regex) {
            sp.behavior = SPLIT_ISOLATED;
            split_regex(&sp, n, 1, 0);
        } else {
            pre_run(t, step + 1, s, n, at_start, out);
        }
        break;
    case PRE_METASPACE: {
        p->scratch.len = 0;
        int starts_repl = n >= p->repl_len && !memcmp(s, p->repl, p->repl_len);
        if (s[0] == ' ') starts_repl = 1;  // the replace happens before the check
        if (!starts_repl && (p->prepend_scheme == PREPEND_ALWAYS || (p->prepend_scheme == PREPEND_FIRST && at_start)))
            buf_append(&p->scratch, p->repl, p->repl_len);
        size_t a = 0;
        for (size_t i = 0; i < n; i++)
            if (s[i] == ' ') {
                buf_append(&p->scratch, s + a, i - a);
                buf_append(&p->scratch, p->repl, p->repl_len);
                a = i + 1;
            }
        buf_append(&p->scratch, s + a, n - a);
        sp.s = p->scratch.data;
        if (p->split) {
            sp.behavior = SPLIT_MERGED_NEXT;
            split_literal(&sp, p->scratch.len, p->repl, p->repl_len, 0);
        } else {
            pre_run(t, step + 1, p->scratch.data, p->scratch.len, at_start, out);
        }
        break;
    }
    }
}

// ---- added tokens -----------------------------------------------------------------------------------

static void segment(tokenizer *t, const char *s, size_t n, int at_start, int normalized_stage, tok_ids *out);

// HF AddedVocabulary::find_matches over s[0..n): the gaps go to `segment`, the matches become ids.
static void split_added(tokenizer *t, const tok_trie *tr, const char *s, size_t n, int at_start,
                        int normalized_stage, tok_ids *out) {
    const uint8_t *u = (const uint8_t *)s;
    size_t start_offset = 0, i = 0;
    while (i < n) {
        int32_t node = tr->root[u[i]];
        if (node < 0) {
            i++;
            continue;
        }
        int32_t best = -1;
        size_t best_end = 0;
        for (size_t j = i;;) {
            if (tr->nodes[node].term >= 0) {
                best = tr->nodes[node].term;
                best_end = j + 1;
            }
            if (++j >= n) break;
            int32_t c = tr->nodes[node].child;
            while (c >= 0 && tr->nodes[c].byte != u[j]) c = tr->nodes[c].sibling;
            if (c < 0) break;
            node = c;
        }
        if (best < 0) {
            i++;
            continue;
        }
        const tok_added *a = &t->added[best];
        size_t start = i, stop = best_end;
        i = best_end;  // the automaton goes on after this match whether it is kept or not
        if (a->special && !t->split_special) continue;
        size_t l;
        if (a->single_word) {
            int word_before = start > 0 && (cls_at(u, prev_char(u, start), &l) & UCLASS_WORD);
            int word_after = stop < n && (cls_at(u, stop, &l) & UCLASS_WORD);
            if (word_before || word_after) continue;
        }
        if (a->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                size_t p = prev_char(u, ns);
                if (!(cls_at(u, p, &l) & UCLASS_SPACE)) break;
                ns = p;
            }
            start = ns > start_offset ? ns : start_offset;
        }
        if (a->rstrip)
            while (stop < n && (cls_at(u, stop, &l) & UCLASS_SPACE)) stop += l;
        if (start_offset < start) segment(t, s + start_offset, start - start_offset, at_start && start_offset == 0,
                                          normalized_stage, out);
        tok_ids_push(out, a->id);
        start_offset = stop;
    }
    if (start_offset < n) segment(t, s + start_offset, n - start_offset, at_start && start_offset == 0,
                                  normalized_stage, out);
}

// A gap between added tokens: at the raw stage, normalize it and look for the normalized added tokens;
// at the normalized stage, pre-tokenize it.
static void segment(tokenizer *t, const char *s, size_t n, int at_start, int normalized_stage, tok_ids *out) {
    if (n == 0) return;
    if (normalized_stage) {
        pre_run(t, 0, s, n, at_start, out);
        return;
    }
    if (t->n_norm) {
        tok_normalize(t, s, n, &t->norm_a);
        s = t->norm_a.data;
        n = t->norm_a.len;
        // norm_a stays untouched until this segment is done: pre-tokenizers use their own buffers.
    }
    if (t->trie_norm.n) split_added(t, &t->trie_norm, s, n, at_start, 1, out);
    else if (n) pre_run(t, 0, s, n, at_start, out);
}

int tokenizer_encode(tokenizer *t, const char *text, size_t len, int add_special, tok_ids *out) {
    // HF takes a Rust str, which is valid UTF-8: repair ill-formed input the way Python's
    // bytes.decode(errors="replace") would, so what reaches the regexes is always valid.
    if (utf8_valid_prefix((const uint8_t *)text, len) != len) {
        t->clean.len = 0;
        utf8_append_lossy(&t->clean, (const uint8_t *)text, len);
        text = t->clean.data;
        len = t->clean.len;
    }
    if (add_special)
        for (int i = 0; i < t->n_post_prefix; i++) tok_ids_push(out, t->post_prefix[i]);
    if (t->trie_raw.n) split_added(t, &t->trie_raw, text, len, 1, 0, out);
    else segment(t, text, len, 1, 0, out);
    if (add_special)
        for (int i = 0; i < t->n_post_suffix; i++) tok_ids_push(out, t->post_suffix[i]);
    return MOSFT_OK;
}
