// formats.c: dataset records -> chat examples (see formats.h).
#include "data/formats.h"

#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/rng.h"

// Purpose tag of the data streams in core/rng.h's key space (far from the model's purposes).
#define RNG_DATA_TEMPLATE 0x64617461u  // "data"

static const char *const k_format_names[FMT_COUNT] = {"codealpaca", "superni", "flan_v2", "messages",
                                                      "prompt_completion"};

int data_format_parse(const char *name, data_format *out) {
    for (int i = 0; i < FMT_COUNT; i++)
        if (!strcmp(name, k_format_names[i])) {
            *out = (data_format)i;
            return MOSFT_OK;
        }
    return mosft_fail(MOSFT_ERR_INPUT, "format: expected one of codealpaca, superni, flan_v2, messages, "
                      "prompt_completion, got \"%s\"", name);
}

const char *data_format_name(data_format f) { return f >= 0 && f < FMT_COUNT ? k_format_names[f] : "?"; }

record_mode data_format_record_mode(data_format f) { return f == FMT_SUPERNI ? REC_WHOLE : REC_AUTO; }

// ---- random stream ----------------------------------------------------------------------------

void data_rng_init(data_rng *r, uint64_t seed, uint64_t a, uint64_t b) {
    r->key = rng_key(RNG_DATA_TEMPLATE, seed, a, b, 0);
    r->ctr = 0;
}

uint64_t data_rng_u64(data_rng *r) {
    uint64_t hi = rng_u32(r->key, r->ctr++);
    return (hi << 32) | rng_u32(r->key, r->ctr++);
}

double data_rng_double(data_rng *r) { return (double)(data_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }

uint64_t data_rng_below(data_rng *r, uint64_t n) {
    if (n <= 1) return 0;
    if (n <= 0xffffffffull) return rng_below(r->key, &r->ctr, (uint32_t)n);
    uint64_t lim = UINT64_MAX - UINT64_MAX % n;
    for (;;) {
        uint64_t x = data_rng_u64(r);
        if (x < lim) return x % n;
    }
}

uint64_t data_hash_str(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

// ---- templates (open-instruct instruction_encode_templates.py) --------------------------------

typedef struct {
    const char *prompt, *completion;
    double weight;
} tmpl;

static const tmpl k_w_input[N_TEMPLATES] = {
    {"{instruction}\n\n{input}\n\n", "{output}", 0.2},
    {"{instruction}\n{input}\n\n", "{output}", 0.1},
    {"{instruction}\n{input}\n", "{output}", 0.1},
    {"{instruction}\n\nInput: {input}\n\nOutput:", "{output}", 0.05},
    {"{instruction}\nInput: {input}\nOutput:", "{output}", 0.05},
    {"{instruction}\n{input}\n\nResponse:", "{output}", 0.05},
    {"{instruction}\n\nAdditional Context:\n{input}\n\nAnswer:", "{output}", 0.05},
    {"Task: {instruction}\nInput: {input}\nOutput:", "{output}", 0.05},
    {"Task: {instruction}\n\n{input}\n\n", "{output}", 0.05},
    {"Task: {instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05},
    {"You need to complete the following task:\n\n{instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05},
    {"{instruction}\n\nNow complete the following instance -\nInput: {input}\nOutput:", "{output}", 0.05},
    {"Instruction:{instruction}\n\nInput: {input}\n\n", "{output}", 0.05},
    {"Below is an instruction that describes a task, paired with an input that provides further context. "
     "Write a response that appropriately completes the request.\n\n"
     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
     "{output}", 0.1},
};

static const tmpl k_wo_input[N_TEMPLATES] = {
    {"{instruction}\n\n", "{output}", 0.2},
    {"{instruction}\n", "{output}", 0.1},
    {"{instruction}", "\n{output}", 0.1},
    {"{instruction} Output:", "{output}", 0.05},
    {"{instruction}\nResponse:", "{output}", 0.05},
    {"{instruction}\n\nAnswer:", "{output}", 0.05},
    {"Task: {instruction}\n\n", "{output}", 0.05},
    {"Instruction: {instruction}\n", "{output}", 0.05},
    {"Instruction: {instruction}\nOutput:", "{output}", 0.05},
    {"You need to complete the following task:\n\n{instruction}\n\n", "{output}", 0.05},
    {"Can you help with this?\n\n{instruction}\n", "{output}", 0.05},
    {"Plase answer the following request: {instruction}\nAnswer:", "{output}", 0.05},  // upstream typo
    {"Tell me how would you respond to the following request.\n{instruction}\n", "{output}", 0.05},
    {"Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:",
     "{output}", 0.1},
};

static const char *const k_w_names[N_TEMPLATES] = {"w_input[0]", "w_input[1]", "w_input[2]", "w_input[3]",
                                                   "w_input[4]", "w_input[5]", "w_input[6]", "w_input[7]",
                                                   "w_input[8]", "w_input[9]", "w_input[10]", "w_input[11]",
                                                   "w_input[12]", "w_input[13]"};
static const char *const k_wo_names[N_TEMPLATES] = {"wo_input[0]", "wo_input[1]", "wo_input[2]", "wo_input[3]",
                                                    "wo_input[4]", "wo_input[5]", "wo_input[6]", "wo_input[7]",
                                                    "wo_input[8]", "wo_input[9]", "wo_input[10]", "wo_input[11]",
                                                    "wo_input[12]", "wo_input[13]"};

const char *template_name(int with_input, int idx) { return with_input ? k_w_names[idx] : k_wo_names[idx]; }

int template_draw(data_rng *r, int with_input) {
    const tmpl *t = with_input ? k_w_input : k_wo_input;
    double cum[N_TEMPLATES], total = 0;
    for (int i = 0; i < N_TEMPLATES; i++) cum[i] = total += t[i].weight;  // Python's accumulate order
    double u = data_rng_double(r) * total;
    for (int i = 0; i < N_TEMPLATES; i++)
        if (u < cum[i]) return i;  // bisect_right
    return N_TEMPLATES - 1;
}

// str.format with {instruction}, {input}, {output}; values are already stripped.
static void subst(mosft_buf *out, const char *fmt, const char *I, size_t ni, const char *X, size_t nx, const char *O,
                  size_t no) {
    out->len = 0;
    for (const char *p = fmt; *p;) {
        if (*p == '{') {
            if (!strncmp(p, "{instruction}", 13)) {
                buf_append(out, I, ni);
                p += 13;
                continue;
            }
            if (!strncmp(p, "{input}", 7)) {
                buf_append(out, X, nx);
                p += 7;
                continue;
            }
            if (!strncmp(p, "{output}", 8)) {
                buf_append(out, O, no);
                p += 8;
                continue;
            }
        }
        const char *q = strchr(p + 1, '{');
        size_t n = q ? (size_t)(q - p) : strlen(p);
        buf_append(out, p, n);
        p += n;
    }
    buf_cstr(out);
}

void template_apply(chat_example *ex, int with_input, int idx, const char *instr, const char *input, const char *output) {
    const tmpl *t = with_input ? &k_w_input[idx] : &k_wo_input[idx];
    size_t ia, ib, xa = 0, xb = 0, oa, ob;
    py_strip(instr, strlen(instr), &ia, &ib);
    if (with_input) py_strip(input, strlen(input), &xa, &xb);
    py_strip(output, strlen(output), &oa, &ob);
    mosft_buf b = {0};
    const char *X = with_input ? input : "";
    subst(&b, t->prompt, instr + ia, ib - ia, X + xa, xb - xa, output + oa, ob - oa);
    chat_example_add(ex, ROLE_USER, b.data, b.len);
    subst(&b, t->completion, instr + ia, ib - ia, X + xa, xb - xa, output + oa, ob - oa);
    chat_example_add(ex, ROLE_ASSISTANT, b.data, b.len);
    buf_free(&b);
    ex->template_name = template_name(with_input, idx);
}

static int is_blank(const char *s) {
    size_t a, b;
    if (!s) return 1;
    py_strip(s, strlen(s), &a, &b);
    return a == b;
}

void format_instruction_example(chat_example *ex, data_rng *r, const char *instr, const char *input, const char *output) {
    int with_input = !is_blank(input);
    int idx = template_draw(r, with_input);
    template_apply(ex, with_input, idx, instr, input ? input : "", output);
}

static void append_stripped(mosft_buf *b, const char *s) {
    size_t a, e;
    py_strip(s, strlen(s), &a, &e);
    buf_append(b, s + a, e - a);
}

void format_few_shot_example(chat_example *ex, const char *definition, const char **ex_in, const char **ex_out, int n_ex,
                             const char *input, const char *output) {
    mosft_buf b = {0};
    append_stripped(&b, definition);
    buf_append_str(&b, "\n\n");
    for (int i = 0; i < n_ex; i++) {
        buf_append_str(&b, "Input:\n");
        append_stripped(&b, ex_in[i]);
        buf_append_str(&b, "\nOutput:\n");
        append_stripped(&b, ex_out[i]);
        buf_append_str(&b, "\n\n");
    }
    buf_append_str(&b, "Input:\n");
    append_stripped(&b, input);
    buf_append_str(&b, "\nOutput:\n");
    chat_example_add(ex, ROLE_USER, b.data, b.len);
    b.len = 0;
    append_stripped(&b, output);
    chat_example_add(ex, ROLE_ASSISTANT, b.data ? b.data : "", b.len);
    buf_free(&b);
    ex->template_name = "few_shot";
}

// ---- records ----------------------------------------------------------------------------------

static const char *json_kind(const cJSON *j) {
    if (!j) return "nothing (missing)";
    if (cJSON_IsString(j)) return "a string";
    if (cJSON_IsNumber(j)) return "a number";
    if (cJSON_IsBool(j)) return "a boolean";
    if (cJSON_IsNull(j)) return "null";
    if (cJSON_IsArray(j)) return "an array";
    if (cJSON_IsObject(j)) return "an object";
    return "something else";
}

// A string field; null_ok: null reads as "" (open-instruct's `input is not None` check).
static int get_str(const cJSON *rec, const char *key, int null_ok, const char **out) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(rec, key);
    if (cJSON_IsString(j)) {
        *out = j->valuestring;
        return MOSFT_OK;
    }
    if (null_ok && (!j || cJSON_IsNull(j))) {
        *out = "";
        return MOSFT_OK;
    }
    return mosft_fail(MOSFT_ERR_INPUT, "\"%s\": expected a string, got %s", key, json_kind(j));
}

static int format_messages(const cJSON *rec, chat_example *ex) {
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(rec, "messages");
    if (!cJSON_IsArray(msgs)) return mosft_fail(MOSFT_ERR_INPUT, "\"messages\": expected an array, got %s", json_kind(msgs));
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, msgs) {
        if (!cJSON_IsObject(m))
            return mosft_fail(MOSFT_ERR_INPUT, "messages[%d]: expected an object {role, content}, got %s", i, json_kind(m));
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (!cJSON_IsString(role))
            return mosft_fail(MOSFT_ERR_INPUT, "messages[%d].role: expected a string, got %s", i, json_kind(role));
        if (!cJSON_IsString(content))
            return mosft_fail(MOSFT_ERR_INPUT, "messages[%d].content: expected a string, got %s", i, json_kind(content));
        chat_role r;
        if (!strcmp(role->valuestring, "system")) r = ROLE_SYSTEM;
        else if (!strcmp(role->valuestring, "user")) r = ROLE_USER;
        else if (!strcmp(role->valuestring, "assistant")) r = ROLE_ASSISTANT;
        else {
            char q[64];
            mosft_quote(q, sizeof q, role->valuestring);
            return mosft_fail(MOSFT_ERR_INPUT, "messages[%d].role: expected \"system\", \"user\" or \"assistant\", got %s", i, q);
        }
        chat_example_add(ex, r, content->valuestring, strlen(content->valuestring));
        i++;
    }
    if (i == 0) return mosft_fail(MOSFT_ERR_INPUT, "\"messages\": expected at least one message, got []");
    return MOSFT_OK;
}

int format_record(data_format f, const cJSON *rec, data_rng *r, chat_example *ex) {
    chat_example_clear(ex);
    if (!cJSON_IsObject(rec)) return mosft_fail(MOSFT_ERR_INPUT, "expected a JSON object, got %s", json_kind(rec));
    const char *a = NULL, *b = NULL, *c = NULL;
    int rc;
    switch (f) {
    case FMT_CODEALPACA:
        if ((rc = get_str(rec, "instruction", 0, &a)) || (rc = get_str(rec, "input", 1, &b)) ||
            (rc = get_str(rec, "output", 0, &c)))
            return rc;
        format_instruction_example(ex, r, a, b, c);
        return MOSFT_OK;
    case FMT_FLAN_V2: {
        if ((rc = get_str(rec, "inputs", 0, &a)) || (rc = get_str(rec, "targets", 0, &b))) return rc;
        // open-instruct: a prompt that ends neither with "\n" nor (right-stripped) with ":" gets "\n".
        size_t n = strlen(a), s0, s1;
        py_strip(a, n, &s0, &s1);
        int add_nl = !(n && a[n - 1] == '\n') && !(s1 > s0 && a[s1 - 1] == ':');
        mosft_buf p = {0};
        buf_append(&p, a, n);
        if (add_nl) buf_append(&p, "\n", 1);
        chat_example_add(ex, ROLE_USER, p.data ? p.data : "", p.len);
        buf_free(&p);
        chat_example_add(ex, ROLE_ASSISTANT, b, strlen(b));
        return MOSFT_OK;
    }
    case FMT_MESSAGES: return format_messages(rec, ex);
    case FMT_PROMPT_COMPLETION:
        if ((rc = get_str(rec, "prompt", 0, &a)) || (rc = get_str(rec, "completion", 0, &b))) return rc;
        chat_example_add(ex, ROLE_USER, a, strlen(a));
        chat_example_add(ex, ROLE_ASSISTANT, b, strlen(b));
        ex->prompt_completion = 1;
        return MOSFT_OK;
    default: return mosft_fail(MOSFT_ERR_INPUT, "format %s: expected a per-record format", data_format_name(f));
    }
}

// ---- SuperNI ----------------------------------------------------------------------------------

void superni_task_name(const char *path, char *out, size_t n) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t len = strlen(base);
    static const char *const k_sufs[] = {".json.gz", ".json", ".gz"};
    for (int i = 0; i < 3; i++) {
        size_t sl = strlen(k_sufs[i]);
        if (len > sl && !strcmp(base + len - sl, k_sufs[i])) {
            len -= sl;
            break;
        }
    }
    if (len >= n) len = n - 1;
    memcpy(out, base, len);
    out[len] = 0;
}

// A string, or the first string of a list (instance outputs are lists; exemplar outputs strings).
static const char *str_or_first(const cJSON *j) {
    if (cJSON_IsString(j)) return j->valuestring;
    if (cJSON_IsArray(j) && cJSON_IsString(cJSON_GetArrayItem(j, 0))) return cJSON_GetArrayItem(j, 0)->valuestring;
    return NULL;
}

// Draw k of n indices without replacement, in draw order (random.sample's contract).
static void sample_indices(data_rng *r, int n, int k, int *out) {
    int *perm = xmalloc((size_t)n * sizeof(int));
    for (int i = 0; i < n; i++) perm[i] = i;
    for (int i = 0; i < k; i++) {
        int j = i + (int)data_rng_below(r, (uint64_t)(n - i));
        int t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
        out[i] = perm[i];
    }
    free(perm);
}

int superni_task_examples(const cJSON *task, const superni_opts *o, data_rng *r, chat_example **out, int *n,
                          int *n_bad, char *bad_reason, size_t bad_reason_n) {
    *out = NULL;
    *n = 0;
    *n_bad = 0;
    if (bad_reason && bad_reason_n) bad_reason[0] = 0;
    if (!cJSON_IsObject(task)) return mosft_fail(MOSFT_ERR_INPUT, "expected a SuperNI task object, got %s", json_kind(task));
    // Definition: a list (released files; element 0) or a plain string (older files).
    const cJSON *def = cJSON_GetObjectItemCaseSensitive(task, "Definition");
    const char *definition = str_or_first(def);
    if (!definition)
        return mosft_fail(MOSFT_ERR_INPUT, "\"Definition\": expected a list of strings or a string, got %s",
                          cJSON_IsArray(def) && cJSON_GetArraySize(def) == 0 ? "[]" : json_kind(def));
    const cJSON *inst = cJSON_GetObjectItemCaseSensitive(task, "Instances");
    if (!cJSON_IsArray(inst)) return mosft_fail(MOSFT_ERR_INPUT, "\"Instances\": expected an array, got %s", json_kind(inst));
    const cJSON *pos = cJSON_GetObjectItemCaseSensitive(task, "Positive Examples");
    int n_inst = cJSON_GetArraySize(inst);
    int want = o->zero_shot + o->few_shot;
    int m = want < n_inst ? want : n_inst;
    int *sel = xmalloc((size_t)(m > 0 ? m : 1) * sizeof(int));
    if (want < n_inst) sample_indices(r, n_inst, m, sel);
    else
        for (int i = 0; i < m; i++) sel[i] = i;
    // Positive exemplars that are usable (both fields present).
    int n_pos_all = cJSON_IsArray(pos) ? cJSON_GetArraySize(pos) : 0;
    const char **pin = xmalloc((size_t)(n_pos_all + 1) * sizeof(char *));
    const char **pout = xmalloc((size_t)(n_pos_all + 1) * sizeof(char *));
    int n_pos = 0;
    for (int i = 0; i < n_pos_all; i++) {
        const cJSON *e = cJSON_GetArrayItem(pos, i);
        const char *a = str_or_first(cJSON_GetObjectItemCaseSensitive(e, "input"));
        const char *b = str_or_first(cJSON_GetObjectItemCaseSensitive(e, "output"));
        if (a && b) {
            pin[n_pos] = a;
            pout[n_pos] = b;
            n_pos++;
        }
    }
    chat_example *v = xcalloc((size_t)(m > 0 ? m : 1), sizeof *v);
    int k = 0;
    const char *ein[64], *eout[64];
    int *ex_idx = xmalloc((size_t)(n_pos + 1) * sizeof(int));
    for (int s = 0; s < m; s++) {
        const cJSON *e = cJSON_GetArrayItem(inst, sel[s]);
        const char *input = cJSON_IsObject(e) ? str_or_first(cJSON_GetObjectItemCaseSensitive(e, "input")) : NULL;
        const char *output = cJSON_IsObject(e) ? str_or_first(cJSON_GetObjectItemCaseSensitive(e, "output")) : NULL;
        if (!input || !output) {
            if (*n_bad == 0 && bad_reason)
                snprintf(bad_reason, bad_reason_n, "Instances[%d]: expected {\"input\": string, \"output\": [string, ...]}",
                         sel[s]);
            (*n_bad)++;
            continue;
        }
        if (s < o->zero_shot) {
            format_instruction_example(&v[k++], r, definition, input, output);
        } else {
            int ne;
            if (o->n_few_shot < n_pos) {
                ne = o->n_few_shot < 64 ? o->n_few_shot : 64;
                sample_indices(r, n_pos, ne, ex_idx);
            } else {
                ne = n_pos < 64 ? n_pos : 64;
                for (int i = 0; i < ne; i++) ex_idx[i] = i;
            }
            for (int i = 0; i < ne; i++) {
                ein[i] = pin[ex_idx[i]];
                eout[i] = pout[ex_idx[i]];
            }
            format_few_shot_example(&v[k++], definition, ein, eout, ne, input, output);
        }
    }
    free(ex_idx);
    free(pin);
    free(pout);
    free(sel);
    *out = v;
    *n = k;
    return MOSFT_OK;
}

// ---- task lists -------------------------------------------------------------------------------

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int name_set_load(name_set *s, const char *path, const source_http_opts *http) {
    s->names = NULL;
    s->n = 0;
    byte_source *src;
    int rc = source_open(&src, path, http);
    if (rc != MOSFT_OK) return rc;
    mosft_buf b = {0};
    char tmp[65536];
    int64_t r;
    while ((r = source_read(src, tmp, sizeof tmp)) > 0) buf_append(&b, tmp, (size_t)r);
    source_close(src);
    if (r < 0) {
        buf_free(&b);
        return mosft_error_code();
    }
    buf_cstr(&b);
    int cap = 0;
    char *save = NULL;
    for (char *line = b.len ? strtok_r(b.data, "\n", &save) : NULL; line; line = strtok_r(NULL, "\n", &save)) {
        size_t a, e;
        py_strip(line, strlen(line), &a, &e);
        if (a == e || line[a] == '#') continue;
        line[e] = 0;
        if (s->n == cap) s->names = xrealloc(s->names, (size_t)(cap = cap ? cap * 2 : 64) * sizeof(char *));
        s->names[s->n++] = xstrdup(line + a);
    }
    buf_free(&b);
    if (s->n) qsort(s->names, (size_t)s->n, sizeof(char *), cmp_str);
    return MOSFT_OK;
}

int name_set_has(const name_set *s, const char *name) {
    return s->n && bsearch(&name, s->names, (size_t)s->n, sizeof(char *), cmp_str) != NULL;
}

void name_set_free(name_set *s) {
    for (int i = 0; i < s->n; i++) free(s->names[i]);
    free(s->names);
    s->names = NULL;
    s->n = 0;
}
