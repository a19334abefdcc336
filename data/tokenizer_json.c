// tokenizer_json.c: reading tokenizer.json's pipeline components (normalizer, pre-tokenizer, post-processor,
// decoder) into the tokenizer, and the JSON helpers that name the JSON path of what is wrong.
#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer_internal.h"
#include "data/unicode.h"

const char *tokj_path(char *buf, const char *fmt, ...) {
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

int tokj_bad(const char *file, const char *jp, const char *expected, const cJSON *got) {
    char g[JP];
    render(got, g, sizeof g);
    return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected %s, got %s", file, jp, expected, g);
}

int tokj_unsupported(const char *file, const char *jp, const char *what, const char *name, const char *supported) {
    return mosft_fail_hint(MOSFT_ERR_INPUT, supported, "%s: %s: unsupported %s \"%s\"", file, jp, what, name);
}

// ---- small JSON helpers -------------------------------------------------------------------------------



// A bool field: absent/null = dflt.
int tokj_bool(const char *file, const cJSON *o, const char *k, const char *jp, int dflt, int *out) {
    const cJSON *v = tokj_get(o, k);
    if (tokj_null(v)) {
        *out = dflt;
        return MOSFT_OK;
    }
    if (!cJSON_IsBool(v)) {
        char p[JP];
        tokj_path(p, "%s.%s", jp, k);
        return tokj_bad(file, p, "true or false", v);
    }
    *out = cJSON_IsTrue(v);
    return MOSFT_OK;
}

// A required string field.
int tokj_str(const char *file, const cJSON *o, const char *k, const char *jp, const char **out) {
    const cJSON *v = tokj_get(o, k);
    if (!cJSON_IsString(v)) {
        char p[JP];
        tokj_path(p, "%s.%s", jp, k);
        return tokj_bad(file, p, "a string", v);
    }
    *out = v->valuestring;
    return MOSFT_OK;
}

int tokj_int(const char *file, const cJSON *o, const char *k, const char *jp, int lo, int hi, int dflt, int *out) {
    const cJSON *v = tokj_get(o, k);
    if (tokj_null(v)) {
        *out = dflt;
        return MOSFT_OK;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != (double)(long long)v->valuedouble || v->valuedouble < lo ||
        v->valuedouble > hi) {
        char p[512], e[64];
        tokj_path(p, "%s.%s", jp, k);
        tokj_path(e, "an integer in [%d, %d]", lo, hi);
        return tokj_bad(file, p, e, v);
    }
    *out = (int)v->valuedouble;
    return MOSFT_OK;
}

// The "type" of a component object.
static int get_type(const char *file, const cJSON *o, const char *jp, const char **out) {
    if (!cJSON_IsObject(o)) return tokj_bad(file, jp, "an object or null", o);
    return tokj_str(file, o, "type", jp, out);
}

// A {"String": s} / {"Regex": r} pattern.
static int get_pattern(const char *file, const cJSON *o, const char *jp, const char **str, const char **regex) {
    char p[JP];
    tokj_path(p, "%s.pattern", jp);
    const cJSON *v = tokj_get(o, "pattern");
    *str = *regex = NULL;
    if (cJSON_IsObject(v)) {
        const cJSON *s = tokj_get(v, "String"), *r = tokj_get(v, "Regex");
        if (cJSON_IsString(s)) *str = s->valuestring;
        else if (cJSON_IsString(r)) *regex = r->valuestring;
    }
    if (!*str && !*regex) return tokj_bad(file, p, "{\"String\": ...} or {\"Regex\": ...}", v);
    return MOSFT_OK;
}


// The single character of a string field (Metaspace replacement, Strip content).
static int get_char(const char *file, const cJSON *o, const char *k, const char *jp, uint32_t dflt, uint32_t *out) {
    const cJSON *v = tokj_get(o, k);
    if (tokj_null(v)) {
        *out = dflt;
        return MOSFT_OK;
    }
    size_t l;
    if (!cJSON_IsString(v) || !v->valuestring[0] ||
        utf8_valid_prefix((const uint8_t *)v->valuestring, strlen(v->valuestring)) != strlen(v->valuestring) ||
        utf8_len((uint8_t)v->valuestring[0]) != strlen(v->valuestring)) {
        char p[JP];
        tokj_path(p, "%s.%s", jp, k);
        return tokj_bad(file, p, "a string of one character", v);
    }
    *out = utf8_decode_valid((const uint8_t *)v->valuestring, &l);
    return MOSFT_OK;
}

static int get_prepend_scheme(const char *file, const cJSON *o, const char *jp, int *out) {
    const cJSON *v = tokj_get(o, "prepend_scheme");
    if (tokj_null(v)) {  // before tokenizers 0.19: add_prefix_space
        int aps;
        int rc = tokj_bool(file, o, "add_prefix_space", jp, 1, &aps);
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
    tokj_path(p, "%s.prepend_scheme", jp);
    return tokj_bad(file, p, "\"always\", \"never\" or \"first\"", tokj_get(o, "prepend_scheme"));
}

// A "Sequence" component: each element of o[key] loaded in order by `load` (the JSON path says which).
static int load_sequence(tokenizer *t, const cJSON *o, const char *jp, const char *key,
                         int (*load)(tokenizer *, const cJSON *, const char *)) {
    const cJSON *arr = tokj_get(o, key);
    char p[JP];
    tokj_path(p, "%s.%s", jp, key);
    if (!cJSON_IsArray(arr)) return tokj_bad(t->path, p, "an array", arr);
    int i = 0;
    for (const cJSON *e = arr->child; e; e = e->next, i++) {
        char q[JP];
        tokj_path(q, "%s[%d]", p, i);
        int rc = load(t, e, q);
        if (rc) return rc;
    }
    return MOSFT_OK;
}

// ---- normalizer ----------------------------------------------------------------------------------------

int tok_load_normalizer(tokenizer *t, const cJSON *o, const char *jp) {
    const char *file = t->path, *type;
    if (tokj_null(o)) return MOSFT_OK;
    int rc = get_type(file, o, jp, &type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) return load_sequence(t, o, jp, "normalizers", tok_load_normalizer);
    tok_norm_op op = {0};
    if (!strcmp(type, "Prepend")) {
        const char *s;
        if ((rc = tokj_str(file, o, "prepend", jp, &s))) return rc;
        op.kind = NORM_PREPEND;
        op.a = xstrdup(s);
        op.a_len = strlen(s);
    } else if (!strcmp(type, "Replace")) {
        const char *str, *regex, *content;
        if ((rc = get_pattern(file, o, jp, &str, &regex))) return rc;
        if (regex) {
            char p[JP];
            tokj_path(p, "%s.pattern.Regex", jp);
            return tokj_unsupported(file, p, "Replace pattern", regex, "mosft supports Replace with a {\"String\": ...} pattern");
        }
        if ((rc = tokj_str(file, o, "content", jp, &content))) return rc;
        if (!*str) {
            char p[JP];
            tokj_path(p, "%s.pattern.String", jp);
            return tokj_bad(file, p, "a non-empty string", tokj_get(tokj_get(o, "pattern"), "String"));
        }
        op.kind = NORM_REPLACE;
        op.a = xstrdup(str);
        op.a_len = strlen(str);
        op.b = xstrdup(content);
        op.b_len = strlen(content);
    } else if (!strcmp(type, "Strip")) {
        op.kind = NORM_STRIP;
        if ((rc = tokj_bool(file, o, "strip_left", jp, 1, &op.left)) || (rc = tokj_bool(file, o, "strip_right", jp, 1, &op.right)))
            return rc;
    } else {
        char p[JP];
        tokj_path(p, "%s.type", jp);
        return tokj_unsupported(file, p, "normalizer", type, "mosft supports the normalizers Sequence, Prepend, Replace and Strip");
    }
    t->norm = xrealloc(t->norm, (size_t)(t->n_norm + 1) * sizeof *t->norm);
    t->norm[t->n_norm++] = op;
    return MOSFT_OK;
}

// ---- pre-tokenizer -------------------------------------------------------------------------------------

static int split_behavior(const char *file, const cJSON *o, const char *jp, int *out) {
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    const cJSON *v = tokj_get(o, "behavior");
    if (cJSON_IsString(v))
        for (int i = 0; i < 5; i++)
            if (!strcmp(v->valuestring, names[i])) {
                *out = i;
                return MOSFT_OK;
            }
    char p[JP];
    tokj_path(p, "%s.behavior", jp);
    return tokj_bad(file, p, "one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous", v);
}

int tok_load_pretok(tokenizer *t, const cJSON *o, const char *jp) {
    const char *file = t->path, *type;
    if (tokj_null(o)) return MOSFT_OK;
    int rc = get_type(file, o, jp, &type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) return load_sequence(t, o, jp, "pretokenizers", tok_load_pretok);
    if (t->byte_level) {
        char p[JP];
        tokj_path(p, "%s.type", jp);
        return tokj_unsupported(file, p, "pre-tokenizer after ByteLevel", type, "mosft supports ByteLevel as the last pre-tokenizer");
    }
    tok_pretok st = {0};
    st.behavior = SPLIT_ISOLATED;
    if (!strcmp(type, "Split")) {
        const char *str, *regex;
        if ((rc = get_pattern(file, o, jp, &str, &regex)) || (rc = split_behavior(file, o, jp, &st.behavior)) ||
            (rc = tokj_bool(file, o, "invert", jp, 0, &st.invert)))
            return rc;
        if (regex) {
            if (!strcmp(regex, k_llama3_regex)) st.kind = PRE_SPLIT_LLAMA3;
            else if (!strcmp(regex, k_gpt2_regex)) st.kind = PRE_SPLIT_GPT2;
            else {
                char p[JP];
                tokj_path(p, "%s.pattern.Regex", jp);
                return tokj_unsupported(file, p, "Split regex", regex,
                                   "mosft implements the Llama 3 and the GPT-2 pre-tokenizer regexes exactly, no other");
            }
        } else {
            if (!*str) {
                char p[JP];
                tokj_path(p, "%s.pattern.String", jp);
                return tokj_bad(file, p, "a non-empty string", tokj_get(tokj_get(o, "pattern"), "String"));
            }
            st.kind = PRE_SPLIT_STRING;
            st.pattern = xstrdup(str);
            st.pattern_len = strlen(str);
        }
    } else if (!strcmp(type, "ByteLevel")) {
        st.kind = PRE_BYTELEVEL;
        if ((rc = tokj_bool(file, o, "add_prefix_space", jp, 1, &st.add_prefix_space)) ||
            (rc = tokj_bool(file, o, "use_regex", jp, 1, &st.use_regex)))
            return rc;
        t->byte_level = 1;
    } else if (!strcmp(type, "Metaspace")) {
        st.kind = PRE_METASPACE;
        uint32_t c;
        if ((rc = get_char(file, o, "replacement", jp, 0x2581, &c)) || (rc = get_prepend_scheme(file, o, jp, &st.prepend_scheme)) ||
            (rc = tokj_bool(file, o, "split", jp, 1, &st.split)))
            return rc;
        st.repl_len = utf8_encode(c, st.repl);
    } else {
        char p[JP];
        tokj_path(p, "%s.type", jp);
        return tokj_unsupported(file, p, "pre-tokenizer", type,
                           "mosft supports the pre-tokenizers Sequence, Split, ByteLevel and Metaspace");
    }
    t->pre = xrealloc(t->pre, (size_t)(t->n_pre + 1) * sizeof *t->pre);
    t->pre[t->n_pre++] = st;
    return MOSFT_OK;
}

// ---- decoder -------------------------------------------------------------------------------------------

int tok_load_decoder(tokenizer *t, const cJSON *o, const char *jp) {
    const char *file = t->path, *type;
    if (tokj_null(o)) return MOSFT_OK;
    int rc = get_type(file, o, jp, &type);
    if (rc) return rc;
    t->has_decoder = 1;
    if (!strcmp(type, "Sequence")) return load_sequence(t, o, jp, "decoders", tok_load_decoder);
    tok_decoder d = {0};
    if (!strcmp(type, "Replace")) {
        const char *str, *regex, *content;
        if ((rc = get_pattern(file, o, jp, &str, &regex))) return rc;
        if (regex) {
            char p[JP];
            tokj_path(p, "%s.pattern.Regex", jp);
            return tokj_unsupported(file, p, "Replace pattern", regex, "mosft supports Replace with a {\"String\": ...} pattern");
        }
        if ((rc = tokj_str(file, o, "content", jp, &content))) return rc;
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
            (rc = tokj_int(file, o, "start", jp, 0, 1 << 20, 0, &d.start)) ||
            (rc = tokj_int(file, o, "stop", jp, 0, 1 << 20, 0, &d.stop)))
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
        tokj_path(p, "%s.type", jp);
        return tokj_unsupported(file, p, "decoder", type,
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
    const cJSON *single = tokj_get(o, "single"), *specials = tokj_get(o, "special_tokens");
    char p[JP];
    tokj_path(p, "%s.single", jp);
    if (!cJSON_IsArray(single)) return tokj_bad(file, p, "an array of {\"SpecialToken\": ...} / {\"Sequence\": ...}", single);
    int32_t *pre = NULL, *suf = NULL;
    int npre = 0, nsuf = 0, seen_seq = 0, i = 0, rc = MOSFT_OK;
    for (const cJSON *e = single->child; e; e = e->next, i++) {
        char q[JP];
        tokj_path(q, "%s[%d]", p, i);
        const cJSON *st = tokj_get(e, "SpecialToken"), *sq = tokj_get(e, "Sequence");
        if (cJSON_IsObject(sq)) {
            seen_seq = 1;
            continue;
        }
        const cJSON *name = cJSON_IsObject(st) ? tokj_get(st, "id") : NULL;
        if (!cJSON_IsString(name)) {
            rc = tokj_bad(file, q, "{\"SpecialToken\": {\"id\": ...}} or {\"Sequence\": ...}", e);
            break;
        }
        const cJSON *ent = cJSON_IsObject(specials) ? tokj_get(specials, name->valuestring) : NULL;
        const cJSON *ids = ent ? tokj_get(ent, "ids") : NULL;
        if (!cJSON_IsArray(ids)) {
            char r[JP];
            tokj_path(r, "%s.special_tokens[\"%s\"].ids", jp, name->valuestring);
            rc = tokj_bad(file, r, "an array of ids", ids);
            break;
        }
        for (const cJSON *x = ids->child; x; x = x->next) {
            if (!cJSON_IsNumber(x) || x->valuedouble < 0 || x->valuedouble >= t->n_ids) {
                char r[JP];
                tokj_path(r, "%s.special_tokens[\"%s\"].ids", jp, name->valuestring);
                rc = tokj_bad(file, r, "ids of the vocabulary", x);
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

int tok_load_post(tokenizer *t, const cJSON *o, const char *jp) {
    const char *file = t->path, *type;
    if (tokj_null(o)) return MOSFT_OK;
    int rc = get_type(file, o, jp, &type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) return load_sequence(t, o, jp, "processors", tok_load_post);
    if (!strcmp(type, "ByteLevel")) return MOSFT_OK;  // only trims offsets
    if (!strcmp(type, "TemplateProcessing")) return load_template(t, o, jp);
    char p[JP];
    tokj_path(p, "%s.type", jp);
    return tokj_unsupported(file, p, "post-processor", type,
                       "mosft supports the post-processors TemplateProcessing, ByteLevel and Sequence");
}
