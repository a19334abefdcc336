// test_adapter_file.c: adapter.mos: save/load round trips (MoS with every buffer kind, LoRA), the
// base-model fingerprint, and bad files: truncated, garbage, hand-edited metadata, tensors and index
// tables (each an input error naming the problem, never a crash).
#include <stdint.h>

#include "core/adapter.h"
#include "core/fileio.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "core/version.h"
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

static adapter_spec spec_of(const char *method) {
    adapter_spec s;
    memset(&s, 0, sizeof s);
    snprintf(s.method, sizeof s.method, "%s", method);
    s.r = 4;
    s.equiv_rank = 2;
    s.private_rank = 1;
    s.shards = 2;
    s.alpha = 16;
    s.dropout = 0.1;
    for (int t = 0; t < MOD_COUNT; t++) s.targets[t] = t != MOD_V;
    s.seed = 5;
    s.pair_dissociation = 1;
    s.scale_mean = 1.5;
    s.scale_std = 0.2;
    snprintf(s.tied_lora_trainable, sizeof s.tied_lora_trainable, "vBuA");
    snprintf(s.sharelora_share, sizeof s.sharelora_share, "A");
    s.prolora_reduce_a = s.prolora_reduce_b = 2;
    s.sira_experts = 4;
    s.sira_top_k = 2;
    s.sira_capacity_factor = 1.25;
    s.sira_expert_dropout = 0.1;
    s.vera_d_initial = 0.1;
    return s;
}

static adapter *make(const char *method) {
    llama_config m = small_model();
    adapter_spec s = spec_of(method);
    adapter *a = NULL;
    ck_assert_msg(adapter_create(&a, &s, &m) == MOSFT_OK, "%s", mosft_error());
    uint64_t k = rng_key(RNG_INIT, 99, 0, 0, 0);
    for (size_t i = 0; i < a->n_params; i++) a->params[i] = rng_uniform(k, i) - 0.5f;
    a->step = 1234;
    adapter_set_base_model_name(a, "karpathy/stories260K");
    return a;
}

static void assert_same(const adapter *a, const adapter *b) {
    ck_assert_str_eq(a->spec.method, b->spec.method);
    char *ja = adapter_spec_to_json(&a->spec), *jb = adapter_spec_to_json(&b->spec);
    ck_assert_str_eq(ja, jb);
    free(ja);
    free(jb);
    ck_assert_mem_eq(a->spec.targets, b->spec.targets, sizeof a->spec.targets);
    ck_assert(a->spec.seed == b->spec.seed && a->spec.alpha == b->spec.alpha && a->spec.dropout == b->spec.dropout);
    ck_assert_int_eq(a->rank, b->rank);
    ck_assert(a->scaling == b->scaling);
    ck_assert_int_eq((int)a->step, (int)b->step);
    ck_assert_str_eq(a->base_model_name, b->base_model_name);
    ck_assert_str_eq(a->model_fingerprint, b->model_fingerprint);
    ck_assert_int_eq((int)a->n_params, (int)b->n_params);
    ck_assert_mem_eq(a->params, b->params, a->n_params * sizeof(float));
    ck_assert_int_eq(a->n_tensors, b->n_tensors);
    for (int i = 0; i < a->n_tensors; i++) ck_assert_mem_eq(&a->tensors[i], &b->tensors[i], sizeof a->tensors[i]);
    ck_assert_int_eq(a->n_buffers, b->n_buffers);
    for (int i = 0; i < a->n_buffers; i++) {
        ck_assert_str_eq(a->buffers[i].name, b->buffers[i].name);
        ck_assert_int_eq((int)a->buffers[i].nbytes, (int)b->buffers[i].nbytes);
        ck_assert_mem_eq(a->buffers[i].data, b->buffers[i].data, a->buffers[i].nbytes);
    }
    ck_assert_int_eq(a->model.hidden, b->model.hidden);
    ck_assert_int_eq(a->model.intermediate, b->model.intermediate);
    ck_assert_int_eq(a->model.n_layers, b->model.n_layers);
    ck_assert_int_eq(a->model.n_kv_heads, b->model.n_kv_heads);
}

static char g_dir[256];
static const char *tmp_file(const char *name) {
    static char p[512];
    if (!g_dir[0]) snprintf(g_dir, sizeof g_dir, "%s", test_tmpdir());
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    return p;
}

START_TEST(test_roundtrip) {
    const char *methods[] = {"mos", "lora"};
    for (int k = 0; k < 2; k++) {
        adapter *a = make(methods[k]);
        char path[512];
        snprintf(path, sizeof path, "%s", tmp_file("rt.mos"));
        ck_assert_int_eq(adapter_save(a, path), MOSFT_OK);
        llama_config m = small_model();
        adapter *b = NULL, *c = NULL;
        ck_assert_msg(adapter_load(&b, path, &m) == MOSFT_OK, "%s", mosft_error());
        assert_same(a, b);
        ck_assert_msg(adapter_load(&c, path, NULL) == MOSFT_OK, "%s", mosft_error());  // dims from the fingerprint
        assert_same(a, c);
        // The file is plain safetensors with the documented metadata.
        st_file f;
        ck_assert_int_eq(st_open(&f, path), MOSFT_OK);
        ck_assert_str_eq(st_meta(&f, "format"), "mos");
        ck_assert_str_eq(st_meta(&f, "format_version"), "1");
        ck_assert_str_eq(st_meta(&f, "step"), "1234");
        ck_assert_str_eq(st_meta(&f, "base_model_name_or_path"), "karpathy/stories260K");
        ck_assert(strstr(st_meta(&f, "base_model"), "\"hidden_size\":16"));
        ck_assert(strstr(st_meta(&f, "base_model"), "model.layers.{i}.mlp.down_proj.weight"));
        ck_assert(!strstr(st_meta(&f, "base_model"), "v_proj"));
        if (k == 0) {
            const st_tensor *t = st_find(&f, "mos.q.index_B");
            ck_assert(t && t->dtype == MOSFT_I32 && t->shape[0] == 3 && t->shape[1] == 8);
            ck_assert(st_find(&f, "mos.down.scale") && st_find(&f, "mos.gate.pool_A"));
        } else {
            const st_tensor *t = st_find(&f, "lora.layers.2.down.B");
            ck_assert(t && t->dtype == MOSFT_F32 && t->shape[0] == 16 && t->shape[1] == 4);
        }
        st_close(&f);
        adapter_free(a);
        adapter_free(b);
        adapter_free(c);
    }
}
END_TEST

// The tables come from the file, never from the seed: a file with other (valid) tables loads as such.
START_TEST(test_tables_not_regenerated) {
    adapter *a = make("mos");
    int32_t *tab = (int32_t *)adapter_find_buffer(a, "mos.up.index_A")->data;  // [3][8]; 6 public then 2 private
    int32_t t0 = tab[8 + 0];
    tab[8 + 0] = tab[8 + 5];
    tab[8 + 5] = t0;
    const char *path = tmp_file("swapped.mos");
    ck_assert_int_eq(adapter_save(a, path), MOSFT_OK);
    adapter *b = NULL;
    ck_assert_msg(adapter_load(&b, path, NULL) == MOSFT_OK, "%s", mosft_error());
    assert_same(a, b);
    adapter_free(a);
    adapter_free(b);
}
END_TEST

START_TEST(test_other_model) {
    adapter *a = make("mos");
    const char *path = tmp_file("fp.mos");
    ck_assert_int_eq(adapter_save(a, path), MOSFT_OK);
    struct {
        int field;
        const char *name;
    } cases[] = {{0, "hidden_size"}, {1, "intermediate_size"}, {2, "num_hidden_layers"},
                 {3, "num_key_value_heads"}, {4, "vocab_size"}, {5, "model_type"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        llama_config m = small_model();
        switch (cases[i].field) {
        case 0: m.hidden = 32; break;
        case 1: m.intermediate = 48; break;
        case 2: m.n_layers = 4; break;
        case 3: m.n_kv_heads = 4; break;
        case 4: m.vocab = 32000; break;
        case 5: snprintf(m.model_type, sizeof m.model_type, "mistral"); break;
        }
        adapter *b = NULL;
        ck_assert_int_eq(adapter_load(&b, path, &m), MOSFT_ERR_INPUT);
        ck_assert_ptr_null(b);
        ck_assert_msg(strstr(mosft_error(), cases[i].name) && strstr(mosft_error(), "base model mismatch") &&
                          strstr(mosft_error(), path),
                      "%s", mosft_error());
    }
    adapter_free(a);
}
END_TEST

// Copy `src` to `dst` through the safetensors reader and writer, changing one thing on the way.
typedef struct {
    const char *skip;          // leave this tensor out
    const char *retype;        // store this tensor as F32 (bytes reinterpreted)
    const char *extra;         // add a tensor of this name
    const char *meta_key;      // set (or with meta_val NULL, drop) this metadata key
    const char *meta_val;
    const char *poke;          // set element poke_at of this I32 tensor to poke_val
    int poke_at, poke_val;
} edit;

static void rewrite(const char *src, const char *dst, const edit *e) {
    st_file f;
    ck_assert_int_eq(st_open(&f, src), MOSFT_OK);
    st_writer *w = st_writer_new();
    void **copies = calloc((size_t)f.n_tensors + 1, sizeof(void *));
    for (int i = 0; i < f.n_tensors; i++) {
        const st_tensor *t = &f.tensors[i];
        if (e->skip && !strcmp(t->name, e->skip)) continue;
        copies[i] = malloc(t->nbytes ? t->nbytes : 1);
        memcpy(copies[i], t->data, t->nbytes);
        mosft_dtype dt = t->dtype;
        if (e->retype && !strcmp(t->name, e->retype)) dt = MOSFT_F32;
        if (e->poke && !strcmp(t->name, e->poke)) ((int32_t *)copies[i])[e->poke_at] = e->poke_val;
        st_writer_add(w, t->name, dt, t->ndim, t->shape, copies[i]);
    }
    static const float one = 1.0f;
    if (e->extra) st_writer_add(w, e->extra, MOSFT_F32, 1, (int64_t[]){1}, &one);
    for (int i = 0; i < f.n_meta; i++) {
        if (e->meta_key && !strcmp(f.meta_keys[i], e->meta_key)) continue;
        st_writer_meta(w, f.meta_keys[i], f.meta_vals[i]);
    }
    if (e->meta_key && e->meta_val) st_writer_meta(w, e->meta_key, e->meta_val);
    ck_assert_int_eq(st_writer_write(w, dst), MOSFT_OK);
    st_writer_free(w);
    for (int i = 0; i < f.n_tensors; i++) free(copies[i]);
    free(copies);
    st_close(&f);
}

static void expect_bad(const char *src, const edit *e, const char *needle) {
    const char *dst = tmp_file("edited.mos");
    char d[512];
    snprintf(d, sizeof d, "%s", dst);
    rewrite(src, d, e);
    adapter *a = NULL;
    llama_config m = small_model();
    mosft_error_clear();
    int rc = adapter_load(&a, d, &m);
    ck_assert_msg(rc == MOSFT_ERR_INPUT, "expected an input error (%s), got rc %d: %s", needle, rc, mosft_error());
    ck_assert_ptr_null(a);
    ck_assert_msg(strstr(mosft_error(), needle), "message \"%s\" lacks \"%s\"", mosft_error(), needle);
}

START_TEST(test_hand_edited) {
    adapter *a = make("mos");
    char src[512];
    snprintf(src, sizeof src, "%s", tmp_file("good.mos"));
    ck_assert_int_eq(adapter_save(a, src), MOSFT_OK);
    // Sanity: an unedited copy loads.
    {
        edit e = {0};
        rewrite(src, tmp_file("copy.mos"), &e);
        adapter *b = NULL;
        ck_assert_msg(adapter_load(&b, tmp_file("copy.mos"), NULL) == MOSFT_OK, "%s", mosft_error());
        adapter_free(b);
    }
    // Index tables: P = (2-1)*3*2 = 6 public shards, N = 12; each layer's table is 6 public + 2 private.
    expect_bad(src, &(edit){.poke = "mos.q.index_A", .poke_at = 3, .poke_val = 12}, "mos.q.index_A");
    expect_bad(src, &(edit){.poke = "mos.q.index_A", .poke_at = 3, .poke_val = -1}, "public shard");
    expect_bad(src, &(edit){.poke = "mos.k.index_B", .poke_at = 2, .poke_val = 6}, "public shard");  // a private one
    expect_bad(src, &(edit){.poke = "mos.o.index_B", .poke_at = 8 + 6, .poke_val = 6}, "private shard");  // layer 0's
    {
        const int32_t *tab = adapter_find_buffer(a, "mos.up.index_A")->data;
        expect_bad(src, &(edit){.poke = "mos.up.index_A", .poke_at = 1, .poke_val = tab[0]}, "not repeated");
    }
    // Tensors.
    expect_bad(src, &(edit){.skip = "mos.down.pool_B"}, "mos.down.pool_B: expected this tensor");
    expect_bad(src, &(edit){.skip = "mos.gate.index_A"}, "mos.gate.index_A");
    expect_bad(src, &(edit){.skip = "mos.q.scale"}, "mos.q.scale");
    expect_bad(src, &(edit){.retype = "mos.k.index_A"}, "expected I32");
    expect_bad(src, &(edit){.extra = "mos.v.pool_A"}, "unexpected tensor");
    // Metadata.
    expect_bad(src, &(edit){.meta_key = "format", .meta_val = "pt"}, "format");
    expect_bad(src, &(edit){.meta_key = "format"}, "format");
    expect_bad(src, &(edit){.meta_key = "format_version", .meta_val = "2"}, "newer mosft");
    expect_bad(src, &(edit){.meta_key = "format_version", .meta_val = "one"}, "format_version");
    expect_bad(src, &(edit){.meta_key = "step", .meta_val = "-3"}, "step");
    expect_bad(src, &(edit){.meta_key = "adapter_config", .meta_val = "{not json"}, "adapter_config");
    expect_bad(src, &(edit){.meta_key = "adapter_config"}, "adapter_config");
    expect_bad(src, &(edit){.meta_key = "base_model"}, "base_model");
    expect_bad(src, &(edit){.meta_key = "base_model", .meta_val = "{\"hidden_size\":16}"}, "model_type");
    // A config that the tensors do not fit, or that the method rejects on this model.
    char *cfg = adapter_spec_to_json(&a->spec);
    struct {
        const char *from, *to, *needle;
    } cfgs[] = {{"\"r\":4", "\"r\":3", "mos.q.index_A"},        // tables would be [3][6]
                {"\"r\":4", "\"r\":0", "adapter_config.r"},
                {"\"r\":4", "\"r\":4.5", "adapter_config.r"},
                {"\"shards\":2", "\"shards\":3", "adapter.shards"},  // 3 does not divide 16
                {"\"private_rank\":1", "\"private_rank\":3", "adapter.private_rank"},
                {"\"method\":\"mos\"", "\"method\":\"dora\"", "adapter.method"},
                {"\"alpha\":16", "\"alpha\":-1", "adapter_config.alpha"},
                {"\"seed\":5", "\"sed\":5", "sed"},
                {"\"targets\":[", "\"targets\":[\"qq\",", "targets"},
                {"\"pair_dissociation\":true", "\"pair_dissociation\":false", "pair_dissociation is off"}};
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++) {
        char *p = strstr(cfg, cfgs[i].from);
        ck_assert_msg(p, "%s not in %s", cfgs[i].from, cfg);
        char edited[4096];
        snprintf(edited, sizeof edited, "%.*s%s%s", (int)(p - cfg), cfg, cfgs[i].to, p + strlen(cfgs[i].from));
        expect_bad(src, &(edit){.meta_key = "adapter_config", .meta_val = edited}, cfgs[i].needle);
    }
    free(cfg);
    // The fingerprint's tensor list must match the targets.
    {
        st_file f;
        ck_assert_int_eq(st_open(&f, src), MOSFT_OK);
        char fp[1024];
        snprintf(fp, sizeof fp, "%s", st_meta(&f, "base_model"));
        st_close(&f);
        char *p = strstr(fp, "self_attn.k_proj");
        ck_assert_ptr_nonnull(p);
        memcpy(p, "self_attn.v_proj", 16);
        expect_bad(src, &(edit){.meta_key = "base_model", .meta_val = fp}, "base_model.tensors");
    }
    adapter_free(a);
}
END_TEST

START_TEST(test_truncated_and_garbage) {
    adapter *a = make("mos");
    char src[512];
    snprintf(src, sizeof src, "%s", tmp_file("full.mos"));
    ck_assert_int_eq(adapter_save(a, src), MOSFT_OK);
    char *data = NULL;
    size_t len = 0;
    ck_assert_int_eq(file_read_all(src, &data, &len), MOSFT_OK);
    size_t cuts[] = {0, 4, 8, 100, len / 2, len - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        const char *p = tmp_file("cut.mos");
        ck_assert_int_eq(atomic_write_file(p, data, cuts[i]), MOSFT_OK);
        adapter *b = NULL;
        ck_assert_msg(adapter_load(&b, p, NULL) == MOSFT_ERR_INPUT, "cut at %zu: %s", cuts[i], mosft_error());
        ck_assert_ptr_null(b);
    }
    uint64_t k = rng_key(RNG_INIT, 1, 2, 3, 4);
    for (size_t i = 16; i < len; i++) data[i] = (char)rng_u32(k, i);
    const char *p = tmp_file("garbage.mos");
    ck_assert_int_eq(atomic_write_file(p, data, len), MOSFT_OK);
    adapter *b = NULL;
    ck_assert_int_eq(adapter_load(&b, p, NULL), MOSFT_ERR_INPUT);
    ck_assert_int_eq(adapter_load(&b, tmp_file("missing.mos"), NULL), MOSFT_ERR_INPUT);
    free(data);
    adapter_free(a);
}
END_TEST

START_TEST(test_lora_hand_edited) {
    adapter *a = make("lora");
    char src[512];
    snprintf(src, sizeof src, "%s", tmp_file("lora.mos"));
    ck_assert_int_eq(adapter_save(a, src), MOSFT_OK);
    expect_bad(src, &(edit){.skip = "lora.layers.1.o.A"}, "lora.layers.1.o.A");
    expect_bad(src, &(edit){.extra = "mos.q.pool_A"}, "unexpected tensor");
    expect_bad(src, &(edit){.meta_key = "adapter_config", .meta_val = "{\"method\":\"lora\"}"}, "adapter_config.r");
    adapter_free(a);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("adapter_file");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_roundtrip);
    tcase_add_test(tc, test_tables_not_regenerated);
    tcase_add_test(tc, test_other_model);
    tcase_add_test(tc, test_hand_edited);
    tcase_add_test(tc, test_truncated_and_garbage);
    tcase_add_test(tc, test_lora_hand_edited);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(suite)
