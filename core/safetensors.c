// safetensors.c: see safetensors.h.
#include "core/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/common.h"
#include "core/fileio.h"

// A header larger than this is surely not a real safetensors header (HF caps it at 100 MB).
#define ST_MAX_HEADER (100u << 20)

void st_shape_str(char *out, size_t n, int ndim, const int64_t *shape) {
    size_t o = 0;
    o += (size_t)snprintf(out + o, n - o, "[");
    for (int i = 0; i < ndim && o < n; i++)
        o += (size_t)snprintf(out + o, n - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < n) snprintf(out + o, n - o, "]");
}

static int cmp_begin(const void *a, const void *b) {
    const st_tensor *x = *(st_tensor *const *)a, *y = *(st_tensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : (x->end > y->end);
}

static int parse_tensor(st_file *f, const cJSON *item, st_tensor *t) {
    const char *p = f->path, *nm = item->string;
    if (!cJSON_IsObject(item))
        return mosft_fail(MOSFT_ERR_INPUT, "%s: header: %s: expected an object with dtype, shape, data_offsets",
                          p, nm);
    const cJSON *jd = cJSON_GetObjectItemCaseSensitive(item, "dtype");
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(item, "shape");
    const cJSON *jo = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
    if (!cJSON_IsString(jd)) return mosft_fail(MOSFT_ERR_INPUT, "%s: header: %s.dtype: expected a string", p, nm);
    int dt = dtype_parse(jd->valuestring);
    if (dt < 0)
        return mosft_fail(MOSFT_ERR_INPUT,
                          "%s: header: %s.dtype: expected one of F32, F16, BF16, F64, I64, I32, I16, I8, U8, "
                          "BOOL, got \"%s\"",
                          p, nm, jd->valuestring);
    if (!cJSON_IsArray(js)) return mosft_fail(MOSFT_ERR_INPUT, "%s: header: %s.shape: expected an array", p, nm);
    int nd = cJSON_GetArraySize(js);
    if (nd > ST_MAX_DIMS)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: header: %s.shape: expected at most %d dimensions, got %d", p, nm,
                          ST_MAX_DIMS, nd);
    t->name = xstrdup(nm);
    t->dtype = (mosft_dtype)dt;
    t->ndim = nd;
    t->numel = 1;
    for (int i = 0; i < nd; i++) {
        const cJSON *d = cJSON_GetArrayItem(js, i);
        if (!cJSON_IsNumber(d) || d->valuedouble < 0 || d->valuedouble > 1e15 ||
            d->valuedouble != (double)(int64_t)d->valuedouble)
            return mosft_fail(MOSFT_ERR_INPUT, "%s: header: %s.shape[%d]: expected a non-negative integer", p, nm, i);
        t->shape[i] = (int64_t)d->valuedouble;
        if (t->shape[i] && t->numel > INT64_MAX / t->shape[i])
            return mosft_fail(MOSFT_ERR_INPUT, "%s: header: %s.shape: too many elements", p, nm);
        t->numel *= t->shape[i];
    }
    if (!cJSON_IsArray(jo) || cJSON_GetArraySize(jo) != 2)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: header: %s.data_offsets: expected [begin, end]", p, nm);
    double b = cJSON_GetArrayItem(jo, 0)->valuedouble, e = cJSON_GetArrayItem(jo, 1)->valuedouble;
    if (!cJSON_IsNumber(cJSON_GetArrayItem(jo, 0)) || !cJSON_IsNumber(cJSON_GetArrayItem(jo, 1)) || b < 0 ||
        e < b || b != (double)(uint64_t)b || e != (double)(uint64_t)e)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: header: %s.data_offsets: expected integers 0 <= begin <= end", p,
                          nm);
    t->begin = (uint64_t)b;
    t->end = (uint64_t)e;
    uint64_t want = (uint64_t)t->numel * dtype_size(t->dtype);
    if (t->end - t->begin != want) {
        char sh[128];
        st_shape_str(sh, sizeof sh, t->ndim, t->shape);
        return mosft_fail(MOSFT_ERR_INPUT,
                          "%s: header: %s: data_offsets span %llu bytes, expected %llu for %s %s", p, nm,
                          (unsigned long long)(t->end - t->begin), (unsigned long long)want, dtype_name(t->dtype),
                          sh);
    }
    if (t->end > f->data_len)
        return mosft_fail_hint(MOSFT_ERR_INPUT, "the file is truncated or its header is wrong; download it again",
                               "%s: %s: data_offsets end at byte %llu, past the end of the data (%llu bytes)", p,
                               nm, (unsigned long long)t->end, (unsigned long long)f->data_len);
    t->data = f->data + t->begin;
    t->nbytes = (size_t)want;
    return MOSFT_OK;
}

static int parse_header(st_file *f, const char *json, size_t n) {
    const char *p = f->path;
    cJSON *root = cJSON_ParseWithLength(json, n);
    if (!root) return mosft_fail(MOSFT_ERR_INPUT, "%s: header: expected valid JSON (%zu bytes)", p, n);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return mosft_fail(MOSFT_ERR_INPUT, "%s: header: expected a JSON object", p);
    }
    int count = 0;
    for (cJSON *it = root->child; it; it = it->next)
        if (strcmp(it->string, "__metadata__") != 0) count++;
    f->tensors = xcalloc((size_t)count, sizeof(st_tensor));
    int rc = MOSFT_OK;
    for (cJSON *it = root->child; it && rc == MOSFT_OK; it = it->next) {
        if (!strcmp(it->string, "__metadata__")) {
            if (!cJSON_IsObject(it)) {
                rc = mosft_fail(MOSFT_ERR_INPUT, "%s: header: __metadata__: expected an object of strings", p);
                break;
            }
            int m = cJSON_GetArraySize(it);
            f->meta_keys = xcalloc((size_t)m, sizeof(char *));
            f->meta_vals = xcalloc((size_t)m, sizeof(char *));
            for (cJSON *kv = it->child; kv; kv = kv->next) {
                if (!cJSON_IsString(kv)) {
                    rc = mosft_fail(MOSFT_ERR_INPUT, "%s: header: __metadata__.%s: expected a string", p, kv->string);
                    break;
                }
                f->meta_keys[f->n_meta] = xstrdup(kv->string);
                f->meta_vals[f->n_meta] = xstrdup(kv->valuestring);
                f->n_meta++;
            }
            continue;
        }
        rc = parse_tensor(f, it, &f->tensors[f->n_tensors]);
        f->n_tensors++;  // counted even on error so st_close frees its name
    }
    cJSON_Delete(root);
    if (rc) return rc;
    // No two tensors may share bytes.
    st_tensor **order = xmalloc(sizeof(st_tensor *) * (size_t)(f->n_tensors ? f->n_tensors : 1));
    for (int i = 0; i < f->n_tensors; i++) order[i] = &f->tensors[i];
    qsort(order, (size_t)f->n_tensors, sizeof *order, cmp_begin);
    for (int i = 1; i < f->n_tensors && rc == MOSFT_OK; i++) {
        const st_tensor *a = order[i - 1], *b = order[i];
        if (b->begin < a->end && b->end > b->begin && a->end > a->begin)
            rc = mosft_fail(MOSFT_ERR_INPUT, "%s: header: %s and %s: data_offsets overlap ([%llu, %llu) and [%llu, %llu))",
                            p, a->name, b->name, (unsigned long long)a->begin, (unsigned long long)a->end,
                            (unsigned long long)b->begin, (unsigned long long)b->end);
    }
    free(order);
    return rc;
}

int st_open(st_file *f, const char *path) {
    memset(f, 0, sizeof *f);
    f->path = xstrdup(path);
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        int e = errno;
        return mosft_fail(e == ENOENT ? MOSFT_ERR_INPUT : MOSFT_ERR_RUNTIME, "%s: cannot open: %s", path,
                          strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return mosft_fail(MOSFT_ERR_INPUT, "%s: expected a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    if (size < 8) {
        close(fd);
        return mosft_fail(MOSFT_ERR_INPUT, "%s: expected a safetensors file (at least 8 bytes), got %zu bytes", path,
                          size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return mosft_fail(MOSFT_ERR_RUNTIME, "%s: mmap failed: %s", path, strerror(errno));
    f->map = map;
    f->map_len = size;
    uint64_t hlen = 0;
    memcpy(&hlen, map, 8);  // little-endian hosts only (x86-64, arm64)
    if (hlen > ST_MAX_HEADER || hlen > size - 8)
        return mosft_fail_hint(MOSFT_ERR_INPUT, "the file is truncated or not a safetensors file",
                               "%s: header length %llu does not fit in the file (%zu bytes)", path,
                               (unsigned long long)hlen, size);
    f->data = (const uint8_t *)map + 8 + hlen;
    f->data_len = size - 8 - (size_t)hlen;
    int rc = parse_header(f, (const char *)map + 8, (size_t)hlen);
    return rc;
}

void st_close(st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_vals[i]);
    }
    free(f->meta_keys);
    free(f->meta_vals);
    if (f->map) munmap(f->map, f->map_len);
    free(f->path);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name) {
    for (int i = 0; i < f->n_tensors; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

const char *st_meta(const st_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta_keys[i], key)) return f->meta_vals[i];
    return NULL;
}

void st_tensor_to_f32(const st_tensor *t, float *dst) { dtype_to_f32(t->dtype, t->data, dst, (size_t)t->numel); }

int st_expect(const st_file *f, const st_tensor *t, mosft_dtype dtype, int ndim, const int64_t *shape) {
    int ok = t->dtype == dtype && t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (ok) return MOSFT_OK;
    char want[128], got[128];
    st_shape_str(want, sizeof want, ndim, shape);
    st_shape_str(got, sizeof got, t->ndim, t->shape);
    return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected %s %s, got %s %s", f->path, t->name, dtype_name(dtype), want,
                      dtype_name(t->dtype), got);
}

// ---- sharded sets ----------------------------------------------------------------------------

static int set_add_file(st_set *s, const char *path) {
    for (int i = 0; i < s->n_files; i++)
        if (!strcmp(s->files[i].path, path)) return MOSFT_OK;
    s->files = xrealloc(s->files, sizeof(st_file) * (size_t)(s->n_files + 1));
    int rc = st_open(&s->files[s->n_files], path);
    s->n_files++;
    return rc;
}

int st_set_open(st_set *s, const char *path) {
    memset(s, 0, sizeof *s);
    if (file_exists(path)) {
        s->dir = path_dirname(path);
        return set_add_file(s, path);
    }
    if (!dir_exists(path)) return mosft_fail(MOSFT_ERR_INPUT, "%s: no such file or directory", path);
    s->dir = xstrdup(path);
    char *index = path_join(path, "model.safetensors.index.json");
    char *single = path_join(path, "model.safetensors");
    int rc = MOSFT_OK;
    if (file_exists(index)) {
        char *text = NULL;
        rc = file_read_all(index, &text, NULL);
        cJSON *root = rc ? NULL : cJSON_Parse(text);
        free(text);
        const cJSON *wm = root ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
        if (!rc && !root) rc = mosft_fail(MOSFT_ERR_INPUT, "%s: expected valid JSON", index);
        else if (!rc && !cJSON_IsObject(wm))
            rc = mosft_fail(MOSFT_ERR_INPUT, "%s: weight_map: expected an object {tensor: file}", index);
        for (const cJSON *it = wm ? wm->child : NULL; it && !rc; it = it->next) {
            if (!cJSON_IsString(it) || strchr(it->valuestring, '/')) {
                rc = mosft_fail(MOSFT_ERR_INPUT, "%s: weight_map.%s: expected a file name in the same folder", index,
                                it->string);
                break;
            }
            char *fp = path_join(path, it->valuestring);
            rc = set_add_file(s, fp);
            free(fp);
        }
        // Every tensor the index names must be in the shard it names.
        for (const cJSON *it = wm ? wm->child : NULL; it && !rc; it = it->next) {
            const st_file *fl = NULL;
            if (!st_set_find(s, it->string, &fl))
                rc = mosft_fail(MOSFT_ERR_INPUT, "%s: weight_map names %s in %s, but that file does not hold it",
                                index, it->string, it->valuestring);
        }
        cJSON_Delete(root);
    } else if (file_exists(single)) {
        rc = set_add_file(s, single);
    } else {
        rc = mosft_fail_hint(MOSFT_ERR_INPUT, "give the HF model folder that holds config.json and the weights",
                             "%s: expected model.safetensors or model.safetensors.index.json in this folder", path);
    }
    free(index);
    free(single);
    return rc;
}

void st_set_close(st_set *s) {
    for (int i = 0; i < s->n_files; i++) st_close(&s->files[i]);
    free(s->files);
    free(s->dir);
    memset(s, 0, sizeof *s);
}

const st_tensor *st_set_find(const st_set *s, const char *name, const st_file **file) {
    for (int i = 0; i < s->n_files; i++) {
        const st_tensor *t = st_find(&s->files[i], name);
        if (t) {
            if (file) *file = &s->files[i];
            return t;
        }
    }
    if (file) *file = NULL;
    return NULL;
}

int st_set_count(const st_set *s) {
    int n = 0;
    for (int i = 0; i < s->n_files; i++) n += s->files[i].n_tensors;
    return n;
}

// ---- writer ----------------------------------------------------------------------------------

typedef struct {
    char *name;
    mosft_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
    size_t nbytes;
} st_wtensor;

struct st_writer {
    st_wtensor *t;
    int n, cap;
    char **mk, **mv;
    int nm;
};

st_writer *st_writer_new(void) { return xcalloc(1, sizeof(st_writer)); }

void st_writer_add(st_writer *w, const char *name, mosft_dtype dtype, int ndim, const int64_t *shape,
                   const void *data) {
    MOSFT_ASSERT(ndim >= 0 && ndim <= ST_MAX_DIMS);
    if (w->n == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 16;
        w->t = xrealloc(w->t, sizeof(st_wtensor) * (size_t)w->cap);
    }
    st_wtensor *t = &w->t[w->n++];
    t->name = xstrdup(name);
    t->dtype = dtype;
    t->ndim = ndim;
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        numel *= (size_t)shape[i];
    }
    t->data = data;
    t->nbytes = numel * dtype_size(dtype);
}

void st_writer_meta(st_writer *w, const char *key, const char *val) {
    for (int i = 0; i < w->nm; i++)
        if (!strcmp(w->mk[i], key)) {
            free(w->mv[i]);
            w->mv[i] = xstrdup(val);
            return;
        }
    w->mk = xrealloc(w->mk, sizeof(char *) * (size_t)(w->nm + 1));
    w->mv = xrealloc(w->mv, sizeof(char *) * (size_t)(w->nm + 1));
    w->mk[w->nm] = xstrdup(key);
    w->mv[w->nm] = xstrdup(val);
    w->nm++;
}

int st_writer_write(st_writer *w, const char *path) {
    cJSON *root = cJSON_CreateObject();
    if (w->nm) {
        cJSON *m = cJSON_AddObjectToObject(root, "__metadata__");
        for (int i = 0; i < w->nm; i++) cJSON_AddStringToObject(m, w->mk[i], w->mv[i]);
    }
    uint64_t off = 0;
    for (int i = 0; i < w->n; i++) {
        st_wtensor *t = &w->t[i];
        cJSON *o = cJSON_AddObjectToObject(root, t->name);
        cJSON_AddStringToObject(o, "dtype", dtype_name(t->dtype));
        cJSON *sh = cJSON_AddArrayToObject(o, "shape");
        for (int d = 0; d < t->ndim; d++) cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t->shape[d]));
        cJSON *of = cJSON_AddArrayToObject(o, "data_offsets");
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)(off + t->nbytes)));
        off += t->nbytes;
    }
    char *json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    size_t jl = strlen(json), padded = (jl + 7) & ~(size_t)7;  // data starts 8-byte aligned
    atomic_file af;
    int rc = atomic_open(&af, path);
    if (rc) {
        cJSON_free(json);
        return rc;
    }
    uint64_t hl = padded;
    int ok = fwrite(&hl, 8, 1, af.f) == 1 && fwrite(json, 1, jl, af.f) == jl;
    for (size_t i = jl; ok && i < padded; i++) ok = fputc(' ', af.f) != EOF;
    for (int i = 0; ok && i < w->n; i++)
        if (w->t[i].nbytes) ok = fwrite(w->t[i].data, 1, w->t[i].nbytes, af.f) == w->t[i].nbytes;
    cJSON_free(json);
    if (!ok) {
        rc = mosft_fail(MOSFT_ERR_RUNTIME, "%s: write failed: %s", path, strerror(errno));
        atomic_abort(&af);
        return rc;
    }
    return atomic_commit(&af);
}

void st_writer_free(st_writer *w) {
    if (!w) return;
    for (int i = 0; i < w->n; i++) free(w->t[i].name);
    free(w->t);
    for (int i = 0; i < w->nm; i++) {
        free(w->mk[i]);
        free(w->mv[i]);
    }
    free(w->mk);
    free(w->mv);
    free(w);
}
