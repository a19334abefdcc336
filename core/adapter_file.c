// adapter_file.c: adapter.mos, the native adapter file (see adapter.h).
//
// A safetensors file, so any safetensors reader opens it:
//   tensors      every trainable tensor (F32, in a->tensors order), then every frozen buffer (MoS
//                index tables I32, random scales F32)
//   __metadata__ format "mos", format_version "1", mosft_version, method,
//                adapter_config (JSON: the config's "adapter" section, normalized by the method),
//                base_model (JSON fingerprint: HF config dims + the adapted tensor names),
//                base_model_name_or_path, step, rank, scaling
// Loading checks everything it reads: a truncated or hand-edited file is MOSFT_ERR_INPUT naming the
// file and what is wrong, never a crash, and the index tables are used as stored (never redrawn).
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/adapter.h"
#include "core/common.h"
#include "core/safetensors.h"
#include "core/version.h"

// ---- save --------------------------------------------------------------------------------------

int adapter_save(const adapter *a, const char *path) {
    st_writer *w = st_writer_new();
    for (int i = 0; i < a->n_tensors; i++) {
        const adapter_tensor *t = &a->tensors[i];
        st_writer_add(w, t->name, MOSFT_F32, t->ndim, t->shape, a->params + t->offset);
    }
    for (int i = 0; i < a->n_buffers; i++) {
        const adapter_buffer *b = &a->buffers[i];
        st_writer_add(w, b->name, b->dtype, b->ndim, b->shape, b->data);
    }
    char *cfg = adapter_spec_to_json(&a->spec);
    char num[64];
    st_writer_meta(w, "format", "mos");
    snprintf(num, sizeof num, "%d", MOSFT_ADAPTER_FORMAT_VERSION);
    st_writer_meta(w, "format_version", num);
    st_writer_meta(w, "mosft_version", MOSFT_VERSION);
    st_writer_meta(w, "method", a->spec.method);
    st_writer_meta(w, "adapter_config", cfg);
    st_writer_meta(w, "base_model", a->model_fingerprint);
    st_writer_meta(w, "base_model_name_or_path", a->base_model_name);
    snprintf(num, sizeof num, "%lld", (long long)a->step);
    st_writer_meta(w, "step", num);
    snprintf(num, sizeof num, "%d", a->rank);
    st_writer_meta(w, "rank", num);
    snprintf(num, sizeof num, "%.9g", (double)a->scaling);
    st_writer_meta(w, "scaling", num);
    int rc = st_writer_write(w, path);
    st_writer_free(w);
    free(cfg);
    return rc;
}

// ---- reading the metadata ----------------------------------------------------------------------

typedef enum { K_INT, K_U64, K_NUM, K_BOOL, K_STR } key_type;
typedef struct {
    const char *key;
    key_type type;
    size_t offset, size;  // K_STR: the char array's size
    double lo, hi;        // allowed range (numbers)
    int required;
} spec_key;

#define SK(key, type, member, lo, hi, req) \
    {key, type, offsetof(adapter_spec, member), sizeof(((adapter_spec *)0)->member), lo, hi, req}
static const spec_key k_spec_keys[] = {
    SK("method", K_STR, method, 0, 0, 1),
    SK("r", K_INT, r, 1, 1e9, 1),
    SK("equiv_rank", K_INT, equiv_rank, 1, 1e9, 0),
    SK("private_rank", K_INT, private_rank, 0, 1e9, 0),
    SK("shards", K_INT, shards, 1, 1e9, 0),
    SK("alpha", K_NUM, alpha, 0, INFINITY, 1),
    SK("dropout", K_NUM, dropout, 0, 1, 1),
    SK("seed", K_U64, seed, 0, 9007199254740992.0, 1),
    SK("pair_dissociation", K_BOOL, pair_dissociation, 0, 0, 0),
    SK("pure_sharing", K_BOOL, pure_sharing, 0, 0, 0),
    SK("subset_selection", K_BOOL, subset_selection, 0, 0, 0),
    SK("scale_mean", K_NUM, scale_mean, 0, INFINITY, 0),
    SK("scale_std", K_NUM, scale_std, 0, INFINITY, 0),
    SK("prolora_unshared_r", K_INT, prolora_unshared_r, 0, 1e9, 0),
    SK("prolora_reduce_a", K_INT, prolora_reduce_a, 1, 1e9, 0),
    SK("prolora_reduce_b", K_INT, prolora_reduce_b, 1, 1e9, 0),
    SK("vera_d_initial", K_NUM, vera_d_initial, -INFINITY, INFINITY, 0),
    SK("vera_projection_seed", K_U64, vera_projection_seed, 0, 9007199254740992.0, 0),
    SK("tied_lora_trainable", K_STR, tied_lora_trainable, 0, 0, 0),
    SK("sharelora_share", K_STR, sharelora_share, 0, 0, 0),
    SK("sira_experts", K_INT, sira_experts, 1, 1e9, 0),
    SK("sira_top_k", K_INT, sira_top_k, 1, 1e9, 0),
    SK("sira_capacity_factor", K_NUM, sira_capacity_factor, 0, INFINITY, 0),
    SK("sira_expert_dropout", K_NUM, sira_expert_dropout, 0, 1, 0),
};
#define N_SPEC_KEYS ((int)(sizeof k_spec_keys / sizeof k_spec_keys[0]))

static int bad_key(const char *path, const char *key, const char *want, const cJSON *v) {
    char *s = v ? cJSON_PrintUnformatted(v) : NULL;
    int rc = mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.adapter_config.%s: expected %s, got %.60s", path, key, want,
                        s ? s : "nothing");
    if (s) cJSON_free(s);
    return rc;
}

// Missing optional keys keep the config's defaults (so files stay readable when later versions add
// knobs for new methods); unknown keys are errors (a hand-edited or foreign file).
static int spec_from_json(adapter_spec *s, const char *json, const char *path) {
    mosft_config defaults;
    config_defaults(&defaults);
    adapter_spec_from_config(s, &defaults);
    config_free(&defaults);
    cJSON *o = cJSON_Parse(json);
    int rc = MOSFT_OK;
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.adapter_config: expected a JSON object", path);
    }
    for (const cJSON *it = o->child; it && !rc; it = it->next) {
        int known = !strcmp(it->string, "targets");
        for (int i = 0; i < N_SPEC_KEYS && !known; i++) known = !strcmp(it->string, k_spec_keys[i].key);
        if (!known) rc = bad_key(path, it->string, "no such key (a known adapter key)", it);
    }
    for (int i = 0; i < N_SPEC_KEYS && !rc; i++) {
        const spec_key *k = &k_spec_keys[i];
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k->key);
        char *p = (char *)s + k->offset;
        if (!v) {
            if (k->required) rc = bad_key(path, k->key, "a value", NULL);
            continue;
        }
        char want[96];
        switch (k->type) {
        case K_STR:
            if (!cJSON_IsString(v) || strlen(v->valuestring) >= k->size) {
                snprintf(want, sizeof want, "a string of at most %zu characters", k->size - 1);
                rc = bad_key(path, k->key, want, v);
            } else
                snprintf(p, k->size, "%s", v->valuestring);
            break;
        case K_BOOL:
            if (!cJSON_IsBool(v)) rc = bad_key(path, k->key, "true or false", v);
            else *(int *)p = cJSON_IsTrue(v);
            break;
        case K_INT:
        case K_U64:
        case K_NUM: {
            double d = cJSON_IsNumber(v) ? v->valuedouble : NAN;
            int integral = k->type != K_NUM;
            int ok = !isnan(d) && d >= k->lo && d <= k->hi && (!integral || d == floor(d));
            if (!strcmp(k->key, "alpha") || !strcmp(k->key, "scale_mean") || !strcmp(k->key, "sira_capacity_factor"))
                ok = ok && d > 0;
            if (!strcmp(k->key, "dropout") || !strcmp(k->key, "sira_expert_dropout")) ok = ok && d < 1;
            if (!ok) {
                snprintf(want, sizeof want, "%s in [%g, %g]", integral ? "an integer" : "a number", k->lo, k->hi);
                rc = bad_key(path, k->key, want, v);
            } else if (k->type == K_INT)
                *(int *)p = (int)d;
            else if (k->type == K_U64)
                *(uint64_t *)p = (uint64_t)d;
            else
                *(double *)p = d;
            break;
        }
        }
    }
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "targets");
    if (!rc) {
        if (!cJSON_IsArray(t) || cJSON_GetArraySize(t) < 1)
            rc = bad_key(path, "targets", "a non-empty list of module names", t);
        memset(s->targets, 0, sizeof s->targets);
        for (const cJSON *it = t ? t->child : NULL; it && !rc; it = it->next) {
            int m = cJSON_IsString(it) ? module_from_name(it->valuestring) : -1;
            if (m < 0 || s->targets[m]) rc = bad_key(path, "targets", "distinct names among q, k, v, o, gate, up, down", it);
            else s->targets[m] = 1;
        }
    }
    cJSON_Delete(o);
    return rc;
}

static int fp_int(const cJSON *o, const char *key, const char *path, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 1 || v->valuedouble > 1e9)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.base_model.%s: expected a positive integer", path, key);
    *out = (int)v->valuedouble;
    return MOSFT_OK;
}

// The base model's dimensions from the fingerprint; `tensors` receives its "tensors" list as JSON.
static int model_from_fingerprint(llama_config *m, const char *json, const char *path, char **tensors) {
    memset(m, 0, sizeof *m);
    *tensors = NULL;
    cJSON *o = cJSON_Parse(json);
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.base_model: expected a JSON object (the base model's fingerprint)",
                          path);
    }
    int rc = MOSFT_OK;
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(o, "model_type");
    if (!cJSON_IsString(mt) || strlen(mt->valuestring) >= sizeof m->model_type)
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.base_model.model_type: expected a string", path);
    else
        snprintf(m->model_type, sizeof m->model_type, "%s", mt->valuestring);
    if (!rc) rc = fp_int(o, "hidden_size", path, &m->hidden);
    if (!rc) rc = fp_int(o, "intermediate_size", path, &m->intermediate);
    if (!rc) rc = fp_int(o, "num_hidden_layers", path, &m->n_layers);
    if (!rc) rc = fp_int(o, "num_attention_heads", path, &m->n_heads);
    if (!rc) rc = fp_int(o, "num_key_value_heads", path, &m->n_kv_heads);
    if (!rc) rc = fp_int(o, "head_dim", path, &m->head_dim);
    if (!rc) rc = fp_int(o, "vocab_size", path, &m->vocab);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "tensors");
    if (!rc && !cJSON_IsArray(t))
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.base_model.tensors: expected a list of tensor names", path);
    if (!rc) {
        char *s = cJSON_PrintUnformatted(t);
        *tensors = xstrdup(s);
        cJSON_free(s);
    }
    cJSON_Delete(o);
    return rc;
}

// The first difference between the model the adapter was trained on and the one given.
static int compare_models(const llama_config *file, const llama_config *given, const char *path) {
    struct {
        const char *key;
        int f, g;
    } dims[] = {{"hidden_size", file->hidden, given->hidden},
                {"intermediate_size", file->intermediate, given->intermediate},
                {"num_hidden_layers", file->n_layers, given->n_layers},
                {"num_attention_heads", file->n_heads, given->n_heads},
                {"num_key_value_heads", file->n_kv_heads, given->n_kv_heads},
                {"head_dim", file->head_dim, given->head_dim},
                {"vocab_size", file->vocab, given->vocab}};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].f != dims[i].g)
            return mosft_fail_hint(MOSFT_ERR_INPUT, "an adapter only applies to the base model it was trained on",
                                   "%s: base model mismatch: the adapter was trained on a model with %s %d, this model "
                                   "has %s %d",
                                   path, dims[i].key, dims[i].f, dims[i].key, dims[i].g);
    const char *gt = given->model_type[0] ? given->model_type : "llama";
    if (strcmp(file->model_type, gt) != 0)
        return mosft_fail(MOSFT_ERR_INPUT,
                          "%s: base model mismatch: the adapter was trained on a model with model_type \"%s\", this "
                          "model has \"%s\"",
                          path, file->model_type, gt);
    return MOSFT_OK;
}

static int parse_i64(const char *s, int64_t *out) {
    if (!s || !*s) return 0;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < 0) return 0;
    *out = v;
    return 1;
}

// Copy one tensor or buffer from the file, checking dtype and shape.
static int load_array(const st_file *f, const char *name, mosft_dtype dtype, int ndim, const int64_t *shape, void *dst,
                      size_t nbytes) {
    const st_tensor *t = st_find(f, name);
    if (!t)
        return mosft_fail_hint(MOSFT_ERR_INPUT, "the file is truncated, hand-edited or from another adapter method",
                               "%s: %s: expected this tensor, got nothing", f->path, name);
    int rc = st_expect(f, t, dtype, ndim, shape);
    if (rc) return rc;
    MOSFT_ASSERT(t->nbytes == nbytes);
    memcpy(dst, t->data, nbytes);
    return MOSFT_OK;
}

int adapter_load(adapter **out, const char *path, const llama_config *model) {
    *out = NULL;
    st_file f;
    int rc = st_open(&f, path);
    if (rc) {
        st_close(&f);  // st_open leaves what it parsed so far for st_close
        return rc;
    }
    adapter *a = NULL;
    char *tensors_json = NULL;
    const char *fmt = st_meta(&f, "format");
    if (!fmt || strcmp(fmt, "mos") != 0) {
        rc = mosft_fail_hint(MOSFT_ERR_INPUT,
                             "give an adapter.mos written by mosft (a PEFT adapter_model.safetensors is not one)",
                             "%s: __metadata__.format: expected \"mos\", got %s%s%s", path, fmt ? "\"" : "",
                             fmt ? fmt : "nothing", fmt ? "\"" : "");
        goto done;
    }
    int64_t version = 0;
    const char *vs = st_meta(&f, "format_version");
    if (!parse_i64(vs, &version) || version < 1) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.format_version: expected a positive integer, got \"%s\"", path,
                        vs ? vs : "");
        goto done;
    }
    if (version > MOSFT_ADAPTER_FORMAT_VERSION) {
        rc = mosft_fail_hint(MOSFT_ERR_INPUT, "update mosft",
                             "%s: __metadata__.format_version: expected at most %d (what this mosft reads), got %lld "
                             "(written by a newer mosft)",
                             path, MOSFT_ADAPTER_FORMAT_VERSION, (long long)version);
        goto done;
    }
    adapter_spec spec;
    const char *cfg = st_meta(&f, "adapter_config");
    if (!cfg) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.adapter_config: expected the adapter's config, got nothing", path);
        goto done;
    }
    if ((rc = spec_from_json(&spec, cfg, path))) goto done;
    const char *fp = st_meta(&f, "base_model");
    if (!fp) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.base_model: expected the base model's fingerprint, got nothing",
                        path);
        goto done;
    }
    llama_config m;
    if ((rc = model_from_fingerprint(&m, fp, path, &tensors_json))) goto done;
    if (model && (rc = compare_models(&m, model, path))) goto done;
    int64_t step = 0;
    const char *ss = st_meta(&f, "step");
    if (!parse_i64(ss, &step)) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.step: expected an integer >= 0, got \"%s\"", path, ss ? ss : "");
        goto done;
    }
    // The layout from the stored spec on the stored model (a spec the method rejects is the file's fault).
    if ((rc = adapter_create_layout(&a, &spec, &m))) {
        rc = mosft_fail_prefix(MOSFT_ERR_INPUT, "%s: __metadata__", path);
        goto done;
    }
    // Our fingerprint of (model, targets) must be the file's: its tensor names follow from the targets.
    {
        cJSON *mine = cJSON_Parse(a->model_fingerprint);
        char *mt = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(mine, "tensors"));
        int same = !strcmp(mt, tensors_json);
        if (!same)
            rc = mosft_fail(MOSFT_ERR_INPUT, "%s: __metadata__.base_model.tensors: expected %s (the adapted targets), got %s",
                            path, mt, tensors_json);
        cJSON_free(mt);
        cJSON_Delete(mine);
        if (rc) goto done;
    }
    if (model) a->model = *model;  // keep the caller's full config (rope, eps, ...)
    a->step = step;
    const char *bn = st_meta(&f, "base_model_name_or_path");
    adapter_set_base_model_name(a, bn ? bn : "");
    for (int i = 0; i < a->n_tensors && !rc; i++) {
        adapter_tensor *t = &a->tensors[i];
        rc = load_array(&f, t->name, MOSFT_F32, t->ndim, t->shape, a->params + t->offset, t->numel * sizeof(float));
    }
    for (int i = 0; i < a->n_buffers && !rc; i++) {
        adapter_buffer *b = &a->buffers[i];
        rc = load_array(&f, b->name, b->dtype, b->ndim, b->shape, b->data, b->nbytes);
    }
    for (int i = 0; i < f.n_tensors && !rc; i++)
        if (!adapter_find_tensor(a, f.tensors[i].name) && !adapter_find_buffer(a, f.tensors[i].name))
            rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: unexpected tensor for a %s adapter with this config", path,
                            f.tensors[i].name, a->spec.method);
    if (rc) goto done;
    if ((rc = a->ops->attach(a))) {
        rc = mosft_fail_prefix(MOSFT_ERR_INPUT, "%s", path);
        goto done;
    }
done:
    free(tensors_json);
    st_close(&f);
    if (rc) {
        adapter_free(a);
        return rc;
    }
    *out = a;
    return MOSFT_OK;
}
