// nf4_bnb.c: NF4 weights in the layout of HF "*-bnb-4bit" checkpoints (see nf4.h, shared/docs/NF4.md).
//
// transformers saves a bitsandbytes Linear4bit weight as its packed data plus QuantState.as_dict(
// packed=True): per weight <name>
//   <name>                                   U8 [ceil(n/2), 1]   two codes per byte
//   <name>.absmax                            U8 [blocks] (double quantization) or F32 [blocks]
//   <name>.quant_map                         F32 [16]            the NF4 table
//   <name>.nested_absmax                     F32 [ceil(blocks/256)]      (double quantization only)
//   <name>.nested_quant_map                  F32 [256]                   (double quantization only)
//   <name>.quant_state.bitsandbytes__nf4     U8 [len]  UTF-8 JSON (json.dumps of the non-tensor items):
//     {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [out, in],
//      "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0305...}
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/nf4.h"

#define BNB_STATE_SUFFIX ".quant_state.bitsandbytes__nf4"

// Shortest decimal that reads back as the same double (what Python's repr, hence json.dumps, writes).
static void fmt_shortest(char *out, size_t n, double v) {
    for (int p = 1; p <= 17; p++) {
        snprintf(out, n, "%.*g", p, v);
        if (strtod(out, NULL) == v) break;
    }
    if (!strpbrk(out, ".eni")) strncat(out, ".0", n - strlen(out) - 1);  // 2 -> 2.0, as Python
}

void nf4_write_bnb(st_writer *w, const char *name, const nf4_tensor *t, char *json_buf, size_t json_cap) {
    char key[512];
    int64_t packed_shape[2] = {(t->numel + 1) / 2, 1};
    st_writer_add(w, name, MOSFT_U8, 2, packed_shape, t->packed);
    int64_t nb = t->n_blocks, nn = (nb + NF4_NESTED_BLOCK - 1) / NF4_NESTED_BLOCK, n16 = 16, n256 = 256;
    snprintf(key, sizeof key, "%s.absmax", name);
    if (t->double_quant)
        st_writer_add(w, key, MOSFT_U8, 1, &nb, t->absmax_q);
    else
        st_writer_add(w, key, MOSFT_F32, 1, &nb, t->absmax);
    snprintf(key, sizeof key, "%s.quant_map", name);
    st_writer_add(w, key, MOSFT_F32, 1, &n16, k_nf4_code);
    int len;
    if (t->double_quant) {
        snprintf(key, sizeof key, "%s.nested_absmax", name);
        st_writer_add(w, key, MOSFT_F32, 1, &nn, t->nested_absmax);
        snprintf(key, sizeof key, "%s.nested_quant_map", name);
        st_writer_add(w, key, MOSFT_F32, 1, &n256, t->nested_code);
        char off[40];
        fmt_shortest(off, sizeof off, (double)t->offset);
        len = snprintf(json_buf, json_cap,
                       "{\"quant_type\": \"nf4\", \"blocksize\": %d, \"dtype\": \"bfloat16\", \"shape\": [%lld, %lld], "
                       "\"nested_blocksize\": %d, \"nested_dtype\": \"float32\", \"nested_offset\": %s}",
                       NF4_BLOCK, (long long)t->rows, (long long)t->cols, NF4_NESTED_BLOCK, off);
    } else {
        len = snprintf(json_buf, json_cap,
                       "{\"quant_type\": \"nf4\", \"blocksize\": %d, \"dtype\": \"bfloat16\", \"shape\": [%lld, %lld]}",
                       NF4_BLOCK, (long long)t->rows, (long long)t->cols);
    }
    MOSFT_ASSERT(len > 0 && (size_t)len < json_cap);  // the caller's buffer is too small: our bug
    int64_t jl = len;
    snprintf(key, sizeof key, "%s%s", name, BNB_STATE_SUFFIX);
    st_writer_add(w, key, MOSFT_U8, 1, &jl, json_buf);
}

// ---- reading -------------------------------------------------------------------------------------

// One piece <name><suffix> of the weight: it must exist, have `dtype` and `numel` elements.
static int find_piece(const st_set *s, const char *name, const char *suffix, mosft_dtype dtype, int64_t numel,
                      const st_tensor **out, const char **file, const char *state_file) {
    char key[512];
    snprintf(key, sizeof key, "%s%s", name, suffix);
    const st_file *f = NULL;
    const st_tensor *t = st_set_find(s, key, &f);
    if (!t)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected this tensor beside %s%s (a bnb-4bit weight), got nothing",
                          state_file, key, name, BNB_STATE_SUFFIX);
    if (t->dtype != dtype || t->numel != numel) {
        char got[128];
        st_shape_str(got, sizeof got, t->ndim, t->shape);
        return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected %s with %lld elements, got %s %s", f->path, key,
                          dtype_name(dtype), (long long)numel, dtype_name(t->dtype), got);
    }
    *out = t;
    *file = f->path;
    return MOSFT_OK;
}

// A positive integer (at most 1e9) from a JSON value.
static int json_pos_int(const cJSON *j, int64_t *v) {
    if (!cJSON_IsNumber(j) || j->valuedouble != floor(j->valuedouble) || j->valuedouble < 1 || j->valuedouble > 1e9)
        return 0;
    *v = (int64_t)j->valuedouble;
    return 1;
}
static int json_int(const cJSON *root, const char *key, int64_t *v) {
    return json_pos_int(cJSON_GetObjectItemCaseSensitive(root, key), v);
}

int nf4_read_bnb(const st_set *s, const char *name, nf4_tensor *out, int *found) {
    memset(out, 0, sizeof *out);
    *found = 0;
    char key[512];
    snprintf(key, sizeof key, "%s%s", name, BNB_STATE_SUFFIX);
    const st_file *sf = NULL;
    const st_tensor *st = st_set_find(s, key, &sf);
    if (!st) {
        snprintf(key, sizeof key, "%s.quant_state.bitsandbytes__fp4", name);
        if (st_set_find(s, key, &sf))
            return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected an NF4 weight (bnb_4bit_quant_type \"nf4\"), got FP4",
                              sf->path, name);
        return MOSFT_OK;  // not stored as bnb-4bit
    }
    *found = 1;
    const char *path = sf->path;
    if (st->dtype != MOSFT_U8 || st->ndim != 1)
        return mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected U8 bytes of a JSON object, got %s with %d dimensions", path,
                          key, dtype_name(st->dtype), st->ndim);
    cJSON *js = cJSON_ParseWithLength((const char *)st->data, st->nbytes);
    int rc = MOSFT_OK;
    int64_t blocksize = 0, rows = 0, cols = 0, nested_bs = 0;
    const cJSON *shape = js ? cJSON_GetObjectItemCaseSensitive(js, "shape") : NULL;
    const cJSON *qt = js ? cJSON_GetObjectItemCaseSensitive(js, "quant_type") : NULL;
    const cJSON *nested_offset = js ? cJSON_GetObjectItemCaseSensitive(js, "nested_offset") : NULL;
    const cJSON *nested_dtype = js ? cJSON_GetObjectItemCaseSensitive(js, "nested_dtype") : NULL;
    int nested = js && cJSON_GetObjectItemCaseSensitive(js, "nested_blocksize") != NULL;
    if (!cJSON_IsObject(js)) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: expected the bytes of a JSON object (bnb quant_state)", path, key);
    } else if (!cJSON_IsString(qt) || strcmp(qt->valuestring, "nf4") != 0) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: quant_type: expected \"nf4\", got %s", path, key,
                        cJSON_IsString(qt) ? qt->valuestring : "nothing");
    } else if (!json_int(js, "blocksize", &blocksize) || blocksize != NF4_BLOCK) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: blocksize: expected %d (the only block size mosft uses), got %lld",
                        path, key, NF4_BLOCK, (long long)blocksize);
    } else if (!cJSON_IsArray(shape) || cJSON_GetArraySize(shape) != 2 ||
               !json_pos_int(cJSON_GetArrayItem(shape, 0), &rows) || !json_pos_int(cJSON_GetArrayItem(shape, 1), &cols)) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: shape: expected [out_features, in_features]", path, key);
    } else if (nested && (!json_int(js, "nested_blocksize", &nested_bs) || nested_bs != NF4_NESTED_BLOCK)) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: nested_blocksize: expected %d, got %lld", path, key,
                        NF4_NESTED_BLOCK, (long long)nested_bs);
    } else if (nested && (!cJSON_IsString(nested_dtype) || strcmp(nested_dtype->valuestring, "float32") != 0)) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: nested_dtype: expected \"float32\", got %s", path, key,
                        cJSON_IsString(nested_dtype) ? nested_dtype->valuestring : "nothing");
    } else if (nested && !cJSON_IsNumber(nested_offset)) {
        rc = mosft_fail(MOSFT_ERR_INPUT, "%s: %s: nested_offset: expected a number", path, key);
    }
    if (rc) {
        cJSON_Delete(js);
        return rc;
    }
    out->rows = rows;
    out->cols = cols;
    out->numel = rows * cols;
    out->n_blocks = (out->numel + NF4_BLOCK - 1) / NF4_BLOCK;
    out->double_quant = nested;
    if (nested) out->offset = (float)nested_offset->valuedouble;
    cJSON_Delete(js);

    int64_t nb = out->n_blocks, nn = (nb + NF4_NESTED_BLOCK - 1) / NF4_NESTED_BLOCK;
    const st_tensor *packed, *absmax, *qmap, *nabs = NULL, *nmap = NULL;
    const char *fp = path, *qmap_file = path;
    if ((rc = find_piece(s, name, "", MOSFT_U8, (out->numel + 1) / 2, &packed, &fp, path)) ||
        (rc = find_piece(s, name, ".absmax", nested ? MOSFT_U8 : MOSFT_F32, nb, &absmax, &fp, path)) ||
        (rc = find_piece(s, name, ".quant_map", MOSFT_F32, 16, &qmap, &qmap_file, path)) ||
        (nested && (rc = find_piece(s, name, ".nested_absmax", MOSFT_F32, nn, &nabs, &fp, path))) ||
        (nested && (rc = find_piece(s, name, ".nested_quant_map", MOSFT_F32, 256, &nmap, &fp, path)))) {
        memset(out, 0, sizeof *out);
        return rc;
    }
    float code[16];
    st_tensor_to_f32(qmap, code);
    for (int i = 0; i < 16; i++)
        if (code[i] != k_nf4_code[i]) {
            memset(out, 0, sizeof *out);
            return mosft_fail(MOSFT_ERR_INPUT, "%s: %s.quant_map: entry %d: expected the NF4 table value %.9g, got %.9g",
                              qmap_file, name, i, (double)k_nf4_code[i], (double)code[i]);
        }
    out->packed = xmalloc((size_t)packed->nbytes);
    memcpy(out->packed, packed->data, packed->nbytes);
    if (nested) {
        out->absmax_q = xmalloc((size_t)nb);
        memcpy(out->absmax_q, absmax->data, (size_t)nb);
        out->nested_absmax = xmalloc(sizeof(float) * (size_t)nn);
        st_tensor_to_f32(nabs, out->nested_absmax);
        st_tensor_to_f32(nmap, out->nested_code);
    } else {
        out->absmax = xmalloc(sizeof(float) * (size_t)nb);
        st_tensor_to_f32(absmax, out->absmax);
        nf4_dynamic_map(out->nested_code);
    }
    return MOSFT_OK;
}
