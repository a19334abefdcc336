// export.c: an adapter as a PEFT LoRA folder (see export.h and shared/docs/MOS.md section 6).
#include "core/export.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/fileio.h"
#include "core/safetensors.h"

void export_peft_tensor_name(char *out, size_t n, int layer, int module, char which) {
    snprintf(out, n, "base_model.model.model.layers.%d.%s.lora_%c.weight", layer, k_module_hf[module], which);
}

// Number of entries in a folder other than . and .. (-1 if it cannot be read).
static int dir_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    return n;
}

// lora_alpha such that PEFT's lora_alpha / r is the adapter's scaling (alpha itself for MoS, LoRA and
// the peers that scale by alpha / r; VeRA, whose scaling is 1, gets r): the scale is folded into
// lora_alpha, never into the factors, so lora_A / lora_B stay the trained floats.
double export_peft_lora_alpha(const adapter *a) {
    double want = (double)a->scaling, from_alpha = a->spec.alpha / a->rank;
    if (fabs(from_alpha - want) <= 1e-6 * fabs(want)) return a->spec.alpha;
    return want * a->rank;
}

static char *peft_config_json(const adapter *a, const export_options *o) {
    cJSON *c = cJSON_CreateObject();
    const char *name = o->base_model ? o->base_model : a->base_model_name;
    cJSON_AddStringToObject(c, "peft_type", "LORA");
    cJSON_AddStringToObject(c, "task_type", "CAUSAL_LM");
    if (name && name[0])
        cJSON_AddStringToObject(c, "base_model_name_or_path", name);
    else
        cJSON_AddNullToObject(c, "base_model_name_or_path");
    cJSON_AddNumberToObject(c, "r", a->rank);
    cJSON_AddNumberToObject(c, "lora_alpha", export_peft_lora_alpha(a));
    cJSON_AddNumberToObject(c, "lora_dropout", a->spec.dropout);
    cJSON_AddStringToObject(c, "bias", "none");
    cJSON_AddBoolToObject(c, "fan_in_fan_out", 0);
    cJSON *t = cJSON_AddArrayToObject(c, "target_modules");
    for (int m = 0; m < MOD_COUNT; m++) {
        if (!a->spec.targets[m]) continue;
        char s[32];
        snprintf(s, sizeof s, "%s_proj", k_module_names[m]);
        cJSON_AddItemToArray(t, cJSON_CreateString(s));
    }
    cJSON_AddBoolToObject(c, "inference_mode", 1);
    cJSON_AddBoolToObject(c, "init_lora_weights", 1);
    cJSON_AddBoolToObject(c, "use_rslora", 0);
    cJSON_AddBoolToObject(c, "use_dora", 0);
    cJSON_AddNullToObject(c, "modules_to_save");
    cJSON_AddNullToObject(c, "layers_to_transform");
    cJSON_AddObjectToObject(c, "rank_pattern");
    cJSON_AddObjectToObject(c, "alpha_pattern");
    char *s = cJSON_Print(c);
    cJSON_Delete(c);
    char *out = xmalloc(strlen(s) + 2);
    sprintf(out, "%s\n", s);
    cJSON_free(s);
    return out;
}

int export_peft(const adapter *a, const char *dir, const export_options *opts) {
    export_options o = opts ? *opts : (export_options){MOSFT_F32, 0, NULL};
    if (a->ops->routed || !a->ops->build)
        return mosft_fail(MOSFT_ERR_INPUT,
                          "export: a %s adapter routes each token to its own experts, so it has no per-layer Delta W "
                          "and no PEFT LoRA form; nothing was written (the adapter.mos stays usable by mosft eval)",
                          a->spec.method);
    if (o.dtype != MOSFT_F32 && o.dtype != MOSFT_BF16)
        return mosft_fail(MOSFT_ERR_INPUT, "export: --dtype: expected f32 or bf16, got %s", dtype_name(o.dtype));
    if (file_exists(dir) && !dir_exists(dir))
        return mosft_fail(MOSFT_ERR_INPUT, "%s: expected a folder to write the PEFT adapter into, got a file", dir);
    if (dir_exists(dir) && !o.force) {
        int n = dir_entries(dir);
        if (n != 0)
            return mosft_fail_hint(MOSFT_ERR_INPUT, "give a new folder, or --force to replace the adapter files there",
                                   "%s: expected a new or empty folder, got one holding %d entr%s", dir, n,
                                   n == 1 ? "y" : "ies");
    }
    int rc = mkdir_p(dir);
    if (rc) return rc;

    const llama_config *m = &a->model;
    int L = m->n_layers, r = a->rank;
    int n_mod = 0;
    for (int t = 0; t < MOD_COUNT; t++) n_mod += a->spec.targets[t] != 0;
    void **bufs = xcalloc((size_t)L * n_mod * 2, sizeof(void *));
    int nb = 0;
    st_writer *w = st_writer_new();
    st_writer_meta(w, "format", "pt");
    // PEFT's own state-dict order: layer by layer, the modules in model order, A before B.
    for (int i = 0; i < L; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            if (!a->spec.targets[t]) continue;
            int di, dout;
            llama_module_dims(m, t, &di, &dout);
            size_t na = (size_t)r * di, nbB = (size_t)dout * r;
            float *A = xmalloc(sizeof(float) * na);     // [r][d_in]
            float *B = xmalloc(sizeof(float) * nbB);    // [d_out][r]
            a->ops->build(a, i, t, A, B);
            void *pa = A, *pb = B;
            if (o.dtype == MOSFT_BF16) {
                uint16_t *ha = xmalloc(2 * na), *hb = xmalloc(2 * nbB);
                for (size_t e = 0; e < na; e++) ha[e] = f32_to_bf16(A[e]);
                for (size_t e = 0; e < nbB; e++) hb[e] = f32_to_bf16(B[e]);
                free(A);
                free(B);
                pa = ha;
                pb = hb;
            }
            bufs[nb++] = pa;
            bufs[nb++] = pb;
            char name[160];
            export_peft_tensor_name(name, sizeof name, i, t, 'A');
            st_writer_add(w, name, o.dtype, 2, (int64_t[]){r, di}, pa);
            export_peft_tensor_name(name, sizeof name, i, t, 'B');
            st_writer_add(w, name, o.dtype, 2, (int64_t[]){dout, r}, pb);
        }
    // The weights first, then the config: a folder whose config is new always has its new weights.
    char *wp = path_join(dir, "adapter_model.safetensors");
    rc = st_writer_write(w, wp);
    st_writer_free(w);
    for (int i = 0; i < nb; i++) free(bufs[i]);
    free(bufs);
    free(wp);
    if (rc) return rc;
    char *json = peft_config_json(a, &o);
    char *cp = path_join(dir, "adapter_config.json");
    rc = atomic_write_file(cp, json, strlen(json));
    free(cp);
    free(json);
    return rc;
}
