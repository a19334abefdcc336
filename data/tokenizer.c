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
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "data/tokenizer_internal.h"
#include "data/unicode.h"

#include <stdarg.h>

// A JSON path for messages ("pre_tokenizer.pretokenizers[0].pattern"), truncated if it is very long.
enum { JP = 600 };
static const char *jpf(char *buf, const char *fmt, ...) MOSFT_PRINTF(2, 3);
static const char *jpf(char *buf, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, JP, fmt, ap);
    va_end(ap);
    return buf;
}

static const char k_llama3_regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char k_gpt2_regex[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// ---- error messages ---------------------------------------------------------------------------------

// A short JSON rendering of what was found (for "got ...").
static void render(const cJSON *v, char *out, size_t n) {
    if (!v) {
        snprintf(out, n, "nothing (missing)");
        return;
    }
    char *s = cJSON_PrintUnformatted(v);
    if (!s) {
        snprintf(out, n, "?");
        return;
    }
    if (strlen(s) > 60) memcpy(s + 57, "...", 4);
    snprintf(out, n, "%s", s);
    cJSON_free(s);
}

static int bad(const char *file, const char *jp, const char *expected, const cJSON *got) {
    char g[JP];
    render(got, g, sizeof g);
    return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected %s, got %s", file, jp, expected, g);
}

static int unsupported(const char *file, const char *jp, const char *what, const char *name, const char *supported) {
    return mosft_fail_hint(MOSFT_ERR_INPUT, supported, "%s: %s: unsupported %s \"%s\"", file, jp, what, name);
}

// ---- small JSON helpers -------------------------------------------------------------------------------

static const cJSON *get(const cJSON *o, const char *k) { return cJSON_GetObjectItemCaseSensitive(o, k); }

static int is_null(const cJSON *v) { return !v || cJSON_IsNull(v); }

// A bool field: absent/null = dflt.
static int get_bool(const char *file, const cJSON *o, const char *k, const char *jp, int dflt, int *out) {
    const cJSON *v = get(o, k);
    if (is_null(v)) {
        *out = dflt;
        return MOSFT_OK;
    }
    if (!cJSON_IsBool(v)) {
        char p[JP];
        jpf(p, "%s.%s", jp, k);
        return bad(file, p, "true or false", v);
    }
    *out = cJSON_IsTrue(v);
    return MOSFT_OK;
}

// A required string field.
static int get_str(const char *file, const cJSON *o, const char *k, const char *jp, const char **out) {
    const cJSON *v = get(o, k);
    if (!cJSON_IsString(v)) {
        char p[JP];
        jpf(p, "%s.%s", jp, k);
        return bad(file, p, "a string", v);
    }
    *out = v->valuestring;
    return MOSFT_OK;
}

static int get_int(const char *file, const cJSON *o, const char *k, const char *jp, int lo, int hi, int dflt, int *out) {
    const cJSON *v = get(o, k);
    if (is_null(v)) {
        *out = dflt;
        return MOSFT_OK;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != (double)(long long)v->valuedouble || v->valuedouble < lo ||
        v->valuedouble > hi) {
        char p[512], e[64];
        jpf(p, "%s.%s", jp, k);
        jpf(e, "an integer in [%d, %d]", lo, hi);
        return bad(file, p, e, v);
    }
    *out = (int)v->valuedouble;
    return MOSFT_OK;
}

// The "type" of a component object.
static int get_type(const char *file, const cJSON *o, const char *jp, const char **out) {
    if (!cJSON_IsObject(o)) return bad(file, jp, "an object or null", o);
    return get_str(file, o, "type", jp, out);
}

// A {"String": s} / {"Regex": r} pattern.
static int get_pattern(const char *file, const cJSON *o, const char *jp, const char **str, const char **regex) {
    char p[JP];
    jpf(p, "%s.pattern", jp);
    const cJSON *v = get(o, "pattern");
    *str = *regex = NULL;
    if (cJSON_IsObject(v)) {
        const cJSON *s = get(v, "String"), *r = get(v, "Regex");
        if (cJSON_IsString(s)) *str = s->valuestring;
        else if (cJSON_IsString(r)) *regex = r->valuestring;
    }
    if (!*str && !*regex) return bad(file, p, "{\"String\": ...} or {\"Regex\": ...}", v);
    return MOSFT_OK;
}

static uint32_t arena_add(tokenizer *t, const void *p, size_t n) {
    uint32_t off = (uint32_t)t->arena.len;
    buf_append(&t->arena, p, n);
    buf_append(&t->arena, "", 1);  // every string NUL-terminated for id_to_token
    return off;
}

// The single character of a string field (Metaspace replacement, Strip content).
static int get_char(const char *file, const cJSON *o, const char *k, const char *jp, uint32_t dflt, uint32_t *out) {
    const cJSON *v = get(o, k);
    if (is_null(v)) {
        *out = dflt;
        return MOSFT_OK;
    }
    size_t l;
    if (!cJSON_IsString(v) || !v->valuestring[0] ||
        utf8_valid_prefix((const uint8_t *)v->valuestring, strlen(v->valuestring)) != strlen(v->valuestring) ||
        utf8_len((uint8_t)v->valuestring[0]) != strlen(v->valuestring)) {
        char p[JP];
        jpf(p, "%s.%s", jp, k);
        return bad(file, p, "a string of one character", v);
    }
    *out = utf8_decode_valid((const uint8_t *)v->valuestring, &l);
    return MOSFT_OK;
}

static int get_prepend_scheme(const char *file, const cJSON *o, const char *jp, int *out) {
    const cJSON *v = get(o, "prepend_scheme");
    if (is_null(v)) {  // before tokenizers 0.19: add_prefix_space
        int aps;
        int rc = get_bool(file, o, "add_prefix_space", jp, 1, &aps);
        *out = aps ? PREPEND_ALWAYS : PREPEND_NEVER;
        return rc;
    }
    if (cJSON_IsString(v)) {
        if (!strcmp(v->valuestring, "always")) *out = PREPEND_ALWAYS;
        else if (!strcmp(v->valuestring, "never")) *out = PREPEND_NEVER;
        else if (!strcmp(v->valuestring, "first")) *out = PREPEND_FIRST;
        else v = NULL;
        if (v) return MOSFT_OK;
    }
    char p[JP];
    jpf(p, "%s.prepend_scheme", jp);
    return bad(file, p, "\"always\", \"never\" or \"first\"", get(o, "prepend_scheme"));
}

// ---- normalizer ----------------------------------------------------------------------------------------

static int load_normalizer(tokenizer *t, const cJSON *o, const char *jp) {
    const char *file = t->path, *type;
    if (is_null(o)) return MOSFT_OK;
    int rc = get_type(file, o, jp, &type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) {
        const cJSON *arr = get(o, "normalizers");
        char p[JP];
        jpf(p, "%s.normalizers", jp);
        if (!cJSON_IsArray(arr)) return bad(file, p, "an array", arr);
        int i = 0;
        for (const cJSON *e = arr->child; e; e = e->next, i++) {
            char q[JP];
            jpf(q, "%s[%d]", p, i);
            if ((rc = load_normalizer(t, e, q))) return rc;
        }
        return MOSFT_OK;
    }
    tok_norm_op op = {0};
    if (!strcmp(type, "Prepend")) {
        const char *s;
        if ((rc = get_str(file, o, "prepend", jp, &s))) return rc;
        op.kind = NORM_PREPEND;
        op.a = xstrdup(s);
        op.a_len = strlen(s);
    } else if (!strcmp(type, "Replace")) {
        const char *str, *regex, *content;
        if ((rc = get_pattern(file, o, jp, &str, &regex))) return rc;
        if (regex) {
            char p[JP];
            jpf(p, "%s.pattern.Regex", jp);
            return unsupported(file, p, "Replace pattern", regex, "mosft supports Replace with a {\"String\": ...} pattern");
        }
        if ((rc = get_str(file, o, "content", jp, &content))) return rc;
        if (!*str) {
            char p[JP];
            jpf(p, "%s.pattern.String", jp);
            return bad(file, p, "a non-empty string", get(get(o, "pattern"), "String"));
        }
        op.kind = NORM_REPLACE;
        op.a = xstrdup(str);
        op.a_len = strlen(str);
        op.b = xstrdup(content);
        op.b_len = strlen(content);
    } else if (!strcmp(type, "Strip")) {
        op.kind = NORM_STRIP;
        if ((rc = get_bool(file, o, "strip_left", jp, 1, &op.left)) || (rc = get_bool(file, o, "strip_right", jp, 1, &op.right)))
            return rc;
    } else {
        char p[JP];
        jpf(p, "%s.type", jp);
        return unsupported(file, p, "normalizer", type, "mosft supports the normalizers Sequence, Prepend, Replace and Strip");
    }
    t->norm = xrealloc(t->norm, (size_t)(t->n_norm + 1) * sizeof *t->norm);
    t->norm[t->n_norm++] = op;
    return MOSFT_OK;
}

// ---- pre-tokenizer -------------------------------------------------------------------------------------

static int split_behavior(const char *file, const cJSON *o, const char *jp, int *out) {
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    const cJSON *v = get(o, "behavior");
    if (cJSON_IsString(v))
        for (int i = 0; i < 5; i++)
            if (!strcmp(v->valuestring, names[i])) {
                *out = i;
                return MOSFT_OK;
            }
    char p[JP];
    jpf(p, "%s.behavior", jp);
    return bad(file, p, "one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous", v);
}

static int load_pretok(tokenizer *t, const cJSON *o, const char *jp) {
    const char *file = t->path, *type;
    if (is_null(o)) return MOSFT_OK;
    int rc = get_type(file, o, jp, &type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) {
        const cJSON *arr = get(o, "pretokenizers");
        char p[JP];
        jpf(p, "%s.pretokenizers", jp);
        if (!cJSON_IsArray(arr)) return bad(file, p, "an array", arr);
        int i = 0;
        for (const cJSON *e = arr->child; e; e = e->next, i++) {
            char q[JP];
            jpf(q, "%s[%d]", p, i);
            if ((rc = load_pretok(t, e, q))) return rc;
        }
        return MOSFT_OK;
    }
    if (t->byte_level) {
        char p[JP];
        jpf(p, "%s.type", jp);
        return unsupported(file, p, "pre-tokenizer after ByteLevel", type, "mosft supports ByteLevel as the last pre-tokenizer");
    }
    tok_pretok st = {0};
    st.behavior = SPLIT_ISOLATED;
    if (!strcmp(type, "Split")) {
        const char *str, *regex;
        if ((rc = get_pattern(file, o, jp, &str, &regex)) || (rc = split_behavior(file, o, jp, &st.behavior)) ||
            (rc = get_bool(file, o, "invert", jp, 0, &st.invert)))
            return rc;
        if (regex) {
            if (!strcmp(regex, k_llama3_regex)) st.kind = PRE_SPLIT_LLAMA3;
            else if (!strcmp(regex, k_gpt2_regex)) st.kind = PRE_SPLIT_GPT2;
            else {
                char p[JP];
                jpf(p, "%s.pattern.Regex", jp);
                return unsupported(file, p, "Split regex", regex,
                                   "mosft implements the Llama 3 and the GPT-2 pre-tokenizer regexes exactly, no other");
            }
        } else {
            if (!*str) {
                char p[JP];
                jpf(p, "%s.pattern.String", jp);
                return bad(file, p, "a non-empty string", get(get(o, "pattern"), "String"));
            }
            st.kind = PRE_SPLIT_STRING;
            st.pattern = xstrdup(str);
            st.pattern_len = strlen(str);
        }
    } else if (!strcmp(type, "ByteLevel")) {
        st.kind = PRE_BYTELEVEL;
        if ((rc = get_bool(file, o, "add_prefix_space", jp, 1, &st.add_prefix_space)) ||
            (rc = get_bool(file, o, "use_regex", jp, 1, &st.use_regex)))
            return rc;
        t->byte_level = 1;
    } else if (!strcmp(type, "Metaspace")) {
        st.kind = PRE_METASPACE;
        uint32_t c;
        if ((rc = get_char(file, o, "replacement", jp, 0x2581, &c)) || (rc = get_prepend_scheme(file, o, jp, &st.prepend_scheme)) ||
            (rc = get_bool(file, o, "split", jp, 1, &st.split)))
            return rc;
        st.repl_len = utf8_encode(c, st.repl);
    } else {
        char p[JP];
        jpf(p, "%s.type", jp);
        return unsupported(file, p, "pre-tokenizer", type,
                           "mosft supports the pre-tokenizers Sequence, Split, ByteLevel and Metaspace");
    }
    t->pre = xrealloc(t->pre, (size_t)(t->n_pre + 1) * sizeof *t->pre);
    t->pre[t->n_pre++] = st;
    return MOSFT_OK;
}

// ---- decoder -------------------------------------------------------------------------------------------

static int load_decoder(tokenizer *t, const cJSON *o, const char *jp) {
    const char *file = t->path, *type;
    if (is_null(o)) return MOSFT_OK;
    int rc = get_type(file, o, jp, &type);
    if (rc) return rc;
    t->has_decoder = 1;
    if (!strcmp(type, "Sequence")) {
        const cJSON *arr = get(o, "decoders");
        char p[JP];
        jpf(p, "%s.decoders", jp);
        if (!cJSON_IsArray(arr)) return bad(file, p, "an array", arr);
        int i = 0;
        for (const cJSON *e = arr->child; e; e = e->next, i++) {
            char q[JP];
            jpf(q, "%s[%d]", p, i);
            if ((rc = load_decoder(t, e, q))) return rc;
        }
        return MOSFT_OK;
    }
    tok_decoder d = {0};
    if (!strcmp(type, "Replace")) {
        const char *str, *regex, *content;
        if ((rc = get_pattern(file, o, jp, &str, &regex))) return rc;
        if (regex) {
            char p[JP];
            jpf(p, "%s.pattern.Regex", jp);
            return unsupported(file, p, "Replace pattern", regex, "mosft supports Replace with a {\"String\": ...} pattern");
        }
        if ((rc = get_str(file, o, "content", jp, &content))) return rc;
        d.kind = DEC_REPLACE;
        d.a = xstrdup(str);
        d.a_len = strlen(str);
        d.b = xstrdup(content);
        d.b_len = strlen(content);
    } else if (!strcmp(type, "ByteFallback")) {
        d.kind = DEC_BYTEFALLBACK;
    } else if (!strcmp(type, "Fuse")) {
        d.kind = DEC_FUSE;
    } else if (!strcmp(type, "Strip")) {
        d.kind = DEC_STRIP;
        if ((rc = get_char(file, o, "content", jp, ' ', &d.strip_char)) ||
            (rc = get_int(file, o, "start", jp, 0, 1 << 20, 0, &d.start)) ||
            (rc = get_int(file, o, "stop", jp, 0, 1 << 20, 0, &d.stop)))
            return rc;
    } else if (!strcmp(type, "ByteLevel")) {
        d.kind = DEC_BYTELEVEL;
    } else if (!strcmp(type, "Metaspace")) {
        d.kind = DEC_METASPACE;
        if ((rc = get_char(file, o, "replacement", jp, 0x2581, &d.strip_char)) ||
            (rc = get_prepend_scheme(file, o, jp, &d.prepend_scheme)))
            return rc;
    } else {
        char p[JP];
        jpf(p, "%s.type", jp);
        return unsupported(file, p, "decoder", type,
                           "mosft supports the decoders Sequence, Replace, ByteFallback, Fuse, Strip, ByteLevel and Metaspace");
    }
    t->dec = xrealloc(t->dec, (size_t)(t->n_dec + 1) * sizeof *t->dec);
    t->dec[t->n_dec++] = d;
    return MOSFT_OK;
}

// ---- post-processor ------------------------------------------------------------------------------------

static void ids_append(int32_t **v, int *n, const int32_t *src, int k) {
    *v = xrealloc(*v, (size_t)(*n + k + 1) * sizeof **v);
    memcpy(*v + *n, src, (size_t)k * sizeof *src);
    *n += k;
}

static int load_template(tokenizer *t, const cJSON *o, const char *jp) {
    const char *file = t->path;
    const cJSON *single = get(o, "single"), *specials = get(o, "special_tokens");
    char p[JP];
    jpf(p, "%s.single", jp);
    if (!cJSON_IsArray(single)) return bad(file, p, "an array of {\"SpecialToken\": ...} / {\"Sequence\": ...}", single);
    int32_t *pre = NULL, *suf = NULL;
    int npre = 0, nsuf = 0, seen_seq = 0, i = 0, rc = MOSFT_OK;
    for (const cJSON *e = single->child; e; e = e->next, i++) {
        char q[JP];
        jpf(q, "%s[%d]", p, i);
        const cJSON *st = get(e, "SpecialToken"), *sq = get(e, "Sequence");
        if (cJSON_IsObject(sq)) {
            seen_seq = 1;
            continue;
        }
        const cJSON *name = cJSON_IsObject(st) ? get(st, "id") : NULL;
        if (!cJSON_IsString(name)) {
            rc = bad(file, q, "{\"SpecialToken\": {\"id\": ...}} or {\"Sequence\": ...}", e);
            break;
        }
        const cJSON *ent = cJSON_IsObject(specials) ? get(specials, name->valuestring) : NULL;
        const cJSON *ids = ent ? get(ent, "ids") : NULL;
        if (!cJSON_IsArray(ids)) {
            char r[JP];
            jpf(r, "%s.special_tokens[\"%s\"].ids", jp, name->valuestring);
            rc = bad(file, r, "an array of ids", ids);
            break;
        }
        for (const cJSON *x = ids->child; x; x = x->next) {
            if (!cJSON_IsNumber(x) || x->valuedouble < 0 || x->valuedouble >= t->n_ids) {
                char r[JP];
                jpf(r, "%s.special_tokens[\"%s\"].ids", jp, name->valuestring);
                rc = bad(file, r, "ids of the vocabulary", x);
                break;
            }
            int32_t id = (int32_t)x->valuedouble;
            if (seen_seq) ids_append(&suf, &nsuf, &id, 1);
            else ids_append(&pre, &npre, &id, 1);
        }
        if (rc) break;
    }
    if (!rc) {
        // A later processor wraps the result of an earlier one.
        int32_t *np = NULL;
        int nn = 0;
        if (npre) ids_append(&np, &nn, pre, npre);
        if (t->n_post_prefix) ids_append(&np, &nn, t->post_prefix, t->n_post_prefix);
        free(t->post_prefix);
        t->post_prefix = np;
        t->n_post_prefix = nn;
        if (nsuf) ids_append(&t->post_suffix, &t->n_post_suffix, suf, nsuf);
    }
    free(pre);
    free(suf);
    return rc;
}

static int load_post(tokenizer *t, const cJSON *o, const char *jp) {
    const char *file = t->path, *type;
    if (is_null(o)) return MOSFT_OK;
    int rc = get_type(file, o, jp, &type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) {
        const cJSON *arr = get(o, "processors");
        char p[JP];
        jpf(p, "%s.processors", jp);
        if (!cJSON_IsArray(arr)) return bad(file, p, "an array", arr);
        int i = 0;
        for (const cJSON *e = arr->child; e; e = e->next, i++) {
            char q[JP];
            jpf(q, "%s[%d]", p, i);
            if ((rc = load_post(t, e, q))) return rc;
        }
        return MOSFT_OK;
    }
    if (!strcmp(type, "ByteLevel")) return MOSFT_OK;  // only trims offsets
    if (!strcmp(type, "TemplateProcessing")) return load_template(t, o, jp);
    char p[JP];
    jpf(p, "%s.type", jp);
    return unsupported(file, p, "post-processor", type,
                       "mosft supports the post-processors TemplateProcessing, ByteLevel and Sequence");
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
    if (!cJSON_IsArray(merges)) return bad(file, "model.merges", "an array", merges);
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
            rc = bad(file, jp, "\"a b\" (one space) or [\"a\", \"b\"]", e);
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
            rc = bad(file, jp, what, e);
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
    if (!cJSON_IsObject(model)) return bad(file, "model", "an object", model);
    const cJSON *tv = get(model, "type");
    if (cJSON_IsString(tv)) type = tv->valuestring;
    else if (is_null(tv) && get(model, "merges")) type = "BPE";  // older files omit it
    if (!type) return bad(file, "model.type", "\"BPE\"", tv);
    if (strcmp(type, "BPE"))
        return unsupported(file, "model.type", "model", type,
                           "mosft supports BPE tokenizers (Llama 2, Llama 3); WordPiece, Unigram and WordLevel are not");
    const cJSON *dropout = get(model, "dropout");
    if (!is_null(dropout) && (!cJSON_IsNumber(dropout) || dropout->valuedouble != 0))
        return unsupported(file, "model.dropout", "BPE option", "dropout", "BPE dropout is a training-time option; set it to null");
    const char *affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int k = 0; k < 2; k++) {
        const cJSON *v = get(model, affixes[k]);
        if (!is_null(v) && !(cJSON_IsString(v) && !v->valuestring[0])) {
            char p[JP];
            jpf(p, "model.%s", affixes[k]);
            return unsupported(file, p, "BPE option", affixes[k], "mosft supports BPE without subword prefixes/suffixes");
        }
    }
    int rc;
    if ((rc = get_bool(file, model, "byte_fallback", "model", 0, &t->byte_fallback)) ||
        (rc = get_bool(file, model, "fuse_unk", "model", 0, &t->fuse_unk)) ||
        (rc = get_bool(file, model, "ignore_merges", "model", 0, &t->ignore_merges)))
        return rc;

    // Ids: the vocabulary and the added tokens.
    const cJSON *vocab = get(model, "vocab");
    if (!cJSON_IsObject(vocab)) return bad(file, "model.vocab", "an object {token: id}", vocab);
    int64_t max_id = -1;
    int n_vocab = 0;
    for (const cJSON *e = vocab->child; e; e = e->next, n_vocab++) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > 1e9 ||
            e->valuedouble != (double)(int64_t)e->valuedouble) {
            char p[JP];
            jpf(p, "model.vocab[\"%.500s\"]", e->string);
            return bad(file, p, "an integer id >= 0", e);
        }
        if ((int64_t)e->valuedouble > max_id) max_id = (int64_t)e->valuedouble;
    }
    if (!is_null(added) && !cJSON_IsArray(added)) return bad(file, "added_tokens", "an array", added);
    int n_added = cJSON_GetArraySize(added), i = 0;
    for (const cJSON *e = added ? added->child : NULL; e; e = e->next, i++) {
        char p[JP];
        jpf(p, "added_tokens[%d]", i);
        const char *content;
        int id;
        if (!cJSON_IsObject(e)) return bad(file, p, "an object", e);
        if ((rc = get_int(file, e, "id", p, 0, 1000000000, -1, &id)) || (rc = get_str(file, e, "content", p, &content)))
            return rc;
        if (id < 0) return bad(file, p, "an \"id\"", e);
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
        jpf(p, "added_tokens[%d]", i);
        tok_added *a = &t->added[t->n_added];
        int id, sw, ls, rs, nz, sp;
        const char *content;
        get_int(file, e, "id", p, 0, 1000000000, -1, &id);
        get_str(file, e, "content", p, &content);
        if ((rc = get_bool(file, e, "single_word", p, 0, &sw)) || (rc = get_bool(file, e, "lstrip", p, 0, &ls)) ||
            (rc = get_bool(file, e, "rstrip", p, 0, &rs)) || (rc = get_bool(file, e, "normalized", p, 1, &nz)) ||
            (rc = get_bool(file, e, "special", p, 0, &sp)))
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
    tok_strmap_init(&t->model_map, (size_t)n_vocab);
    tok_strmap_init(&t->token_map, N);
    for (int32_t id = 0; id < t->n_ids; id++) {
        if (t->match_off[id] != UINT32_MAX)
            tok_strmap_insert(&t->model_map, t, t->match_off, t->match_len, tok_arena(t, t->match_off[id]),
                              t->match_len[id], id);
        if (t->str_off[id] != UINT32_MAX && t->added_of[id] >= 0)
            tok_strmap_insert(&t->token_map, t, t->str_off, t->str_len, tok_arena(t, t->str_off[id]), t->str_len[id], id);
    }
    for (int32_t id = 0; id < t->n_ids; id++)
        if (t->str_off[id] != UINT32_MAX && t->added_of[id] < 0)
            tok_strmap_insert(&t->token_map, t, t->str_off, t->str_len, tok_arena(t, t->str_off[id]), t->str_len[id], id);

    // unk, byte fallback and the per-byte / per-ASCII initial symbols.
    const cJSON *unk = get(model, "unk_token");
    t->unk_id = -1;
    if (!is_null(unk)) {
        if (!cJSON_IsString(unk)) {
            buf_free(&m);
            return bad(file, "model.unk_token", "a string or null", unk);
        }
        t->unk_id = model_id(t, unk->valuestring, &m);
        if (t->unk_id < 0) {
            buf_free(&m);
            return bad(file, "model.unk_token", "a token of model.vocab", unk);
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
    return load_merges(t, get(model, "merges"));
}

// Patterns of the added tokens (normalized ones are matched in their normalized form) and the tries.
static void finish_added(tokenizer *t) {
    for (int i = 0; i < t->n_added; i++) {
        tok_added *a = &t->added[i];
        if (a->normalized && t->n_norm) {
            tok_normalize(t, tok_arena(t, a->off), a->len, &t->norm_a);
            a->pat_len = (uint32_t)t->norm_a.len;
            a->pat_off = arena_add(t, t->norm_a.data, t->norm_a.len);
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
    const cJSON *v = get(cfg, k);
    if (cJSON_IsString(v)) return v->valuestring;
    if (cJSON_IsObject(v) && cJSON_IsString(get(v, "content"))) return get(v, "content")->valuestring;
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
    if (!cJSON_IsObject(root)) rc = bad(file, "(top level)", "an object", root);
    // The pre-tokenizer first: it decides whether the vocabulary is byte-level.
    if (!rc) rc = load_pretok(t, get(root, "pre_tokenizer"), "pre_tokenizer");
    if (!rc) rc = load_normalizer(t, get(root, "normalizer"), "normalizer");
    if (!rc) rc = load_model(t, get(root, "model"), get(root, "added_tokens"));
    if (!rc) rc = load_post(t, get(root, "post_processor"), "post_processor");
    if (!rc) rc = load_decoder(t, get(root, "decoder"), "decoder");
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
    return tok_strmap_get(&t->token_map, t, t->str_off, t->str_len, token, strlen(token));
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
