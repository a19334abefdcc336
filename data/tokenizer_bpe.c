// tokenizer_bpe.c: the BPE model: hash tables for the vocabulary and the merges, the merge loop of one
// word (a binary heap of (rank, position) over a linked list of symbols, as HF tokenizers' Word::merge_all:
// the lowest rank first, the leftmost among equal ranks), and the pre-token cache.
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer_internal.h"
#include "data/unicode.h"

// ---- hashing ---------------------------------------------------------------------------------------

uint32_t tok_hash(const void *p, size_t n) {
    const uint8_t *s = p;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
        s += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, s, n);
    h = (h ^ w) * 0x94d049bb133111ebull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return (uint32_t)h;
}

static uint32_t pow2_at_least(size_t n) {
    uint32_t c = 16;
    while (c < n) c *= 2;
    return c;
}

void tok_strmap_init(tok_strmap *m, size_t n_keys) {
    uint32_t cap = pow2_at_least(n_keys * 2 + 1);  // load factor <= 1/2
    m->slots = xcalloc(cap, sizeof *m->slots);
    m->mask = cap - 1;
}

void tok_strmap_free(tok_strmap *m) {
    free(m->slots);
    m->slots = NULL;
}

int tok_strmap_insert(tok_strmap *m, const tokenizer *t, const uint32_t *offs, const uint32_t *lens,
                      const char *key, size_t n, int32_t id) {
    uint32_t h = tok_hash(key, n);
    for (uint32_t i = h & m->mask;; i = (i + 1) & m->mask) {
        uint64_t s = m->slots[i];
        if (!s) {
            m->slots[i] = ((uint64_t)h << 32) | (uint32_t)(id + 1);
            return 1;
        }
        if ((uint32_t)(s >> 32) == h) {
            int32_t o = (int32_t)(uint32_t)s - 1;
            if (lens[o] == n && !memcmp(tok_arena(t, offs[o]), key, n)) return 0;
        }
    }
}

int32_t tok_strmap_get(const tok_strmap *m, const tokenizer *t, const uint32_t *offs, const uint32_t *lens,
                       const char *key, size_t n) {
    uint32_t h = tok_hash(key, n);
    for (uint32_t i = h & m->mask;; i = (i + 1) & m->mask) {
        uint64_t s = m->slots[i];
        if (!s) return -1;
        if ((uint32_t)(s >> 32) == h) {
            int32_t o = (int32_t)(uint32_t)s - 1;
            if (lens[o] == n && !memcmp(tok_arena(t, offs[o]), key, n)) return o;
        }
    }
}

// ---- merges ------------------------------------------------------------------------------------------

static inline uint32_t merge_hash(uint64_t key) { return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32); }

void tok_merges_init(tokenizer *t, size_t n) {
    uint32_t cap = pow2_at_least(n * 2 + 1);
    t->merges = xmalloc(cap * sizeof *t->merges);
    for (uint32_t i = 0; i < cap; i++) t->merges[i].key = UINT64_MAX;
    t->merge_mask = cap - 1;
}

// A later duplicate of a pair replaces the earlier one (HF collects the merges into a HashMap).
void tok_merges_put(tokenizer *t, int32_t a, int32_t b, uint32_t rank, int32_t new_id) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (uint32_t i = merge_hash(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        tok_merge_slot *s = &t->merges[i];
        if (s->key == UINT64_MAX || s->key == key) {
            if (s->key == UINT64_MAX) t->n_merges++;
            s->key = key;
            s->rank = rank;
            s->new_id = (uint32_t)new_id;
            return;
        }
    }
}

static inline const tok_merge_slot *merge_get(const tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (uint32_t i = merge_hash(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        const tok_merge_slot *s = &t->merges[i];
        if (s->key == key) return s;
        if (s->key == UINT64_MAX) return NULL;
    }
}

// ---- the merge loop of one word ----------------------------------------------------------------------

static inline void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p] <= v) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static inline uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], v = h[--(*n)];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    if (m) h[i] = v;
    return top;
}

static inline void sym_add(tokenizer *t, size_t *n, int32_t id) {
    if (*n == t->cap_syms) {
        t->cap_syms = t->cap_syms ? t->cap_syms * 2 : 256;
        t->syms = xrealloc(t->syms, t->cap_syms * sizeof *t->syms);
    }
    tok_sym *s = &t->syms[*n];
    s->id = id;
    s->prev = (int32_t)*n - 1;
    s->next = (int32_t)*n + 1;
    s->alive = 1;
    (*n)++;
}

// The initial symbols of a word (HF BPE::merge_word): one per character (per byte in byte-level mode),
// <0xXX> byte tokens for a character missing from the vocabulary (byte_fallback), else the unk token
// (consecutive unknowns fused into one with fuse_unk), else nothing. A pending unk is written only when
// the next known character (or the end) comes, exactly as HF does.
static size_t word_init(tokenizer *t, const uint8_t *s, size_t n) {
    size_t ns = 0;
    int pending_unk = 0;
    for (size_t i = 0; i < n;) {
        size_t clen = 1;
        int32_t one = -1;
        int kind;
        if (t->byte_level) {
            kind = t->byte_init_kind[s[i]];
        } else {
            clen = utf8_len(s[i]);
            if (clen > n - i) clen = n - i;
            one = s[i] < 0x80 ? t->ascii_id[s[i]] : tok_model_lookup(t, (const char *)s + i, clen);
            kind = one >= 0 ? BYTE_FOUND : t->unk_id >= 0 ? BYTE_UNK : BYTE_DROP;
            if (one < 0 && t->byte_fallback) {
                int all = 1;
                for (size_t k = 0; k < clen; k++) all &= t->byte_fallback_id[s[i + k]] >= 0;
                if (all) kind = BYTE_FALLBACK;
            }
        }
        switch (kind) {
        case BYTE_FOUND:
            if (pending_unk) {
                sym_add(t, &ns, t->unk_id);
                pending_unk = 0;
            }
            if (t->byte_level) sym_add(t, &ns, t->byte_init[s[i]][0]);
            else sym_add(t, &ns, one);
            break;
        case BYTE_FALLBACK:  // HF adds these without writing a pending unk first
            if (t->byte_level) {
                for (int k = 0; k < 4 && t->byte_init[s[i]][k] >= 0; k++) sym_add(t, &ns, t->byte_init[s[i]][k]);
            } else {
                for (size_t k = 0; k < clen; k++) sym_add(t, &ns, t->byte_fallback_id[s[i + k]]);
            }
            break;
        case BYTE_UNK:
            if (pending_unk && !t->fuse_unk) sym_add(t, &ns, t->unk_id);
            pending_unk = 1;
            break;
        default: break;  // no unk token: the character is dropped
        }
        i += clen;
    }
    if (pending_unk) sym_add(t, &ns, t->unk_id);
    if (ns) t->syms[ns - 1].next = -1;
    return ns;
}

static void bpe_word(tokenizer *t, const char *s, size_t n, tok_ids *out) {
    size_t ns = word_init(t, (const uint8_t *)s, n);
    if (ns == 0) return;
    tok_sym *sy = t->syms;
    if (ns > 1) {
        if (t->cap_heap < ns * 2) {
            t->cap_heap = ns * 2;
            free(t->heap);
            t->heap = xmalloc(t->cap_heap * sizeof *t->heap);
        }
        // Each merge adds at most 2 entries and removes one symbol: ns - 1 + 2 * (ns - 1) bounds the heap,
        // but entries are popped as they go; grow on demand to be safe.
        uint64_t *h = t->heap;
        size_t nh = 0;
        for (size_t i = 0; i + 1 < ns; i++) {
            const tok_merge_slot *m = merge_get(t, sy[i].id, sy[i + 1].id);
            if (m) h[nh++] = ((uint64_t)m->rank << 32) | i;
        }
        // Heapify.
        for (size_t i = nh / 2; i-- > 0;) {
            uint64_t v = h[i];
            size_t k = i;
            for (;;) {
                size_t c = 2 * k + 1;
                if (c >= nh) break;
                if (c + 1 < nh && h[c + 1] < h[c]) c++;
                if (h[c] >= v) break;
                h[k] = h[c];
                k = c;
            }
            h[k] = v;
        }
        while (nh) {
            uint64_t top = heap_pop(h, &nh);
            uint32_t rank = (uint32_t)(top >> 32), p = (uint32_t)top;
            if (!sy[p].alive || sy[p].next < 0) continue;
            int32_t q = sy[p].next;
            const tok_merge_slot *m = merge_get(t, sy[p].id, sy[q].id);
            if (!m || m->rank != rank) continue;  // a stale entry: this pair changed since
            sy[p].id = (int32_t)m->new_id;
            sy[q].alive = 0;
            sy[p].next = sy[q].next;
            if (sy[q].next >= 0) sy[sy[q].next].prev = (int32_t)p;
            if (nh + 2 > t->cap_heap) {
                t->cap_heap *= 2;
                t->heap = xrealloc(t->heap, t->cap_heap * sizeof *t->heap);
                h = t->heap;
            }
            if (sy[p].prev >= 0) {
                const tok_merge_slot *mp = merge_get(t, sy[sy[p].prev].id, sy[p].id);
                if (mp) heap_push(h, &nh, ((uint64_t)mp->rank << 32) | (uint32_t)sy[p].prev);
            }
            if (sy[p].next >= 0) {
                const tok_merge_slot *mn = merge_get(t, sy[p].id, sy[sy[p].next].id);
                if (mn) heap_push(h, &nh, ((uint64_t)mn->rank << 32) | p);
            }
        }
    }
    for (int32_t i = 0; i >= 0; i = sy[i].next) tok_ids_push(out, sy[i].id);
}

// ---- the pre-token cache -----------------------------------------------------------------------------

enum { CACHE_SLOTS = 1 << 17, CACHE_MAX_ENTRIES = 1 << 16, CACHE_MAX_KEY = 256 };

void tok_cache_init(tok_cache *c) {
    memset(c, 0, sizeof *c);
    c->slots = xcalloc(CACHE_SLOTS, sizeof *c->slots);
    c->mask = CACHE_SLOTS - 1;
    c->max_entries = CACHE_MAX_ENTRIES;
    c->entries = xmalloc(CACHE_MAX_ENTRIES * sizeof *c->entries);
}

void tok_cache_free(tok_cache *c) {
    free(c->slots);
    free(c->entries);
    free(c->ids);
    buf_free(&c->keys);
    memset(c, 0, sizeof *c);
}

static void cache_clear(tok_cache *c) {
    memset(c->slots, 0, (size_t)(c->mask + 1) * sizeof *c->slots);
    c->n = 0;
    c->keys.len = 0;
    c->n_ids = 0;
}

static const tok_cache_entry *cache_get(const tok_cache *c, uint32_t h, const char *s, size_t n) {
    for (uint32_t i = h & c->mask;; i = (i + 1) & c->mask) {
        uint32_t e = c->slots[i];
        if (!e) return NULL;
        const tok_cache_entry *en = &c->entries[e - 1];
        if (en->hash == h && en->key_len == n && !memcmp(c->keys.data + en->key_off, s, n)) return en;
    }
}

static void cache_put(tok_cache *c, uint32_t h, const char *s, size_t n, const int32_t *ids, size_t k) {
    if (c->n >= c->max_entries) cache_clear(c);  // simple and bounded: start over when full
    if (c->n_ids + k > c->cap_ids) {
        c->cap_ids = (c->n_ids + k) * 2;
        c->ids = xrealloc(c->ids, c->cap_ids * sizeof *c->ids);
    }
    tok_cache_entry *en = &c->entries[c->n];
    en->hash = h;
    en->key_off = (uint32_t)c->keys.len;
    en->key_len = (uint32_t)n;
    en->ids_off = (uint32_t)c->n_ids;
    en->ids_len = (uint32_t)k;
    buf_append(&c->keys, s, n);
    memcpy(c->ids + c->n_ids, ids, k * sizeof *ids);
    c->n_ids += k;
    uint32_t i = h & c->mask;
    while (c->slots[i]) i = (i + 1) & c->mask;
    c->slots[i] = ++c->n;
}

static void bpe_cached(tokenizer *t, const char *s, size_t n, tok_ids *out) {
    if (n > CACHE_MAX_KEY) {
        bpe_word(t, s, n, out);
        return;
    }
    uint32_t h = tok_hash(s, n);
    const tok_cache_entry *en = cache_get(&t->cache, h, s, n);
    if (en) {
        const int32_t *ids = t->cache.ids + en->ids_off;
        for (uint32_t k = 0; k < en->ids_len; k++) tok_ids_push(out, ids[k]);
        return;
    }
    t->word_ids.n = 0;
    bpe_word(t, s, n, &t->word_ids);
    for (size_t k = 0; k < t->word_ids.n; k++) tok_ids_push(out, t->word_ids.ids[k]);
    cache_put(&t->cache, h, s, n, t->word_ids.ids, t->word_ids.n);
}

// ---- the model's entry point ---------------------------------------------------------------------------

#define META "\xE2\x96\x81"  // U+2581, SentencePiece's word boundary

void tok_bpe_encode(tokenizer *t, const char *s, size_t n, tok_ids *out) {
    if (n == 0) return;
    if (t->ignore_merges) {
        int32_t id = tok_model_lookup(t, s, n);
        if (id >= 0) {
            tok_ids_push(out, id);
            return;
        }
    }
    if (!t->meta_chunks) {
        bpe_cached(t, s, n, out);
        return;
    }
    // No merge joins a symbol ending in a non-'▁' character to one starting with '▁' (checked at load),
    // so the start of every run of '▁' is a boundary no merge crosses: BPE each chunk on its own (and
    // cache it), which gives exactly the ids of BPE over the whole string.
    size_t start = 0;
    for (size_t i = 1; i + 3 <= n;) {
        const char *p = memchr(s + i, 0xE2, n - i);
        if (!p) break;
        i = (size_t)(p - s);
        if (i + 3 <= n && !memcmp(s + i, META, 3)) {
            if (!(i >= 3 && !memcmp(s + i - 3, META, 3))) {
                bpe_cached(t, s + start, i - start, out);
                start = i;
            }
            i += 3;
        } else {
            i++;
        }
    }
    bpe_cached(t, s + start, n - start, out);
}
