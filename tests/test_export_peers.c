// test_export_peers.c: `mosft export` of the peer adapters. For every method whose Delta W is a
// per-layer low-rank matrix (PRoLoRA, VeRA, Tied-LoRA, ShareLoRA), PEFT's Delta W from the exported
// folder, (lora_alpha / r) lora_B lora_A, equals the Delta W of the method's own forward
// (adapter_forward_cpu applied to the unit vectors), with its scales folded in; SiRA is refused with a
// clear input error (exit 2 from the CLI, nothing written) and stays usable.
//
// With MOSFT_EXPORT_FIXTURE_DIR=DIR set, the test also leaves stories260K peer adapters (random
// values, B != 0) in DIR for scripts/check_peft_export_peers.py, which checks them with PEFT.
#include <cjson/cJSON.h>
#include <stdint.h>

#include "core/adapter.h"
#include "core/config.h"
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

static adapter_spec peer_spec(const char *method, int r) {
    mosft_config c;
    config_defaults(&c);
    adapter_spec s;
    adapter_spec_from_config(&s, &c);
    config_free(&c);
    snprintf(s.method, sizeof s.method, "%s", method);
    s.r = r;
    s.alpha = 16;
    s.dropout = 0.05;
    s.seed = 3;
    for (int t = 0; t < MOD_COUNT; t++) s.targets[t] = 1;
    return s;
}

// Random trainable values (every factor nonzero, standard deviation `sd`), saved; the caller owns it.
static adapter *make_saved_sd(const adapter_spec *s, const llama_config *m, const char *path, uint64_t seed, float sd) {
    adapter *a = NULL;
    ck_assert_msg(adapter_create(&a, s, m) == MOSFT_OK, "%s", mosft_error());
    uint64_t k = rng_key(RNG_INIT, seed, 77, 0, 0);
    for (size_t i = 0; i < a->n_params; i++) a->params[i] = rng_normal(k, i) * sd;
    a->step = 12;
    adapter_set_base_model_name(a, "tiny/llama");
    ck_assert_int_eq(adapter_save(a, path), MOSFT_OK);
    return a;
}

static adapter *make_saved(const adapter_spec *s, const llama_config *m, const char *path, uint64_t seed) {
    return make_saved_sd(s, m, path, seed, 0.3f);
}

static float *tensor_f32(const st_file *f, const char *name) {
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL, "%s: %s missing", f->path, name);
    float *p = malloc(sizeof(float) * (size_t)t->numel);
    st_tensor_to_f32(t, p);
    return p;
}

static cJSON *read_json(const char *path) {
    char *text = NULL;
    ck_assert_int_eq(file_read_all(path, &text, NULL), MOSFT_OK);
    cJSON *j = cJSON_Parse(text);
    free(text);
    ck_assert_ptr_nonnull(j);
    return j;
}

// Delta W [d_out][d_in] of the method's own forward: column c is the branch's output for x = e_c.
static double *forward_delta_w(const adapter *a, int layer, int module, int di, int dout) {
    float *x = calloc((size_t)di * di, sizeof(float)), *y = calloc((size_t)di * dout, sizeof(float));
    for (int c = 0; c < di; c++) x[(size_t)c * di + c] = 1;
    adapter_forward_cpu(a, layer, module, di, x, NULL, y, 0, 0);
    double *dw = malloc(sizeof(double) * dout * di);
    for (int o = 0; o < dout; o++)
        for (int c = 0; c < di; c++) dw[(size_t)o * di + c] = y[(size_t)c * dout + o];
    free(x);
    free(y);
    return dw;
}

// Export the saved adapter at `mos_path` into `dir` (loaded back from the file, as `mosft export`
// does) and compare every module's PEFT Delta W with the forward's. Returns the largest
// |dW_peft - dW_forward| / max |dW_forward| over the modules.
static double check_export(const char *mos_path, const char *dir, mosft_dtype dtype, const char *what) {
    adapter *a = NULL;
    ck_assert_msg(adapter_load(&a, mos_path, NULL) == MOSFT_OK, "%s", mosft_error());
    export_options o = {dtype, 0, NULL};
    ck_assert_msg(export_peft(a, dir, &o) == MOSFT_OK, "%s: %s", what, mosft_error());
    char *cp = path_join(dir, "adapter_config.json"), *wp = path_join(dir, "adapter_model.safetensors");
    cJSON *cfg = read_json(cp);
    ck_assert_str_eq(cJSON_GetObjectItem(cfg, "peft_type")->valuestring, "LORA");
    int r = (int)cJSON_GetObjectItem(cfg, "r")->valuedouble;
    double alpha = cJSON_GetObjectItem(cfg, "lora_alpha")->valuedouble;
    ck_assert_int_eq(r, a->spec.r);
    if (!strcmp(a->spec.method, "vera"))
        ck_assert_msg(alpha == r, "vera: lora_alpha %g, expected r = %d (VeRA's scaling is 1)", alpha, r);
    else
        ck_assert(alpha == a->spec.alpha);
    st_file pf;
    ck_assert_int_eq(st_open(&pf, wp), MOSFT_OK);
    double worst = 0;
    for (int i = 0; i < a->model.n_layers; i++)
        for (int t = 0; t < MOD_COUNT; t++) {
            if (!a->spec.targets[t]) continue;
            int di, dout;
            llama_module_dims(&a->model, t, &di, &dout);
            char na[160], nb[160];
            export_peft_tensor_name(na, sizeof na, i, t, 'A');
            export_peft_tensor_name(nb, sizeof nb, i, t, 'B');
            const st_tensor *ta = st_find(&pf, na), *tb = st_find(&pf, nb);
            ck_assert_msg(ta && tb, "%s: %s missing", what, na);
            ck_assert_int_eq(st_expect(&pf, ta, dtype, 2, (int64_t[]){r, di}), MOSFT_OK);
            ck_assert_int_eq(st_expect(&pf, tb, dtype, 2, (int64_t[]){dout, r}), MOSFT_OK);
            float *A = tensor_f32(&pf, na), *B = tensor_f32(&pf, nb);
            double *want = forward_delta_w(a, i, t, di, dout), mx = 0, md = 0;
            for (int oo = 0; oo < dout; oo++)
                for (int c = 0; c < di; c++) {
                    double acc = 0;
                    for (int k = 0; k < r; k++) acc += (double)B[oo * r + k] * A[k * di + c];
                    double peft = alpha / r * acc, w = want[(size_t)oo * di + c];
                    mx = fmax(mx, fabs(w));
                    md = fmax(md, fabs(peft - w));
                }
            ck_assert_msg(mx > 0, "%s: layer %d %s: Delta W is 0 (the test needs B != 0)", what, i, k_module_names[t]);
            worst = fmax(worst, md / mx);
            free(A), free(B), free(want);
        }
    ck_assert_int_eq(pf.n_tensors, 2 * a->model.n_layers * (a->spec.targets[MOD_V] ? 7 : 6));
    st_close(&pf);
    cJSON_Delete(cfg);
    free(cp);
    free(wp);
    adapter_free(a);
    return worst;
}

START_TEST(test_export_peers) {
    llama_config m = small_model();
    char base[256];
    snprintf(base, sizeof base, "%s", test_tmpdir());
    struct {
        adapter_spec s;
        const char *what;
    } cases[12];
    int n = 0;
    cases[n].s = peer_spec("prolora", 4), cases[n++].what = "prolora r 4 u 0 m n 2";
    cases[n].s = peer_spec("prolora", 5), cases[n].s.prolora_unshared_r = 1, cases[n].s.prolora_reduce_a = 3,
    cases[n].s.prolora_reduce_b = 5, cases[n++].what = "prolora r 5 u 1 m 3 n 5 (truncated chunks)";
    cases[n].s = peer_spec("vera", 6), cases[n].s.vera_projection_seed = 4, cases[n++].what = "vera";
    cases[n].s = peer_spec("tied_lora", 3), cases[n++].what = "tied_lora vBuA";
    cases[n].s = peer_spec("tied_lora", 3), cases[n].s.targets[MOD_V] = 0, cases[n].what = "tied_lora uB, no v_proj";
    snprintf(cases[n++].s.tied_lora_trainable, 8, "uB");
    const char *shares[] = {"A", "B", "AB", "qkv"}, *share_names[] = {"sharelora A", "sharelora B", "sharelora AB", "sharelora qkv"};
    for (int i = 0; i < 4; i++) {
        cases[n].s = peer_spec("sharelora", 2), cases[n].what = share_names[i];
        snprintf(cases[n++].s.sharelora_share, 8, "%s", shares[i]);
    }
    for (int i = 0; i < n; i++) {
        char mp[512], d32[512], d16[512];
        snprintf(mp, sizeof mp, "%s/a%d.mos", base, i);
        snprintf(d32, sizeof d32, "%s/peft%d_f32", base, i);
        snprintf(d16, sizeof d16, "%s/peft%d_bf16", base, i);
        adapter_free(make_saved(&cases[i].s, &m, mp, 10 + (uint64_t)i));
        double e32 = check_export(mp, d32, MOSFT_F32, cases[i].what), e16 = check_export(mp, d16, MOSFT_BF16, cases[i].what);
        // f32: the built factors themselves; the forward accumulates in double and rounds once.
        ck_assert_msg(e32 <= 1e-6, "%s: f32 export's Delta W differs from the forward's by %g", cases[i].what, e32);
        // bf16: A and B rounded (2^-9 relative each).
        ck_assert_msg(e16 > 0 && e16 < 0.03, "%s: bf16 export differs by %g", cases[i].what, e16);
        fprintf(stderr, "export %-45s f32 %.2e  bf16 %.2e\n", cases[i].what, e32, e16);
    }
}
END_TEST

START_TEST(test_export_sira_refused) {
    llama_config m = small_model();
    adapter_spec s = peer_spec("sira", 2);
    char base[256], mp[512], d[512], cmd[2048];
    snprintf(base, sizeof base, "%s", test_tmpdir());
    snprintf(mp, sizeof mp, "%s/sira.mos", base);
    snprintf(d, sizeof d, "%s/peft", base);
    adapter *a = make_saved(&s, &m, mp, 1);
    export_options o = {MOSFT_F32, 0, NULL};
    mosft_error_clear();
    ck_assert_int_eq(export_peft(a, d, &o), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "sira") && strstr(mosft_error(), "mosft eval") && !strchr(mosft_error(), '\n'),
                  "%s", mosft_error());
    ck_assert(!file_exists(d));  // nothing written
    adapter_free(a);
    // The CLI: exit 2, one line, no folder.
    char *out = NULL;
    snprintf(cmd, sizeof cmd, "build/mosft export %s -o %s", mp, d);
    ck_assert_int_eq(run_capture(cmd, &out), 2);
    ck_assert_msg(strncmp(out, "error: export: a sira adapter", 29) == 0, "%s", out);
    ck_assert_msg(strchr(out, '\n') == out + strlen(out) - 1, "more than one line: %s", out);
    ck_assert(!file_exists(d));
    free(out);
    // The adapter itself is fine: info reads it.
    snprintf(cmd, sizeof cmd, "build/mosft info %s", mp);
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    ck_assert_msg(strstr(out, "sira") && strstr(out, "E 4") && strstr(out, "top-k 2") && strstr(out, "sira.layers.0.q.gate"),
                  "%s", out);
    free(out);
}
END_TEST

START_TEST(test_export_cli_vera) {
    llama_config m = small_model();
    adapter_spec s = peer_spec("vera", 8);
    char base[256], mp[512], cmd[2048];
    snprintf(base, sizeof base, "%s", test_tmpdir());
    snprintf(mp, sizeof mp, "%s/vera.mos", base);
    adapter_free(make_saved(&s, &m, mp, 2));
    char *out = NULL;
    snprintf(cmd, sizeof cmd, "build/mosft export %s -o %s/peft", mp, base);
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    ck_assert_msg(strstr(out, "r 8, lora_alpha 8,") && strstr(out, "vera"), "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "build/mosft info %s", mp);
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    ck_assert_msg(strstr(out, "scaling          1 (no alpha / r)") && strstr(out, "vera.A") && strstr(out, "lambda_b"), "%s",
                  out);
    free(out);
}
END_TEST

// Peer adapters on stories260K for scripts/check_peft_export_peers.py (only with
// MOSFT_EXPORT_FIXTURE_DIR set).
START_TEST(test_write_peer_fixtures) {
    const char *dir = getenv("MOSFT_EXPORT_FIXTURE_DIR");
    if (!dir || !*dir) return;
    REQUIRE_SHARED();
    llama_config m;
    ck_assert_int_eq(llama_config_load(&m, shared_path("models/stories260K/hf")), MOSFT_OK);
    ck_assert_int_eq(mkdir_p(dir), MOSFT_OK);
    struct {
        const char *name;
        adapter_spec s;
    } cases[10];
    int n = 0;
    cases[n].name = "prolora", cases[n++].s = peer_spec("prolora", 4);
    cases[n].name = "prolora_u1", cases[n].s = peer_spec("prolora", 6), cases[n].s.prolora_unshared_r = 1,
    cases[n].s.prolora_reduce_a = 3, cases[n++].s.prolora_reduce_b = 5;
    cases[n].name = "vera", cases[n].s = peer_spec("vera", 16), cases[n++].s.vera_projection_seed = 5;
    cases[n].name = "vera_qv", cases[n].s = peer_spec("vera", 8);
    for (int t = 0; t < MOD_COUNT; t++) cases[n].s.targets[t] = t == MOD_Q || t == MOD_V;
    n++;
    cases[n].name = "tied_lora", cases[n++].s = peer_spec("tied_lora", 4);
    cases[n].name = "tied_lora_uB", cases[n].s = peer_spec("tied_lora", 4);
    snprintf(cases[n++].s.tied_lora_trainable, 8, "uB");
    const char *shares[] = {"A", "B", "AB", "qkv"};
    static char names[4][32];
    for (int i = 0; i < 4; i++) {
        snprintf(names[i], sizeof names[i], "sharelora_%s", shares[i]);
        cases[n].name = names[i], cases[n].s = peer_spec("sharelora", 2);
        snprintf(cases[n++].s.sharelora_share, 8, "%s", shares[i]);
    }
    for (int i = 0; i < n; i++) {
        char mp[512];
        snprintf(mp, sizeof mp, "%s/%s.mos", dir, cases[i].name);
        // Small values: a realistic adapter, so that the script's logits comparison stays in fp32's range.
        adapter *a = make_saved_sd(&cases[i].s, &m, mp, 200 + (uint64_t)i, 0.05f);
        adapter_set_base_model_name(a, shared_path("models/stories260K/hf"));
        ck_assert_int_eq(adapter_save(a, mp), MOSFT_OK);
        adapter_free(a);
        fprintf(stderr, "wrote %s\n", mp);
    }
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("export_peers");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_export_peers);
    tcase_add_test(tc, test_export_sira_refused);
    tcase_add_test(tc, test_export_cli_vera);
    tcase_add_test(tc, test_write_peer_fixtures);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(suite)
