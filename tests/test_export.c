// test_export.c: `mosft export` to a PEFT LoRA folder: Delta W from the exported lora_A / lora_B and
// adapter_config.json equals Delta W materialized from adapter.mos's pools and index tables (read back
// as plain safetensors and assembled here by MOS.md 1.5's closed form), for MoS, its ablations and
// LoRA, in f32 and bf16; folder handling; the CLI of export and info.
//
// With MOSFT_EXPORT_FIXTURE_DIR=DIR set, the test also leaves stories260K adapters (random pools, so
// B != 0) and their exports in DIR for scripts/check_peft_export.py, which loads them with PEFT.
#include <cjson/cJSON.h>
#include <stdint.h>

#include "core/adapter.h"
#include "core/export.h"
#include "core/fileio.h"
#include "core/model.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "tests/test_util.h"

static llama_config small_model(void) {
    llama_config m;
    memset(&m, 0, sizeof m);
    snprintf(m.model_type, sizeof m.model_type, "llama");
    m.hidden = 16;
    m.intermediate = 24;
    m.n_layers = 3;
    m.n_heads = 4;
    m.n_kv_heads = 2;
    m.head_dim = 4;
    m.vocab = 64;
    return m;
}

static adapter_spec spec_of(const char *method, int r, int Rv, int Rp, int l) {
    adapter_spec s;
    memset(&s, 0, sizeof s);
    snprintf(s.method, sizeof s.method, "%s", method);
    s.r = r;
    s.equiv_rank = Rv;
    s.private_rank = Rp;
    s.shards = l;
    s.alpha = 16;
    s.dropout = 0.05;
    for (int t = 0; t < MOD_COUNT; t++) s.targets[t] = 1;
    s.seed = 3;
    s.pair_dissociation = 1;
    s.scale_mean = 1;
    return s;
}

// Random pools (B != 0), saved; the caller owns the adapter.
static adapter *make_saved(const adapter_spec *s, const llama_config *m, const char *path, uint64_t seed) {
    adapter *a = NULL;
    ck_assert_msg(adapter_create(&a, s, m) == MOSFT_OK, "%s", mosft_error());
    uint64_t k = rng_key(RNG_INIT, seed, 77, 0, 0);
    for (size_t i = 0; i < a->n_params; i++) a->params[i] = rng_normal(k, i) * 0.1f;
    a->step = 321;
    adapter_set_base_model_name(a, "tiny/llama");
    ck_assert_int_eq(adapter_save(a, path), MOSFT_OK);
    return a;
}

// Delta W [d_out][d_in] = s * B A in double.
static void delta_w(int di, int dout, int r, double s, const float *A, const float *B, double *dw) {
    for (int o = 0; o < dout; o++)
        for (int c = 0; c < di; c++) {
            double acc = 0;
            for (int k = 0; k < r; k++) acc += (double)B[o * r + k] * A[k * di + c];
            dw[o * di + c] = s * acc;
        }
}

static float *tensor_f32(const st_file *f, const char *name) {
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL, "%s: %s missing", f->path, name);
    float *p = malloc(sizeof(float) * (size_t)t->numel);
    st_tensor_to_f32(t, p);
    return p;
}

// A^i and B^i of (layer, module) straight from the adapter.mos tensors (MOS.md 1.5), independent of
// the adapter code: A[k][j*sa + c] = c_k PoolA[Ia[k*l+j]][c], B[j*sb + c][k] = PoolB[Ib[k*l+j]][c].
static void factors_from_file(const st_file *f, int layer, int module, int di, int dout, int r, int l, float *A,
                              float *B) {
    char name[64];
    const char *t = k_module_names[module];
    snprintf(name, sizeof name, "mos.%s.pool_A", t);
    float *pa = tensor_f32(f, name);
    snprintf(name, sizeof name, "mos.%s.pool_B", t);
    float *pb = tensor_f32(f, name);
    snprintf(name, sizeof name, "mos.%s.index_A", t);
    const int32_t *ia = (const int32_t *)st_find(f, name)->data + (size_t)layer * r * l;
    snprintf(name, sizeof name, "mos.%s.index_B", t);
    const int32_t *ib = (const int32_t *)st_find(f, name)->data + (size_t)layer * r * l;
    snprintf(name, sizeof name, "mos.%s.scale", t);
    const st_tensor *sc = st_find(f, name);
    int sa = di / l, sb = dout / l;
    for (int k = 0; k < r; k++)
        for (int j = 0; j < l; j++)
            for (int c = 0; c < sa; c++) {
                float ck = sc ? ((const float *)sc->data)[layer * r + k] : 1.0f;
                A[k * di + j * sa + c] = ck * pa[(size_t)ia[k * l + j] * sa + c];
            }
    for (int k = 0; k < r; k++)
        for (int j = 0; j < l; j++)
            for (int c = 0; c < sb; c++) B[(j * sb + c) * r + k] = pb[(size_t)ib[k * l + j] * sb + c];
    free(pa);
    free(pb);
}

static cJSON *read_json(const char *path) {
    char *text = NULL;
    ck_assert_int_eq(file_read_all(path, &text, NULL), MOSFT_OK);
    cJSON *j = cJSON_Parse(text);
    free(text);
    ck_assert_ptr_nonnull(j);
    return j;
}

// Export `mos_path` into `dir` and compare every module's Delta W with the pools'. Returns the max
// relative difference |dW_export - dW_pools| / max |dW_pools|.
static double check_export(const char *mos_path, const char *dir, mosft_dtype dtype) {
    adapter *a = NULL;
    ck_assert_msg(adapter_load(&a, mos_path, NULL) == MOSFT_OK, "%s", mosft_error());
    export_options o = {dtype, 0, NULL};
    ck_assert_msg(export_peft(a, dir, &o) == MOSFT_OK, "%s", mosft_error());
    char *cp = path_join(dir, "adapter_config.json"), *wp = path_join(dir, "adapter_model.safetensors");
    cJSON *cfg = read_json(cp);
    ck_assert_str_eq(cJSON_GetObjectItem(cfg, "peft_type")->valuestring, "LORA");
    ck_assert_str_eq(cJSON_GetObjectItem(cfg, "task_type")->valuestring, "CAUSAL_LM");
    ck_assert_str_eq(cJSON_GetObjectItem(cfg, "base_model_name_or_path")->valuestring, "tiny/llama");
    ck_assert_str_eq(cJSON_GetObjectItem(cfg, "bias")->valuestring, "none");
    ck_assert(cJSON_IsFalse(cJSON_GetObjectItem(cfg, "use_rslora")) && cJSON_IsFalse(cJSON_GetObjectItem(cfg, "use_dora")));
    ck_assert(cJSON_IsFalse(cJSON_GetObjectItem(cfg, "fan_in_fan_out")));
    int r = (int)cJSON_GetObjectItem(cfg, "r")->valuedouble;
    double alpha = cJSON_GetObjectItem(cfg, "lora_alpha")->valuedouble;
    ck_assert_int_eq(r, a->rank);
    ck_assert(fabs(cJSON_GetObjectItem(cfg, "lora_dropout")->valuedouble - a->spec.dropout) < 1e-12);
    const cJSON *tm = cJSON_GetObjectItem(cfg, "target_modules");
    int nt = 0;
    for (int t = 0; t < MOD_COUNT; t++) nt += a->spec.targets[t] != 0;
    ck_assert_int_eq(cJSON_GetArraySize(tm), nt);
    for (const cJSON *it = tm->child; it; it = it->next) {
        int mi = module_from_name(it->valuestring);
        ck_assert(mi >= 0 && a->spec.targets[mi] && strstr(it->valuestring, "_proj"));
    }

    st_file pf, af;
    ck_assert_int_eq(st_open(&pf, wp), MOSFT_OK);
    ck_assert_int_eq(st_open(&af, mos_path), MOSFT_OK);
    ck_assert_int_eq(pf.n_tensors, 2 * nt * a->model.n_layers);
    int is_mos = !strcmp(a->spec.method, "mos");
    double worst = 0;
    for (int i = 0; i < a->model.n_layers; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            if (!a->spec.targets[t]) continue;
            int di, dout;
            llama_module_dims(&a->model, t, &di, &dout);
            char na[160], nb[160];
            export_peft_tensor_name(na, sizeof na, i, t, 'A');
            export_peft_tensor_name(nb, sizeof nb, i, t, 'B');
            ck_assert(strstr(na, "base_model.model.model.layers.") == na && strstr(na, ".lora_A.weight"));
            const st_tensor *ta = st_find(&pf, na), *tb = st_find(&pf, nb);
            ck_assert_msg(ta && tb, "%s missing", na);
            ck_assert_int_eq(st_expect(&pf, ta, dtype, 2, (int64_t[]){r, di}), MOSFT_OK);
            ck_assert_int_eq(st_expect(&pf, tb, dtype, 2, (int64_t[]){dout, r}), MOSFT_OK);
            float *Ae = tensor_f32(&pf, na), *Be = tensor_f32(&pf, nb);
            float *Ap = malloc(sizeof(float) * r * di), *Bp = malloc(sizeof(float) * dout * r);
            if (is_mos) {
                factors_from_file(&af, i, t, di, dout, r, a->spec.shards, Ap, Bp);
            } else {
                char n[64];
                snprintf(n, sizeof n, "lora.layers.%d.%s.A", i, k_module_names[t]);
                float *p = tensor_f32(&af, n);
                memcpy(Ap, p, sizeof(float) * r * di);
                free(p);
                snprintf(n, sizeof n, "lora.layers.%d.%s.B", i, k_module_names[t]);
                p = tensor_f32(&af, n);
                memcpy(Bp, p, sizeof(float) * dout * r);
                free(p);
            }
            // The factors themselves: the trained floats (f32), or those rounded to bf16.
            for (int e = 0; e < r * di; e++)
                ck_assert_msg(Ae[e] == (dtype == MOSFT_F32 ? Ap[e] : bf16_round(Ap[e])), "%s[%d]: %g vs %g", na, e, Ae[e],
                              Ap[e]);
            for (int e = 0; e < dout * r; e++)
                ck_assert_msg(Be[e] == (dtype == MOSFT_F32 ? Bp[e] : bf16_round(Bp[e])), "%s[%d]", nb, e);
            double *dwe = malloc(sizeof(double) * dout * di), *dwp = malloc(sizeof(double) * dout * di);
            delta_w(di, dout, r, alpha / r, Ae, Be, dwe);  // PEFT: (lora_alpha / r) B @ A
            delta_w(di, dout, r, (double)a->scaling, Ap, Bp, dwp);  // training: s B^i A^i
            double mx = 0, md = 0;
            for (int e = 0; e < dout * di; e++) {
                mx = fmax(mx, fabs(dwp[e]));
                md = fmax(md, fabs(dwe[e] - dwp[e]));
            }
            ck_assert(mx > 0);
            worst = fmax(worst, md / mx);
            free(Ae), free(Be), free(Ap), free(Bp), free(dwe), free(dwp);
        }
    st_close(&pf);
    st_close(&af);
    cJSON_Delete(cfg);
    free(cp);
    free(wp);
    adapter_free(a);
    return worst;
}

START_TEST(test_export_roundtrip) {
    llama_config m = small_model();
    char *dir = test_tmpdir();
    char base[256];
    snprintf(base, sizeof base, "%s", dir);
    struct {
        adapter_spec s;
        const char *what;
    } cases[8];
    int n = 0;
    cases[n].s = spec_of("mos", 4, 2, 1, 2), cases[n++].what = "mos";
    cases[n].s = spec_of("mos", 6, 2, 0, 4), cases[n++].what = "mos -sp l=4";
    cases[n].s = spec_of("mos", 4, 2, 1, 2), cases[n].s.pair_dissociation = 0, cases[n++].what = "mos -pd";
    cases[n].s = spec_of("mos", 4, 2, 1, 2), cases[n].s.scale_std = 0.3, cases[n++].what = "mos random scaling";
    cases[n].s = spec_of("mos", 4, 2, 1, 2), cases[n].s.pure_sharing = 1, cases[n++].what = "pure sharing";
    cases[n].s = spec_of("mos", 5, 2, 1, 2), cases[n].s.subset_selection = 1, cases[n++].what = "subset selection";
    cases[n].s = spec_of("lora", 3, 1, 0, 1), cases[n++].what = "lora";
    cases[n].s = spec_of("mos", 2, 2, 2, 4), cases[n].s.targets[MOD_K] = 0, cases[n++].what = "mos all private, no k";
    for (int i = 0; i < n; i++) {
        char mp[512], d32[512], d16[512];
        snprintf(mp, sizeof mp, "%s/a%d.mos", base, i);
        snprintf(d32, sizeof d32, "%s/peft%d_f32", base, i);
        snprintf(d16, sizeof d16, "%s/peft%d_bf16", base, i);
        adapter *a = make_saved(&cases[i].s, &m, mp, (uint64_t)i);
        int rank = a->rank;
        adapter_free(a);
        double e32 = check_export(mp, d32, MOSFT_F32), e16 = check_export(mp, d16, MOSFT_BF16);
        // f32: the same A and B (checked bitwise above); the scaling alpha / r is a float in training and
        // a double in PEFT's formula, hence a relative difference up to 2^-24.
        ck_assert_msg(e32 <= 1.2e-7, "%s: f32 export differs by %g", cases[i].what, e32);
        // bf16: A and B rounded (2^-9 relative each), summed over r terms of mixed sign.
        ck_assert_msg(e16 < 0.02 && e16 > 0, "%s: bf16 export differs by %g", cases[i].what, e16);
        if (cases[i].s.pure_sharing) ck_assert_int_eq(rank, 2 * 3);
    }
}
END_TEST

START_TEST(test_export_folder) {
    llama_config m = small_model();
    adapter_spec s = spec_of("mos", 4, 2, 1, 2);
    char base[256];
    snprintf(base, sizeof base, "%s", test_tmpdir());
    char mp[512], d[512], f[512];
    snprintf(mp, sizeof mp, "%s/a.mos", base);
    adapter *a = make_saved(&s, &m, mp, 1);
    export_options o = {MOSFT_F32, 0, NULL};
    snprintf(d, sizeof d, "%s/new/nested", base);
    ck_assert_int_eq(export_peft(a, d, &o), MOSFT_OK);  // created, with parents
    ck_assert_int_eq(export_peft(a, d, &o), MOSFT_ERR_INPUT);  // not empty any more
    ck_assert(strstr(mosft_error(), "new or empty folder") && strstr(mosft_error_hint(), "--force"));
    o.force = 1;
    o.base_model = "meta-llama/Llama-2-7b-hf";
    ck_assert_int_eq(export_peft(a, d, &o), MOSFT_OK);
    char *cp = path_join(d, "adapter_config.json");
    cJSON *j = read_json(cp);
    ck_assert_str_eq(cJSON_GetObjectItem(j, "base_model_name_or_path")->valuestring, "meta-llama/Llama-2-7b-hf");
    ck_assert_int_eq((int)cJSON_GetObjectItem(j, "r")->valuedouble, 4);
    ck_assert(cJSON_GetObjectItem(j, "lora_alpha")->valuedouble == 16);
    cJSON_Delete(j);
    free(cp);
    // No name recorded: null (PEFT then needs the base model given explicitly).
    adapter_set_base_model_name(a, "");
    o.base_model = NULL;
    ck_assert_int_eq(export_peft(a, d, &o), MOSFT_OK);
    cp = path_join(d, "adapter_config.json");
    j = read_json(cp);
    ck_assert(cJSON_IsNull(cJSON_GetObjectItem(j, "base_model_name_or_path")));
    cJSON_Delete(j);
    free(cp);
    // An existing empty folder is fine; a file is not a folder.
    snprintf(d, sizeof d, "%s/empty", base);
    ck_assert_int_eq(mkdir_p(d), MOSFT_OK);
    o.force = 0;
    ck_assert_int_eq(export_peft(a, d, &o), MOSFT_OK);
    snprintf(f, sizeof f, "%s/afile", base);
    ck_assert_int_eq(atomic_write_file(f, "x", 1), MOSFT_OK);
    ck_assert_int_eq(export_peft(a, f, &o), MOSFT_ERR_INPUT);
    o.dtype = MOSFT_F16;
    ck_assert_int_eq(export_peft(a, d, &o), MOSFT_ERR_INPUT);
    adapter_free(a);
}
END_TEST

START_TEST(test_cli) {
    llama_config m = small_model();
    adapter_spec s = spec_of("mos", 4, 2, 1, 2);
    char base[256], cmd[2048], mp[512];
    snprintf(base, sizeof base, "%s", test_tmpdir());
    snprintf(mp, sizeof mp, "%s/run/adapter.mos", base);
    char rd[512];
    snprintf(rd, sizeof rd, "%s/run", base);
    ck_assert_int_eq(mkdir_p(rd), MOSFT_OK);
    adapter_free(make_saved(&s, &m, mp, 2));
    char *out = NULL;
    ck_assert_int_eq(run_capture("build/mosft export --help", &out), 0);
    ck_assert(strstr(out, "usage: mosft export") && strstr(out, "--dtype") && strstr(out, "--force"));
    free(out);
    ck_assert_int_eq(run_capture("build/mosft export", &out), 2);
    ck_assert(strstr(out, "error: export"));
    free(out);
    snprintf(cmd, sizeof cmd, "build/mosft export %s", mp);  // no -o
    ck_assert_int_eq(run_capture(cmd, &out), 2);
    ck_assert(strstr(out, "-o DIR"));
    free(out);
    snprintf(cmd, sizeof cmd, "build/mosft export %s -o %s/x --dtype f16", mp, base);
    ck_assert_int_eq(run_capture(cmd, &out), 2);
    ck_assert(strstr(out, "f16"));
    free(out);
    snprintf(cmd, sizeof cmd, "build/mosft export %s/nope.mos -o %s/x", base, base);
    ck_assert_int_eq(run_capture(cmd, &out), 2);
    ck_assert(strstr(out, "nope.mos"));
    free(out);
    snprintf(cmd, sizeof cmd, "build/mosft export %s -o %s/x --bogus", mp, base);
    ck_assert_int_eq(run_capture(cmd, &out), 2);
    free(out);
    // A run folder works as well as the file; bf16.
    snprintf(cmd, sizeof cmd, "build/mosft export %s -o %s/peft --dtype bf16", rd, base);
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    ck_assert_msg(strstr(out, "wrote") && strstr(out, "bf16") && strstr(out, "r 4"), "%s", out);
    free(out);
    ck_assert_int_eq(run_capture(cmd, &out), 2);  // again: the folder is not empty
    ck_assert(strstr(out, "--force"));
    free(out);
    snprintf(cmd, sizeof cmd, "build/mosft export %s -o %s/peft --force", mp, base);
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    free(out);
    // A PEFT file is not an adapter.mos.
    snprintf(cmd, sizeof cmd, "build/mosft export %s/peft/adapter_model.safetensors -o %s/y", base, base);
    ck_assert_int_eq(run_capture(cmd, &out), 2);
    ck_assert(strstr(out, "format"));
    free(out);
    // mosft info on the adapter.
    snprintf(cmd, sizeof cmd, "build/mosft info %s", mp);
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    ck_assert_msg(strstr(out, "mos (Mixture of Shards)") && strstr(out, "step             321") &&
                      strstr(out, "tiny/llama") && strstr(out, "R_v 2") && strstr(out, "mos.q.index_A") &&
                      strstr(out, "hidden 16"),
                  "%s", out);
    free(out);
}
END_TEST

// Adapters on stories260K for scripts/check_peft_export.py (only with MOSFT_EXPORT_FIXTURE_DIR set).
START_TEST(test_write_peft_fixtures) {
    const char *dir = getenv("MOSFT_EXPORT_FIXTURE_DIR");
    if (!dir || !*dir) return;
    REQUIRE_SHARED();
    llama_config m;
    ck_assert_int_eq(llama_config_load(&m, shared_path("models/stories260K/hf")), MOSFT_OK);
    ck_assert_int_eq(mkdir_p(dir), MOSFT_OK);
    struct {
        const char *name;
        adapter_spec s;
        mosft_dtype dt;
    } cases[6];
    int n = 0;
    cases[n].name = "mos", cases[n].s = spec_of("mos", 6, 2, 1, 4), cases[n++].dt = MOSFT_F32;
    cases[n].name = "mos_scale_pd", cases[n].s = spec_of("mos", 6, 3, 1, 2), cases[n].s.scale_std = 0.2,
    cases[n].s.pair_dissociation = 0, cases[n++].dt = MOSFT_F32;
    cases[n].name = "mos_pure", cases[n].s = spec_of("mos", 8, 2, 1, 4), cases[n].s.pure_sharing = 1,
    cases[n++].dt = MOSFT_F32;
    cases[n].name = "mos_bf16", cases[n].s = spec_of("mos", 4, 2, 0, 1), cases[n++].dt = MOSFT_BF16;
    cases[n].name = "lora", cases[n].s = spec_of("lora", 4, 1, 0, 1), cases[n++].dt = MOSFT_F32;
    cases[n].name = "mos_qv", cases[n].s = spec_of("mos", 4, 2, 1, 4), cases[n++].dt = MOSFT_F32;
    for (int t = 0; t < MOD_COUNT; t++) cases[n - 1].s.targets[t] = t == MOD_Q || t == MOD_V;
    for (int i = 0; i < n; i++) {
        char mp[512], pd[512];
        snprintf(mp, sizeof mp, "%s/%s.mos", dir, cases[i].name);
        snprintf(pd, sizeof pd, "%s/%s_peft", dir, cases[i].name);
        adapter *a = make_saved(&cases[i].s, &m, mp, 100 + (uint64_t)i);
        adapter_set_base_model_name(a, shared_path("models/stories260K/hf"));
        ck_assert_int_eq(adapter_save(a, mp), MOSFT_OK);
        export_options o = {cases[i].dt, 1, NULL};
        ck_assert_msg(export_peft(a, pd, &o) == MOSFT_OK, "%s", mosft_error());
        adapter_free(a);
        fprintf(stderr, "wrote %s and %s\n", mp, pd);
    }
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("export");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_export_roundtrip);
    tcase_add_test(tc, test_export_folder);
    tcase_add_test(tc, test_cli);
    tcase_add_test(tc, test_write_peft_fixtures);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(suite)
