// tokenizer_internal.h: the tokenizer's data structures, shared by the files of data/tokenizer*.c
//   tokenizer.c         loading tokenizer.json: the model, vocabulary, merges, added tokens; accessors
//   tokenizer_json.c    loading the pipeline components; JSON helpers naming the path of what is wrong
//   tokenizer_bpe.c     string and merge hash tables, the BPE merge loop, the pre-token cache
//   tokenizer_encode.c  added tokens, normalizers, pre-tokenizers (the regex scanners), post-processor
//   tokenizer_decode.c  decoders
// Not part of the API (data/tokenizer.h is).
#ifndef MOSFT_TOKENIZER_INTERNAL_H
#define MOSFT_TOKENIZER_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "core/common.h"
#include "data/tokenizer.h"

// ---- byte strings -> id (open addressing) ------------------------------------------------------
// Keys live in the tokenizer's arena; a slot holds (hash32 << 32) | (id + 1), 0 = empty.
typedef struct {
    uint64_t *slots;
    uint32_t mask;
} tok_strmap;

// ---- merges: (left id, right id) -> (rank, merged id) ------------------------------------------
typedef struct {
    uint64_t key;  // (left << 32) | right; UINT64_MAX = empty
    uint32_t rank, new_id;
} tok_merge_slot;

// ---- added tokens --------------------------------------------------------------------------------
typedef struct {
    uint32_t off, len;  // content in the arena
    uint32_t pat_off, pat_len;  // what is matched: content, or normalize(content) if `normalized`
    int32_t id;
    uint8_t special, single_word, lstrip, rstrip, normalized;
} tok_added;

// A byte trie over the added tokens' patterns (leftmost-longest matching, as HF's Aho-Corasick).
typedef struct {
    int32_t child, sibling;  // first child, next sibling (-1 = none)
    int32_t term;            // index into added[] of the pattern ending here (-1 = none)
    uint8_t byte;
} tok_trie_node;
typedef struct {
    tok_trie_node *nodes;
    int32_t n, cap;
    int32_t root[256];  // node of each first byte (-1 = none)
} tok_trie;

// ---- normalizers (applied in order) --------------------------------------------------------------
enum { NORM_PREPEND, NORM_REPLACE, NORM_STRIP };
typedef struct {
    int kind;
    char *a;  // prepend: the string; replace: the pattern
    size_t a_len;
    char *b;  // replace: the content
    size_t b_len;
    int left, right;  // strip
} tok_norm_op;

// ---- pre-tokenizers (applied in order, each splitting the pieces of the previous one) ------------
enum { PRE_SPLIT_LLAMA3, PRE_SPLIT_GPT2, PRE_SPLIT_STRING, PRE_BYTELEVEL, PRE_METASPACE };
// HF SplitDelimiterBehavior
enum { SPLIT_REMOVED, SPLIT_ISOLATED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS };
enum { PREPEND_ALWAYS, PREPEND_NEVER, PREPEND_FIRST };
typedef struct {
    int kind;
    int behavior, invert;       // split
    char *pattern;              // split on a literal string
    size_t pattern_len;
    int add_prefix_space;       // bytelevel
    int use_regex;              // bytelevel: the GPT-2 regex split
    char repl[8];               // metaspace replacement character (UTF-8)
    size_t repl_len;
    int prepend_scheme, split;  // metaspace
    mosft_buf scratch;          // this step's transformed text (reused across calls)
} tok_pretok;

// ---- decoders (applied in order to the list of token strings) ------------------------------------
enum { DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP, DEC_BYTELEVEL, DEC_METASPACE };
typedef struct {
    int kind;
    char *a, *b;  // replace: pattern, content
    size_t a_len, b_len;
    uint32_t strip_char;  // strip: the character; metaspace: the replacement
    int start, stop;      // strip counts
    int prepend_scheme;   // metaspace
} tok_decoder;

// ---- the pre-token cache: piece bytes -> ids ------------------------------------------------------
typedef struct {
    uint32_t hash, key_off, key_len, ids_off, ids_len;
} tok_cache_entry;
typedef struct {
    uint32_t *slots;  // entry index + 1, 0 = empty
    uint32_t mask;
    tok_cache_entry *entries;
    uint32_t n, max_entries;
    mosft_buf keys;
    int32_t *ids;
    size_t n_ids, cap_ids;
} tok_cache;

enum { BYTE_FOUND, BYTE_FALLBACK, BYTE_UNK, BYTE_DROP };

// ---- BPE working memory for one word (reused) -----------------------------------------------------
typedef struct {
    int32_t id;
    int32_t prev, next;  // linked list over the symbols; -1 = none
    int32_t alive;
} tok_sym;

struct tokenizer {
    char *path;  // the tokenizer.json read
    mosft_buf arena;  // every string the tokenizer owns, addressed by offsets

    // Ids 0..n_ids-1. str_off == UINT32_MAX: no token has this id.
    int32_t n_ids;
    uint32_t *str_off, *str_len;      // id_to_token and decode: the added content (normalized when the
                                      // token is `normalized`, as HF), else the model token
    uint32_t *name_off, *name_len;    // token_to_id: the added content as written, else the model token
    uint32_t *match_off, *match_len;  // model tokens: what BPE matches (raw bytes in byte-level mode)
    int32_t *added_of;                // index into added[] or -1
    tok_strmap model_map;             // matching form -> model id
    tok_strmap token_map;             // name -> id (token_to_id)

    // BPE model
    tok_merge_slot *merges;
    uint32_t merge_mask;
    uint32_t n_merges;
    int32_t unk_id;  // -1: no unk token
    int byte_fallback, fuse_unk, ignore_merges;
    int byte_level;                  // a ByteLevel pre-tokenizer maps bytes to chars (GPT-2 table)
    int32_t byte_fallback_id[256];   // <0xXX> ids (-1 if absent)
    int32_t ascii_id[128];           // id of each one-byte token (-1 if absent), non-byte-level mode
    int32_t byte_init[256][4];       // byte-level mode: initial symbols of each byte (-1 terminated)
    uint8_t byte_init_kind[256];     // byte-level mode: BYTE_FOUND, BYTE_FALLBACK, BYTE_UNK, BYTE_DROP
    int meta_chunks;                 // '▁'-run starts are safe split points for the merges (Llama 2)

    // added tokens
    tok_added *added;
    int n_added;
    tok_trie trie_raw, trie_norm;  // non-normalized / normalized patterns

    tok_norm_op *norm;
    int n_norm;
    tok_pretok *pre;
    int n_pre;
    int32_t *post_prefix, *post_suffix;  // ids the post-processor puts around the sequence
    int n_post_prefix, n_post_suffix;
    tok_decoder *dec;
    int n_dec;
    int has_decoder;

    int32_t bos_id, eos_id, pad_id;
    int split_special;  // 1 (HF's default): special added tokens in the text are matched as tokens

    // encode scratch (one thread at a time)
    mosft_buf clean;           // the input with ill-formed UTF-8 replaced
    mosft_buf norm_a, norm_b;  // normalizer ping-pong buffers
    tok_sym *syms;
    size_t cap_syms;
    uint64_t *heap;
    size_t cap_heap;
    tok_ids word_ids;  // ids of one word before they enter the cache
    tok_cache cache;
};

static inline const char *tok_arena(const tokenizer *t, uint32_t off) { return t->arena.data + off; }

// tokenizer_bpe.c
uint32_t tok_hash(const void *p, size_t n);
void tok_strmap_init(tok_strmap *m, size_t n_keys);
void tok_strmap_free(tok_strmap *m);
// Insert key -> id (keys compared through `t` by the offsets of `offs`/`lens` indexed by id).
// Returns 0 if the key was already present (the existing id is kept).
int tok_strmap_insert(tok_strmap *m, const tokenizer *t, const uint32_t *offs, const uint32_t *lens,
                      const char *key, size_t n, int32_t id);
int32_t tok_strmap_get(const tok_strmap *m, const tokenizer *t, const uint32_t *offs, const uint32_t *lens,
                       const char *key, size_t n);
void tok_merges_init(tokenizer *t, size_t n);
void tok_merges_put(tokenizer *t, int32_t a, int32_t b, uint32_t rank, int32_t new_id);
void tok_cache_init(tok_cache *c);
void tok_cache_free(tok_cache *c);
// BPE of one pre-token (the model's input), appending ids.
void tok_bpe_encode(tokenizer *t, const char *s, size_t n, tok_ids *out);
static inline void tok_ids_push(tok_ids *v, int32_t id) {
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 256;
        v->ids = xrealloc(v->ids, v->cap * sizeof *v->ids);
    }
    v->ids[v->n++] = id;
}
static inline int32_t tok_model_lookup(const tokenizer *t, const char *s, size_t n) {
    return tok_strmap_get(&t->model_map, t, t->match_off, t->match_len, s, n);
}

// tokenizer_encode.c
// Build a trie over the added tokens with normalized == want_normalized.
void tok_trie_build(tokenizer *t, tok_trie *tr, int want_normalized);
void tok_trie_free(tok_trie *tr);
// Apply the normalizer to s[0..n) into *out (cleared first).
void tok_normalize(tokenizer *t, const char *s, size_t n, mosft_buf *out);

// tokenizer_json.c
// Messages: "<file>: <json path>: expected <what>, got <found>" / "...: unsupported <what> \"<name>\"".
enum { JP = 600 };  // room for a JSON path
const char *tokj_path(char *buf, const char *fmt, ...) MOSFT_PRINTF(2, 3);  // buf has JP bytes
int tokj_bad(const char *file, const char *jp, const char *expected, const cJSON *got);
int tokj_unsupported(const char *file, const char *jp, const char *what, const char *name, const char *supported);
static inline const cJSON *tokj_get(const cJSON *o, const char *k) { return cJSON_GetObjectItemCaseSensitive(o, k); }
static inline int tokj_null(const cJSON *v) { return !v || cJSON_IsNull(v); }
// Fields of object o (at JSON path jp): absent or null gives dflt (tokj_str: required).
int tokj_bool(const char *file, const cJSON *o, const char *k, const char *jp, int dflt, int *out);
int tokj_str(const char *file, const cJSON *o, const char *k, const char *jp, const char **out);
int tokj_int(const char *file, const cJSON *o, const char *k, const char *jp, int lo, int hi, int dflt, int *out);
// The components (null = none). The pre-tokenizer goes first: it decides whether the vocabulary is
// byte-level; the post-processor after the model: it checks ids against the vocabulary size.
int tok_load_normalizer(tokenizer *t, const cJSON *o, const char *jp);
int tok_load_pretok(tokenizer *t, const cJSON *o, const char *jp);
int tok_load_post(tokenizer *t, const cJSON *o, const char *jp);
int tok_load_decoder(tokenizer *t, const cJSON *o, const char *jp);

// tokenizer_decode.c
// The GPT-2 byte <-> character table of ByteLevel.
uint32_t tok_byte_to_char(uint8_t b);
int tok_char_to_byte(uint32_t cp);  // -1 if the character is not in the table

#endif
