// tokenizer.c: loading a Hugging Face tokenizer.json (BPE) with cJSON, and the simple accessors.
// What is supported (anything else is a MOSFT_ERR_INPUT naming the component and its JSON path):
//   model       BPE (vocab; merges as "a b" strings or ["a","b"] pairs; byte_fallback, fuse_unk, unk_token,
//               ignore_merges)
//   normalizer  Sequence, Prepend, Replace (literal pattern), Strip
//   pre_tokenizer  Sequence, Split (literal, or the Llama 3 / GPT-2 regex), ByteLevel (last), Metaspace
//   post_processor TemplateProcessing, ByteLevel (no effect on ids), Sequence
//   decoder     Sequence, Replace, ByteFallback, Fuse, Strip, ByteLevel, Metaspace
//   added_tokens   special, single_word, lstrip, rstrip, normalized
// "truncation" and "padding" are ignored: mosft truncates and pads its batches itself.
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "data/tokenizer_internal.h"
#include "data/unicode.h"

// Ids above this are refused: the id arrays are dense (no vocabulary comes near it).
enum { MAX_ID = 1 << 24 };

// Copy a string into the arena; returns its offset.
static uint32_t arena_add(tokenizer *t, const void *p, size_t n) {
    uint32_t off = (uint32_t)t->arena.len;
    buf_append(&t->arena, p, n);
    buf_append(&t->arena, "", 1);  // every string NUL-terminated for id_to_token
    return off;
}

// ---- model and vocabulary ------------------------------------------------------------------------------

// The form BPE matches of a tokenizer.json token string: in byte-level mode its characters mapped back to
// bytes (0 if a character is not in the byte table: no byte-level input can produce it).
static int match_form(const tokenizer *t, const char *s, size_t n, mosft_buf *out) {
    out->len = 0;
    if (!t->byte_level) {
        buf_append(out, s, n);
        return 1;
    }
    size_t l;
    for (size_t i = 0; i < n; i += l) {
        int b = tok_char_to_byte(utf8_decode_valid((const uint8_t *)s + i, &l));
        if (b < 0) return 0;
        char c = (char)b;
        buf_append(out, &c, 1);
    }
    return 1;
}

static int32_t model_id(tokenizer *t, const char *s, mosft_buf *tmp) {
    if (!match_form(t, s, strlen(s), tmp)) return -1;
    return tok_model_lookup(t, tmp->data ? tmp->data : "", tmp->len);
}

static int ends_meta(const tokenizer *t, int32_t id) {
    return t->match_len[id] >= 3 && !memcmp(tok_arena(t, t->match_off[id]) + t->match_len[id] - 3, "\xE2\x96\x81", 3);
}
static int starts_meta(const tokenizer *t, int32_t id) {
    return t->match_len[id] >= 3 && !memcmp(tok_arena(t, t->match_off[id]), "\xE2\x96\x81", 3);
}

static int load_merges(tokenizer *t, const cJSON *merges) {
    const char *file = t->path;
    if (!cJSON_IsArray(merges)) return tokj_bad(file, "model.merges", "an array", merges);
    int n = cJSON_GetArraySize(merges);
    tok_merges_init(t, (size_t)n);
    mosft_buf a = {0}, b = {0}, ab = {0};
    int rc = MOSFT_OK, i = 0;
    t->meta_chunks = !t->byte_level && tok_model_lookup(t, "\xE2\x96\x81", 3) >= 0;
    for (const cJSON *e = merges->child; e; e = e->next, i++) {
        const char *sa = NULL, *sb = NULL;
        size_t la = 0, lb = 0;
        char jp[64];
        snprintf(jp, sizeof jp, "model.merges[%d]", i);
        if (cJSON_IsString(e)) {
            const char *s = e->valuestring, *sp = strchr(s, ' ');
            if (sp && !strchr(sp + 1, ' ') && sp > s && sp[1]) {
                sa = s;
                la = (size_t)(sp - s);
                sb = sp + 1;
                lb = strlen(sb);
            }
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) &&
                   cJSON_IsString(e->child->next)) {
            sa = e->child->valuestring;
            la = strlen(sa);
            sb = e->child->next->valuestring;
            lb = strlen(sb);
        }
        if (!sa) {
            rc = tokj_bad(file, jp, "\"a b\" (one space) or [\"a\", \"b\"]", e);
            break;
        }
        int ok = match_form(t, sa, la, &a) && match_form(t, sb, lb, &b);
        if (!ok) continue;  // a character outside the byte table: never reachable in byte-level mode
        ab.len = 0;
        buf_append(&ab, a.data, a.len);
        buf_append(&ab, b.data, b.len);
        int32_t ia = tok_model_lookup(t, a.data, a.len), ib = tok_model_lookup(t, b.data, b.len);
        int32_t iab = tok_model_lookup(t, ab.data, ab.len);
        if (ia < 0 || ib < 0 || iab < 0) {
            const char *which = ia < 0 ? "the first token" : ib < 0 ? "the second token" : "the merged token";
            char what[96];
            snprintf(what, sizeof what, "tokens of model.vocab (%s is not)", which);
            rc = tokj_bad(file, jp, what, e);
            break;
        }
        tok_merges_put(t, ia, ib, (uint32_t)i, iab);
        if (t->meta_chunks && !ends_meta(t, ia) && starts_meta(t, ib)) t->meta_chunks = 0;
    }
    buf_free(&a);
    buf_free(&b);
    buf_free(&ab);
    return rc;
}

static int load_model(tokenizer *t, const cJSON *model, const cJSON *added) {
    const char *file = t->path, *type = NULL;
    if (!cJSON_IsObject(model)) return tokj_bad(file, "model", "an object", model);
    const cJSON *tv = tokj_get(model, "type");
    if (cJSON_IsString(tv)) type = tv->valuestring;
    else if (tokj_null(tv) && tokj_get(model, "merges")) type = "BPE";  // older files omit it
    if (!type) return tokj_bad(file, "model.type", "\"BPE\"", tv);
    if (strcmp(type, "BPE"))
        return tokj_unsupported(file, "model.type", "model", type,
                           "mosft supports BPE tokenizers (Llama 2, Llama 3); WordPiece, Unigram and WordLevel are not");
    const cJSON *dropout = tokj_get(model, "dropout");
    if (!tokj_null(dropout) && (!cJSON_IsNumber(dropout) || dropout->valuedouble != 0))
        return tokj_unsupported(file, "model.dropout", "BPE option", "dropout", "BPE dropout is a training-time option; set it to null");
    const char *affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int k = 0; k < 2; k++) {
        const cJSON *v = tokj_get(model, affixes[k]);
        if (!tokj_null(v) && !(cJSON_IsString(v) && !v->valuestring[0])) {
            char p[JP];
            tokj_path(p, "model.%s", affixes[k]);
            return tokj_unsupported(file, p, "BPE option", affixes[k], "mosft supports BPE without subword prefixes/suffixes");
        }
    }
    int rc;
    if ((rc = tokj_bool(file, model, "byte_fallback", "model", 0, &t->byte_fallback)) ||
        (rc = tokj_bool(file, model, "fuse_unk", "model", 0, &t->fuse_unk)) ||
        (rc = tokj_bool(file, model, "ignore_merges", "model", 0, &t->ignore_merges)))
        return rc;

    // Ids: the vocabulary and the added tokens.
    const cJSON *vocab = tokj_get(model, "vocab");
    if (!cJSON_IsObject(vocab)) return tokj_bad(file, "model.vocab", "an object {token: id}", vocab);
    int64_t max_id = -1;
    int n_vocab = 0;
    for (const cJSON *e = vocab->child; e; e = e->next, n_vocab++) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= MAX_ID ||
            e->valuedouble != (double)(int64_t)e->valuedouble) {
            char p[JP];
            tokj_path(p, "model.vocab[\"%.500s\"]", e->string);
            return tokj_bad(file, p, "an integer id in [0, 16777215]", e);
        }
        if ((int64_t)e->valuedouble > max_id) max_id = (int64_t)e->valuedouble;
    }
    if (!tokj_null(added) && !cJSON_IsArray(added)) return tokj_bad(file, "added_tokens", "an array", added);
    int n_added = cJSON_GetArraySize(added), i = 0;
    for (const cJSON *e = added ? added->child : NULL; e; e = e->next, i++) {
        char p[JP];
        tokj_path(p, "added_tokens[%d]", i);
        const char *content;
        int id;
        if (!cJSON_IsObject(e)) return tokj_bad(file, p, "an object", e);
        if ((rc = tokj_int(file, e, "id", p, 0, MAX_ID - 1, -1, &id)) || (rc = tokj_str(file, e, "content", p, &content)))
            return rc;
        if (id < 0) return tokj_bad(file, p, "an \"id\"", e);
        if (id > max_id) max_id = id;
    }
    t->n_ids = (int32_t)(max_id + 1);
    size_t N = (size_t)t->n_ids;
    t->str_off = xmalloc(N * sizeof *t->str_off);
    t->str_len = xcalloc(N, sizeof *t->str_len);
    t->match_off = xmalloc(N * sizeof *t->match_off);
    t->match_len = xcalloc(N, sizeof *t->match_len);
    t->added_of = xmalloc(N * sizeof *t->added_of);
    for (size_t k = 0; k < N; k++) {
        t->str_off[k] = t->match_off[k] = UINT32_MAX;
        t->added_of[k] = -1;
    }

    // Added tokens (their patterns wait for the normalizer: see finish_added).
    t->added = xcalloc((size_t)(n_added ? n_added : 1), sizeof *t->added);
    i = 0;
    for (const cJSON *e = added ? added->child : NULL; e; e = e->next, i++) {
        char p[JP];
        tokj_path(p, "added_tokens[%d]", i);
        tok_added *a = &t->added[t->n_added];
        int id, sw, ls, rs, nz, sp;
        const char *content;
        tokj_int(file, e, "id", p, 0, MAX_ID - 1, -1, &id);
        tokj_str(file, e, "content", p, &content);
        if ((rc = tokj_bool(file, e, "single_word", p, 0, &sw)) || (rc = tokj_bool(file, e, "lstrip", p, 0, &ls)) ||
            (rc = tokj_bool(file, e, "rstrip", p, 0, &rs)) || (rc = tokj_bool(file, e, "normalized", p, 1, &nz)) ||
            (rc = tokj_bool(file, e, "special", p, 0, &sp)))
            return rc;
        a->id = id;
        a->len = (uint32_t)strlen(content);
        a->off = arena_add(t, content, a->len);
        a->single_word = (uint8_t)sw;
        a->lstrip = (uint8_t)ls;
        a->rstrip = (uint8_t)rs;
        a->normalized = (uint8_t)nz;
        a->special = (uint8_t)sp;
        if (t->added_of[id] < 0) {
            t->added_of[id] = t->n_added;
            t->str_off[id] = a->off;
            t->str_len[id] = a->len;
        }
        t->n_added++;
    }

    // The model vocabulary.
    mosft_buf m = {0};
    for (const cJSON *e = vocab->child; e; e = e->next) {
        int32_t id = (int32_t)e->valuedouble;
        size_t len = strlen(e->string);
        uint32_t off = arena_add(t, e->string, len);
        if (t->str_off[id] == UINT32_MAX) {
            t->str_off[id] = off;
            t->str_len[id] = (uint32_t)len;
        }
        if (t->match_off[id] != UINT32_MAX) continue;  // a second string for the same id
        if (!match_form(t, e->string, len, &m)) continue;
        t->match_off[id] = t->byte_level ? arena_add(t, m.data ? m.data : "", m.len) : off;
        t->match_len[id] = (uint32_t)m.len;
    }
    t->name_off = xmalloc(N * sizeof *t->name_off);
    t->name_len = xmalloc(N * sizeof *t->name_len);
    memcpy(t->name_off, t->str_off, N * sizeof *t->name_off);
    memcpy(t->name_len, t->str_len, N * sizeof *t->name_len);
    tok_strmap_init(&t->model_map, (size_t)n_vocab);
    tok_strmap_init(&t->token_map, N);
    for (int32_t id = 0; id < t->n_ids; id++) {
        if (t->match_off[id] != UINT32_MAX)
            tok_strmap_insert(&t->model_map, t, t->match_off, t->match_len, tok_arena(t, t->match_off[id]),
                              t->match_len[id], id);
        if (t->name_off[id] != UINT32_MAX && t->added_of[id] >= 0)  // added tokens first, as HF
            tok_strmap_insert(&t->token_map, t, t->name_off, t->name_len, tok_arena(t, t->name_off[id]),
                              t->name_len[id], id);
    }
    for (int32_t id = 0; id < t->n_ids; id++)
        if (t->name_off[id] != UINT32_MAX && t->added_of[id] < 0)
            tok_strmap_insert(&t->token_map, t, t->name_off, t->name_len, tok_arena(t, t->name_off[id]),
                              t->name_len[id], id);

    // unk, byte fallback and the per-byte / per-ASCII initial symbols.
    const cJSON *unk = tokj_get(model, "unk_token");
    t->unk_id = -1;
    if (!tokj_null(unk)) {
        if (!cJSON_IsString(unk)) {
            buf_free(&m);
            return tokj_bad(file, "model.unk_token", "a string or null", unk);
        }
        t->unk_id = model_id(t, unk->valuestring, &m);
        if (t->unk_id < 0) {
            buf_free(&m);
            return tokj_bad(file, "model.unk_token", "a token of model.vocab", unk);
        }
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_fallback_id[b] = tok_model_lookup(t, name, 6);
    }
    for (int c = 0; c < 128; c++) {
        char ch = (char)c;
        t->ascii_id[c] = tok_model_lookup(t, &ch, 1);
    }
    for (int b = 0; b < 256; b++) {
        char raw = (char)b;
        int32_t *init = t->byte_init[b];
        init[0] = init[1] = init[2] = init[3] = -1;
        int32_t id = t->byte_level ? tok_model_lookup(t, &raw, 1) : -1;
        if (id >= 0) {
            init[0] = id;
            t->byte_init_kind[b] = BYTE_FOUND;
            continue;
        }
        // Byte fallback goes over the UTF-8 bytes of the byte's *character* (what HF sees).
        char u[4];
        size_t ul = utf8_encode(tok_byte_to_char((uint8_t)b), u);
        int all = t->byte_fallback;
        for (size_t k = 0; k < ul; k++) all &= t->byte_fallback_id[(uint8_t)u[k]] >= 0;
        if (all) {
            for (size_t k = 0; k < ul; k++) init[k] = t->byte_fallback_id[(uint8_t)u[k]];
            t->byte_init_kind[b] = BYTE_FALLBACK;
        } else {
            t->byte_init_kind[b] = t->unk_id >= 0 ? BYTE_UNK : BYTE_DROP;
        }
    }
    buf_free(&m);
    return load_merges(t, tokj_get(model, "merges"));
}

// Patterns of the added tokens (normalized ones are matched in their normalized form) and the tries.
static void finish_added(tokenizer *t) {
    for (int i = 0; i < t->n_added; i++) {
        tok_added *a = &t->added[i];
        if (a->normalized && t->n_norm) {
            tok_normalize(t, tok_arena(t, a->off), a->len, &t->norm_a);
            a->pat_len = (uint32_t)t->norm_a.len;
            a->pat_off = arena_add(t, t->norm_a.data, t->norm_a.len);
            if (t->added_of[a->id] == i) {  // HF's id_to_token (and so decode) give the normalized form
                t->str_off[a->id] = a->pat_off;
                t->str_len[a->id] = a->pat_len;
            }
        } else {
            a->pat_off = a->off;
            a->pat_len = a->len;
        }
    }
    tok_trie_build(t, &t->trie_raw, 0);
    tok_trie_build(t, &t->trie_norm, 1);
}

// ---- tokenizer_config.json -----------------------------------------------------------------------------

static char *config_path(const char *tokenizer_path) {
    if (dir_exists(tokenizer_path)) return path_join(tokenizer_path, "tokenizer_config.json");
    char *d = path_dirname(tokenizer_path), *p = path_join(d, "tokenizer_config.json");
    free(d);
    return p;
}

// A config token field: a string or {"content": ...}; NULL if absent.
static const char *config_token(const cJSON *cfg, const char *k) {
    const cJSON *v = tokj_get(cfg, k);
    if (cJSON_IsString(v)) return v->valuestring;
    if (cJSON_IsObject(v) && cJSON_IsString(tokj_get(v, "content"))) return tokj_get(v, "content")->valuestring;
    return NULL;
}

static int load_config(tokenizer *t, const char *tokenizer_path) {
    char *p = config_path(tokenizer_path);
    t->bos_id = t->n_post_prefix ? t->post_prefix[0] : -1;
    t->eos_id = t->pad_id = -1;
    if (!file_exists(p)) {
        free(p);
        return MOSFT_OK;
    }
    char *text;
    size_t len;
    int rc = file_read_all(p, &text, &len);
    if (rc) {
        free(p);
        return rc;
    }
    cJSON *cfg = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: expected a JSON object (the tokenizer's config), got malformed JSON", p);
        free(p);
        return rc;
    }
    const char *s;
    if (t->bos_id < 0 && (s = config_token(cfg, "bos_token"))) t->bos_id = tokenizer_token_to_id(t, s);
    if ((s = config_token(cfg, "eos_token"))) t->eos_id = tokenizer_token_to_id(t, s);
    if ((s = config_token(cfg, "pad_token"))) t->pad_id = tokenizer_token_to_id(t, s);
    cJSON_Delete(cfg);
    free(p);
    return MOSFT_OK;
}

char *tokenizer_config_eos_text(const char *tokenizer_path) {
    char *p = config_path(tokenizer_path), *text = NULL, *out = NULL;
    size_t len;
    if (file_exists(p) && file_read_all(p, &text, &len) == MOSFT_OK) {
        cJSON *cfg = cJSON_ParseWithLength(text, len);
        const char *s = cJSON_IsObject(cfg) ? config_token(cfg, "eos_token") : NULL;
        if (s) out = xstrdup(s);
        cJSON_Delete(cfg);
    }
    free(text);
    free(p);
    return out;
}

// ---- load / free -----------------------------------------------------------------------------------------

static int json_error(const char *file, const char *text, size_t len, const char *at) {
    size_t pos = at && at >= text && at <= text + len ? (size_t)(at - text) : len;
    int line = 1, col = 1;
    for (size_t i = 0; i < pos; i++) {
        if (text[i] == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    char near[24] = {0};
    size_t k = 0;
    for (size_t i = pos; i < len && k < 16; i++) near[k++] = (text[i] == '\n' || text[i] == '\t') ? ' ' : text[i];
    return mosft_fail(MOSFT_ERR_INPUT, "%s: line %d, column %d: expected valid JSON, got %s%s%s", file, line, col,
                      pos >= len ? "the end of the file" : "\"", pos >= len ? "" : near, pos >= len ? "" : "\"");
}

int tokenizer_load(tokenizer **out, const char *path) {
    *out = NULL;
    char *file = dir_exists(path) ? path_join(path, "tokenizer.json") : xstrdup(path);
    char *text;
    size_t len;
    int rc = file_read_all(file, &text, &len);
    if (rc) {
        free(file);
        return rc;
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len + 1, &end, 1);
    if (!root) {
        rc = json_error(file, text, len, end);
        free(text);
        free(file);
        return rc;
    }
    free(text);
    tokenizer *t = xcalloc(1, sizeof *t);
    t->path = file;
    t->split_special = 1;
    buf_append(&t->arena, "", 1);  // offset 0: the empty string
    if (!cJSON_IsObject(root)) rc = tokj_bad(file, "(top level)", "an object", root);
    // The pre-tokenizer first: it decides whether the vocabulary is byte-level.
    if (!rc) rc = tok_load_pretok(t, tokj_get(root, "pre_tokenizer"), "pre_tokenizer");
    if (!rc) rc = tok_load_normalizer(t, tokj_get(root, "normalizer"), "normalizer");
    if (!rc) rc = load_model(t, tokj_get(root, "model"), tokj_get(root, "added_tokens"));
    if (!rc) rc = tok_load_post(t, tokj_get(root, "post_processor"), "post_processor");
    if (!rc) rc = tok_load_decoder(t, tokj_get(root, "decoder"), "decoder");
    cJSON_Delete(root);
    if (!rc) {
        finish_added(t);
        rc = load_config(t, path);
    }
    if (rc) {
        tokenizer_free(t);
        return rc;
    }
    tok_cache_init(&t->cache);
    *out = t;
    return MOSFT_OK;
}

void tokenizer_free(tokenizer *t) {
    if (!t) return;
    free(t->path);
    buf_free(&t->arena);
    free(t->str_off);
    free(t->str_len);
    free(t->name_off);
    free(t->name_len);
    free(t->match_off);
    free(t->match_len);
    free(t->added_of);
    tok_strmap_free(&t->model_map);
    tok_strmap_free(&t->token_map);
    free(t->merges);
    free(t->added);
    tok_trie_free(&t->trie_raw);
    tok_trie_free(&t->trie_norm);
    for (int i = 0; i < t->n_norm; i++) {
        free(t->norm[i].a);
        free(t->norm[i].b);
    }
    free(t->norm);
    for (int i = 0; i < t->n_pre; i++) {
        free(t->pre[i].pattern);
        buf_free(&t->pre[i].scratch);
    }
    free(t->pre);
    free(t->post_prefix);
    free(t->post_suffix);
    for (int i = 0; i < t->n_dec; i++) {
        free(t->dec[i].a);
        free(t->dec[i].b);
    }
    free(t->dec);
    buf_free(&t->clean);
    buf_free(&t->norm_a);
    buf_free(&t->norm_b);
    free(t->syms);
    free(t->heap);
    tok_ids_free(&t->word_ids);
    tok_cache_free(&t->cache);
    free(t);
}

// ---- accessors ----------------------------------------------------------------------------------------------

void tok_ids_free(tok_ids *v) {
    free(v->ids);
    v->ids = NULL;
    v->n = v->cap = 0;
}

int32_t tokenizer_token_to_id(const tokenizer *t, const char *token) {
    return tok_strmap_get(&t->token_map, t, t->name_off, t->name_len, token, strlen(token));
}

const char *tokenizer_id_to_token(const tokenizer *t, int32_t id) {
    if (id < 0 || id >= t->n_ids || t->str_off[id] == UINT32_MAX) return NULL;
    return tok_arena(t, t->str_off[id]);
}

int32_t tokenizer_bos_id(const tokenizer *t) { return t->bos_id; }
int32_t tokenizer_eos_id(const tokenizer *t) { return t->eos_id; }
int32_t tokenizer_pad_id(const tokenizer *t) { return t->pad_id; }
int tokenizer_vocab_size(const tokenizer *t) { return t->n_ids; }

void tokenizer_set_split_special(tokenizer *t, int on) { t->split_special = on; }
int tokenizer_is_special(const tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_ids && t->added_of[id] >= 0 && t->added[t->added_of[id]].special;
}
