// test_model.c: HF LLaMA configs (stories260K and the published Llama-2-7B/13B and Llama-3.2-3B
// config.json files), parameter counts, llama3 rope scaling against transformers, bad configs, and
// loading real weights (stories260K) for the CPU backend: fp32 and NF4, sharded, pre-quantized
// bnb-4bit, wrong shapes; and `mosft info` on the model folder.
#include <stdint.h>

#include "core/dtype.h"
#include "core/fileio.h"
#include "core/model.h"
#include "core/nf4.h"
#include "core/safetensors.h"
#include "tests/test_util.h"

#define STORIES "models/stories260K/hf"

START_TEST(test_config_stories) {
    REQUIRE_SHARED();
    llama_config c;
    ck_assert_msg(llama_config_load(&c, shared_path(STORIES)) == MOSFT_OK, "%s", mosft_error());
    ck_assert_str_eq(c.model_type, "llama");
    ck_assert_int_eq(c.hidden, 64);
    ck_assert_int_eq(c.intermediate, 172);
    ck_assert_int_eq(c.n_layers, 5);
    ck_assert_int_eq(c.n_heads, 8);
    ck_assert_int_eq(c.n_kv_heads, 4);
    ck_assert_int_eq(c.head_dim, 8);
    ck_assert_int_eq(c.vocab, 512);
    ck_assert_int_eq(c.max_pos, 512);
    ck_assert_double_eq(c.rms_eps, 1e-5);
    ck_assert_double_eq(c.rope_theta, 10000.0);
    ck_assert_int_eq(c.tie_embeddings, 1);
    ck_assert_int_eq(c.rope_llama3, 0);
    ck_assert_int_eq(c.bos_id, 1);
    ck_assert_int_eq(c.eos_id, 2);
    ck_assert_str_eq(c.torch_dtype, "float32");
    // transformers: sum(p.numel() for p in model.parameters()) = 260,032 (tied lm_head counted once).
    ck_assert_int_eq(llama_param_count(&c), 260032);
    ck_assert_int_eq(llama_linear_param_count(&c), 5 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 172));
    int di, dout;
    llama_module_dims(&c, MOD_K, &di, &dout);
    ck_assert(di == 64 && dout == 32);
    llama_module_dims(&c, MOD_DOWN, &di, &dout);
    ck_assert(di == 172 && dout == 64);
    char name[128];
    llama_linear_name(name, sizeof name, 3, MOD_GATE);
    ck_assert_str_eq(name, "model.layers.3.mlp.gate_proj.weight");
}
END_TEST

START_TEST(test_config_published) {
    llama_config c;
    int di, dout;
    // meta-llama/Llama-2-7b-hf
    ck_assert_msg(llama_config_load(&c, "tests/fixtures/configs/llama2-7b") == MOSFT_OK, "%s", mosft_error());
    ck_assert(c.hidden == 4096 && c.intermediate == 11008 && c.n_layers == 32 && c.n_heads == 32 && c.n_kv_heads == 32);
    ck_assert(c.head_dim == 128 && c.vocab == 32000 && c.max_pos == 4096 && !c.tie_embeddings && !c.rope_llama3);
    ck_assert_double_eq(c.rms_eps, 1e-5);
    ck_assert_double_eq(c.rope_theta, 10000.0);  // absent: LlamaConfig's default
    ck_assert(c.bos_id == 1 && c.eos_id == 2);
    ck_assert_str_eq(c.torch_dtype, "float16");
    ck_assert_int_eq(llama_param_count(&c), 6738415616LL);
    llama_module_dims(&c, MOD_UP, &di, &dout);
    ck_assert(di == 4096 && dout == 11008);
    // meta-llama/Llama-2-13b-hf
    ck_assert_msg(llama_config_load(&c, "tests/fixtures/configs/llama2-13b/config.json") == MOSFT_OK, "%s",
                  mosft_error());
    ck_assert(c.hidden == 5120 && c.intermediate == 13824 && c.n_layers == 40 && c.n_heads == 40 && c.n_kv_heads == 40);
    ck_assert(c.head_dim == 128 && c.vocab == 32000 && !c.tie_embeddings);
    ck_assert_double_eq(c.rms_eps, 1e-5);
    ck_assert_int_eq(llama_param_count(&c), 13015864320LL);
    llama_module_dims(&c, MOD_DOWN, &di, &dout);
    ck_assert(di == 13824 && dout == 5120);
    // meta-llama/Llama-3.2-3B: grouped-query attention, llama3 rope scaling, tied embeddings.
    ck_assert_msg(llama_config_load(&c, "tests/fixtures/configs/llama3.2-3b") == MOSFT_OK, "%s", mosft_error());
    ck_assert(c.hidden == 3072 && c.intermediate == 8192 && c.n_layers == 28 && c.n_heads == 24 && c.n_kv_heads == 8);
    ck_assert(c.head_dim == 128 && c.vocab == 128256 && c.max_pos == 131072 && c.tie_embeddings);
    ck_assert_double_eq(c.rope_theta, 500000.0);
    ck_assert_int_eq(c.rope_llama3, 1);
    ck_assert_double_eq(c.rope_factor, 32.0);
    ck_assert_double_eq(c.rope_low_freq_factor, 1.0);
    ck_assert_double_eq(c.rope_high_freq_factor, 4.0);
    ck_assert_int_eq(c.rope_orig_max_pos, 8192);
    ck_assert(c.bos_id == 128000 && c.eos_id == 128001);
    ck_assert_str_eq(c.torch_dtype, "bfloat16");
    ck_assert_int_eq(llama_param_count(&c), 3212749824LL);
    llama_module_dims(&c, MOD_Q, &di, &dout);
    ck_assert(di == 3072 && dout == 3072);
    llama_module_dims(&c, MOD_V, &di, &dout);
    ck_assert(di == 3072 && dout == 1024);
    llama_module_dims(&c, MOD_O, &di, &dout);
    ck_assert(di == 3072 && dout == 3072);
}
END_TEST

START_TEST(test_rope_inv_freq) {
    // Oracle: transformers 5.23 LlamaRotaryEmbedding(LlamaConfig.from_pretrained(<fixture>)).inv_freq
    // (fp32) on this machine's /opt/ref/bin/python; printed with repr(). Indices cover llama3's three
    // regimes: wavelength < 2048 kept (0..28), 2048..8192 interpolated (29..34), > 8192 divided by 32.
    static const struct {
        int i;
        double v;
    } l3[] = {{0, 1.0},
              {1, 0.8146172165870667},
              {10, 0.12868738174438477},
              {25, 0.005940730683505535},
              {28, 0.0032114461064338684},
              {29, 0.002118406817317009},
              {31, 0.000762541254516691},
              {32, 0.000429556705057621},
              {34, 9.708286233944818e-05},
              {35, 2.389053042861633e-05},
              {50, 1.1028836297555245e-06},
              {63, 7.672314694673332e-08}};
    llama_config c;
    double inv[64];
    ck_assert_int_eq(llama_config_load(&c, "tests/fixtures/configs/llama3.2-3b"), MOSFT_OK);
    llama_rope_inv_freq(&c, inv);
    for (size_t k = 0; k < sizeof l3 / sizeof l3[0]; k++)
        ck_assert_msg(rel_diff(inv[l3[k].i], l3[k].v, 1e-30) < 2e-6, "inv_freq[%d] = %.10g, transformers %.10g",
                      l3[k].i, inv[l3[k].i], l3[k].v);
    // Llama-2-7b: plain 10000^(-2i/128).
    static const double l2[4][2] = {{0, 1.0}, {1, 0.8659643530845642}, {32, 0.009999999776482582}, {63, 0.00011547819303814322}};
    ck_assert_int_eq(llama_config_load(&c, "tests/fixtures/configs/llama2-7b"), MOSFT_OK);
    llama_rope_inv_freq(&c, inv);
    for (int k = 0; k < 4; k++) ck_assert(rel_diff(inv[(int)l2[k][0]], l2[k][1], 1e-30) < 2e-6);
}
END_TEST

// Write `text` as dir/config.json and load it; expect an input error naming the file and `key`.
static void expect_bad_config(const char *dir, const char *text, const char *key) {
    char *p = path_join(dir, "config.json");
    ck_assert_int_eq(atomic_write_file(p, text, strlen(text)), MOSFT_OK);
    llama_config c;
    mosft_error_clear();
    int rc = llama_config_load(&c, dir);
    ck_assert_msg(rc == MOSFT_ERR_INPUT, "expected an input error for %s, got %d", text, rc);
    ck_assert_msg(strstr(mosft_error(), key) != NULL, "\"%s\" does not name %s", mosft_error(), key);
    ck_assert_msg(strstr(mosft_error(), p) != NULL, "\"%s\" does not name the file", mosft_error());
    free(p);
}

START_TEST(test_bad_config) {
    char *dir = test_tmpdir();
    const char *base = "\"model_type\": \"llama\", \"intermediate_size\": 172, \"num_hidden_layers\": 5, "
                       "\"num_attention_heads\": 8, \"vocab_size\": 512";
    char buf[1024];
    snprintf(buf, sizeof buf, "{%s}", base);
    expect_bad_config(dir, buf, "hidden_size");
    snprintf(buf, sizeof buf, "{%s, \"hidden_size\": \"64\"}", base);
    expect_bad_config(dir, buf, "hidden_size: expected a positive integer, got \"64\"");
    snprintf(buf, sizeof buf, "{%s, \"hidden_size\": 64.5}", base);
    expect_bad_config(dir, buf, "hidden_size");
    expect_bad_config(dir, "{\"model_type\": \"gpt2\", \"hidden_size\": 64}", "model_type: expected \"llama\", got \"gpt2\"");
    snprintf(buf, sizeof buf, "{%s, \"hidden_size\": 64, \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}}",
             base);
    expect_bad_config(dir, buf, "rope_type");
    snprintf(buf, sizeof buf, "{%s, \"hidden_size\": 64, \"rms_norm_eps\": \"small\"}", base);
    expect_bad_config(dir, buf, "rms_norm_eps");
    expect_bad_config(dir, "[1, 2]", "expected a JSON object");
    // The same fields, complete, load.
    snprintf(buf, sizeof buf, "{%s, \"hidden_size\": 64}", base);
    char *p = path_join(dir, "config.json");
    atomic_write_file(p, buf, strlen(buf));
    llama_config c;
    ck_assert_int_eq(llama_config_load(&c, p), MOSFT_OK);
    ck_assert_int_eq(c.n_kv_heads, 8);  // absent: = num_attention_heads
    ck_assert_int_eq(c.head_dim, 8);
    ck_assert_int_eq(c.sliding_window, 0);
    ck_assert_int_eq(llama_check_seq_len(&c, 8192, "run.json"), MOSFT_OK);  // beyond max_pos: a warning
    // Mistral: its sliding window bounds the sequence length (mosft's attention is full causal)
    const char *mis = "\"model_type\": \"mistral\", \"intermediate_size\": 172, \"num_hidden_layers\": 5, "
                      "\"num_attention_heads\": 8, \"vocab_size\": 512, \"hidden_size\": 64";
    snprintf(buf, sizeof buf, "{%s, \"sliding_window\": \"4k\"}", mis);
    expect_bad_config(dir, buf, "sliding_window");
    snprintf(buf, sizeof buf, "{%s, \"sliding_window\": 256}", mis);
    atomic_write_file(p, buf, strlen(buf));
    ck_assert_int_eq(llama_config_load(&c, p), MOSFT_OK);
    ck_assert_int_eq(c.sliding_window, 256);
    ck_assert_int_eq(llama_check_seq_len(&c, 256, "run.json"), MOSFT_OK);
    ck_assert_int_eq(llama_check_seq_len(&c, 512, "run.json"), MOSFT_ERR_INPUT);
    ck_assert_msg(strstr(mosft_error(), "run.json: data.max_seq_len") && strstr(mosft_error(), "sliding_window (256"),
                  "%s", mosft_error());
    snprintf(buf, sizeof buf, "{%s, \"sliding_window\": null}", mis);  // Mistral v0.2+
    atomic_write_file(p, buf, strlen(buf));
    ck_assert_int_eq(llama_config_load(&c, p), MOSFT_OK);
    ck_assert_int_eq(llama_check_seq_len(&c, 4096, "run.json"), MOSFT_OK);
    free(p);
    rm_rf(dir);
}
END_TEST

// ---- loading weights ---------------------------------------------------------------------------

// The stored fp32 values of `name` in stories260K (caller frees).
static float *stored(const st_file *f, const char *name, int64_t *numel) {
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL, "no %s", name);
    float *v = xmalloc(sizeof(float) * (size_t)t->numel);
    st_tensor_to_f32(t, v);
    if (numel) *numel = t->numel;
    return v;
}

static void expect_values(const float *got, const float *want, int64_t n, int round_bf16, const char *what) {
    for (int64_t i = 0; i < n; i++) {
        float w = round_bf16 ? bf16_round(want[i]) : want[i];
        ck_assert_msg(got[i] == w, "%s[%lld]: %.9g, want %.9g", what, (long long)i, (double)got[i], (double)w);
    }
}

START_TEST(test_load_fp32) {
    REQUIRE_SHARED();
    llama_model m;
    ck_assert_msg(llama_model_load(&m, shared_path(STORIES), "none", 1) == MOSFT_OK, "%s", mosft_error());
    ck_assert_int_eq(m.quantized, 0);
    ck_assert_ptr_eq(m.lm_head, m.embed);  // tied
    // Values printed by transformers (AutoModelForCausalLM, fp32) for the same folder: the names map
    // to the right tensors, lm_head is embed_tokens.
    static const float emb5[4] = {-0.29471948742866516f, 0.5619098544120789f, 0.17536959052085876f, 0.3404855728149414f};
    for (int j = 0; j < 4; j++) ck_assert_float_eq(m.embed[5 * 64 + j], emb5[j]);
    static const float k2[3] = {-0.12328779697418213f, 0.13429009914398193f, 0.3812672793865204f};
    const base_linear *k = &m.layers[2].lin[MOD_K];
    ck_assert(k->d_in == 64 && k->d_out == 32 && !k->quantized && k->w);
    for (int j = 0; j < 3; j++) ck_assert_float_eq(k->w[3 * 64 + j], k2[j]);
    ck_assert_float_eq(m.layers[4].lin[MOD_DOWN].w[63 * 172 + 170], -0.00976563524454832f);
    ck_assert_float_eq(m.final_norm[0], 2.4583089351654053f);
    ck_assert_float_eq(m.final_norm[2], 1.7504382133483887f);
    ck_assert_float_eq(m.layers[1].mlp_norm[7], 0.7667598724365234f);
    // Every tensor equals the file.
    st_file f;
    ck_assert_int_eq(st_open(&f, shared_path(STORIES "/model.safetensors")), MOSFT_OK);
    int64_t n;
    float *v = stored(&f, "model.embed_tokens.weight", &n);
    expect_values(m.embed, v, n, 0, "embed");
    free(v);
    char name[128];
    float *w = xmalloc(sizeof(float) * 64 * 172);
    for (int l = 0; l < 5; l++) {
        for (int mod = 0; mod < MOD_COUNT; mod++) {
            llama_linear_name(name, sizeof name, l, mod);
            v = stored(&f, name, &n);
            base_linear_weight(&m.layers[l].lin[mod], w);
            expect_values(w, v, n, 0, name);
            free(v);
        }
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        v = stored(&f, name, &n);
        expect_values(m.layers[l].attn_norm, v, n, 0, name);
        free(v);
    }
    free(w);
    st_close(&f);
    llama_model_free(&m);
}
END_TEST

START_TEST(test_load_nf4) {
    REQUIRE_SHARED();
    st_file f;
    ck_assert_int_eq(st_open(&f, shared_path(STORIES "/model.safetensors")), MOSFT_OK);
    for (int dq = 0; dq <= 1; dq++) {
        llama_model m;
        ck_assert_msg(llama_model_load(&m, shared_path(STORIES), "nf4", dq) == MOSFT_OK, "%s", mosft_error());
        ck_assert_int_eq(m.quantized, 1);
        ck_assert_ptr_eq(m.lm_head, m.embed);
        // Embeddings and norms: fp32 copies of the bf16-rounded values (transformers, torch_dtype=bf16,
        // printed embed_tokens[5][:4] as these).
        static const float emb5[4] = {-0.294921875f, 0.5625f, 0.17578125f, 0.33984375f};
        for (int j = 0; j < 4; j++) ck_assert_float_eq(m.embed[5 * 64 + j], emb5[j]);
        int64_t n;
        float *v = stored(&f, "model.embed_tokens.weight", &n);
        expect_values(m.embed, v, n, 1, "embed");
        free(v);
        v = stored(&f, "model.norm.weight", &n);
        expect_values(m.final_norm, v, n, 1, "norm");
        free(v);
        // Linears: exactly nf4_quantize of the bf16-rounded stored weight; the dequantized weight is
        // bf16 and within NF4's error of the original.
        char name[128];
        float *w = xmalloc(sizeof(float) * 64 * 172);
        double num = 0, den = 0;
        for (int l = 0; l < 5; l++)
            for (int mod = 0; mod < MOD_COUNT; mod++) {
                const base_linear *lin = &m.layers[l].lin[mod];
                ck_assert(lin->quantized && lin->w == NULL && lin->q.double_quant == dq);
                llama_linear_name(name, sizeof name, l, mod);
                v = stored(&f, name, &n);
                ck_assert_int_eq(n, (int64_t)lin->d_in * lin->d_out);
                for (int64_t i = 0; i < n; i++) v[i] = bf16_round(v[i]);
                nf4_tensor q;
                nf4_quantize(v, lin->d_out, lin->d_in, dq, &q);
                ck_assert_msg(memcmp(q.packed, lin->q.packed, (size_t)(n / 2)) == 0, "%s", name);
                nf4_free(&q);
                base_linear_weight(lin, w);
                for (int64_t i = 0; i < n; i++) {
                    ck_assert(bf16_round(w[i]) == w[i]);
                    num += ((double)w[i] - v[i]) * ((double)w[i] - v[i]);
                    den += (double)v[i] * v[i];
                }
                free(v);
            }
        double err = sqrt(num / den);
        fprintf(stderr, "stories260K NF4 (double_quant %d): relative error of all linears %.4f\n", dq, err);
        ck_assert_msg(err > 0.05 && err < 0.15, "relative error %.4f", err);
        free(w);
        llama_model_free(&m);
    }
    st_close(&f);
}
END_TEST

// Two models hold the same values (and the same NF4 bytes).
static void expect_same_model(const llama_model *a, const llama_model *b) {
    const llama_config *c = &a->cfg;
    ck_assert_int_eq(memcmp(a->embed, b->embed, sizeof(float) * (size_t)c->vocab * c->hidden), 0);
    ck_assert_int_eq(memcmp(a->lm_head, b->lm_head, sizeof(float) * (size_t)c->vocab * c->hidden), 0);
    ck_assert_int_eq(memcmp(a->final_norm, b->final_norm, sizeof(float) * (size_t)c->hidden), 0);
    for (int l = 0; l < c->n_layers; l++) {
        ck_assert_int_eq(memcmp(a->layers[l].attn_norm, b->layers[l].attn_norm, sizeof(float) * (size_t)c->hidden), 0);
        ck_assert_int_eq(memcmp(a->layers[l].mlp_norm, b->layers[l].mlp_norm, sizeof(float) * (size_t)c->hidden), 0);
        for (int mod = 0; mod < MOD_COUNT; mod++) {
            const base_linear *x = &a->layers[l].lin[mod], *y = &b->layers[l].lin[mod];
            ck_assert_int_eq(x->quantized, y->quantized);
            size_t n = (size_t)x->d_in * x->d_out;
            if (!x->quantized) {
                ck_assert_int_eq(memcmp(x->w, y->w, sizeof(float) * n), 0);
                continue;
            }
            ck_assert_int_eq(x->q.double_quant, y->q.double_quant);
            ck_assert_int_eq(memcmp(x->q.packed, y->q.packed, n / 2), 0);
            float *u = xmalloc(sizeof(float) * n), *w = xmalloc(sizeof(float) * n);
            base_linear_weight(x, u);
            base_linear_weight(y, w);
            ck_assert_int_eq(memcmp(u, w, sizeof(float) * n), 0);
            free(u);
            free(w);
        }
    }
}

static void copy_file(const char *from, const char *to) {
    char *text = NULL;
    size_t len = 0;
    ck_assert_int_eq(file_read_all(from, &text, &len), MOSFT_OK);
    ck_assert_int_eq(atomic_write_file(to, text, len), MOSFT_OK);
    free(text);
}

START_TEST(test_load_sharded) {
    REQUIRE_SHARED();
    // Split stories260K into two shards with an index, as HF's save_pretrained(max_shard_size=...) does.
    char *dir = test_tmpdir();
    st_file f;
    ck_assert_int_eq(st_open(&f, shared_path(STORIES "/model.safetensors")), MOSFT_OK);
    const char *shard[2] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
    st_writer *w[2] = {st_writer_new(), st_writer_new()};
    mosft_buf idx = {0};
    buf_printf(&idx, "{\"metadata\": {\"total_size\": 1040128}, \"weight_map\": {");
    for (int i = 0; i < f.n_tensors; i++) {
        const st_tensor *t = &f.tensors[i];
        int k = i < f.n_tensors / 2 ? 0 : 1;
        st_writer_add(w[k], t->name, t->dtype, t->ndim, t->shape, t->data);
        buf_printf(&idx, "%s\"%s\": \"%s\"", i ? ", " : "", t->name, shard[k]);
    }
    buf_printf(&idx, "}}");
    for (int k = 0; k < 2; k++) {
        char *p = path_join(dir, shard[k]);
        ck_assert_int_eq(st_writer_write(w[k], p), MOSFT_OK);
        st_writer_free(w[k]);
        free(p);
    }
    char *p = path_join(dir, "model.safetensors.index.json");
    ck_assert_int_eq(atomic_write_file(p, idx.data, idx.len), MOSFT_OK);
    free(p);
    buf_free(&idx);
    p = path_join(dir, "config.json");
    copy_file(shared_path(STORIES "/config.json"), p);
    free(p);
    st_close(&f);

    for (int nf4 = 0; nf4 <= 1; nf4++) {
        llama_model a, b;
        const char *qz = nf4 ? "nf4" : "none";
        ck_assert_msg(llama_model_load(&a, shared_path(STORIES), qz, 1) == MOSFT_OK, "%s", mosft_error());
        ck_assert_msg(llama_model_load(&b, dir, qz, 1) == MOSFT_OK, "%s", mosft_error());
        expect_same_model(&a, &b);
        llama_model_free(&a);
        llama_model_free(&b);
    }
    rm_rf(dir);
}
END_TEST

START_TEST(test_load_prequantized) {
    REQUIRE_SHARED();
    // A bnb-4bit checkpoint of stories260K as transformers saves one (linears in bnb's layout with
    // double quantization, everything else bf16) loads to the same base as quantizing here.
    char *dir = test_tmpdir();
    st_file f;
    ck_assert_int_eq(st_open(&f, shared_path(STORIES "/model.safetensors")), MOSFT_OK);
    st_writer *w = st_writer_new();
    nf4_tensor q[5 * MOD_COUNT];
    char json[5 * MOD_COUNT][512];
    uint16_t *bf[64];
    int n_bf = 0, n_q = 0;
    for (int i = 0; i < f.n_tensors; i++) {
        const st_tensor *t = &f.tensors[i];
        float *v = xmalloc(sizeof(float) * (size_t)t->numel);
        st_tensor_to_f32(t, v);
        for (int64_t j = 0; j < t->numel; j++) v[j] = bf16_round(v[j]);
        if (strstr(t->name, "_proj.weight")) {
            nf4_quantize(v, t->shape[0], t->shape[1], 1, &q[n_q]);
            nf4_write_bnb(w, t->name, &q[n_q], json[n_q], sizeof json[n_q]);
            n_q++;
        } else {
            bf[n_bf] = xmalloc(2 * (size_t)t->numel);
            for (int64_t j = 0; j < t->numel; j++) bf[n_bf][j] = f32_to_bf16(v[j]);
            st_writer_add(w, t->name, MOSFT_BF16, t->ndim, t->shape, bf[n_bf]);
            n_bf++;
        }
        free(v);
    }
    ck_assert_int_eq(n_q, 35);
    char *p = path_join(dir, "model.safetensors");
    ck_assert_int_eq(st_writer_write(w, p), MOSFT_OK);
    st_writer_free(w);
    free(p);
    for (int i = 0; i < n_q; i++) nf4_free(&q[i]);
    for (int i = 0; i < n_bf; i++) free(bf[i]);
    st_close(&f);
    p = path_join(dir, "config.json");
    copy_file(shared_path(STORIES "/config.json"), p);
    free(p);

    llama_model a, b;
    ck_assert_msg(llama_model_load(&a, shared_path(STORIES), "nf4", 1) == MOSFT_OK, "%s", mosft_error());
    // double_quant 0 asked: the stored (double-quantized) weights are taken as they are.
    ck_assert_msg(llama_model_load(&b, dir, "nf4", 0) == MOSFT_OK, "%s", mosft_error());
    expect_same_model(&a, &b);
    llama_model_free(&b);
    // "none" of a 4-bit checkpoint: the linears are their bf16 dequantization.
    ck_assert_msg(llama_model_load(&b, dir, "none", 1) == MOSFT_OK, "%s", mosft_error());
    float *u = xmalloc(sizeof(float) * 64 * 172);
    base_linear_weight(&a.layers[3].lin[MOD_UP], u);
    ck_assert(!b.layers[3].lin[MOD_UP].quantized);
    ck_assert_int_eq(memcmp(u, b.layers[3].lin[MOD_UP].w, sizeof(float) * 64 * 172), 0);
    free(u);
    llama_model_free(&b);
    llama_model_free(&a);
    // `mosft info` sees a pre-quantized checkpoint.
    char cmd[512], *out = NULL;
    snprintf(cmd, sizeof cmd, "./build/mosft info %s", dir);
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    ck_assert_msg(strstr(out, "pre-quantized bnb-4bit") != NULL, "%s", out);
    free(out);
    rm_rf(dir);
}
END_TEST

// Load dir in "none" mode and expect an input error whose message holds every string of `want`.
static void expect_load_error(const char *dir, const char *qz, const char *want1, const char *want2) {
    llama_model m;
    mosft_error_clear();
    int rc = llama_model_load(&m, dir, qz, 1);
    ck_assert_msg(rc == MOSFT_ERR_INPUT, "expected an input error, got %d (%s)", rc, mosft_error());
    ck_assert_msg(strstr(mosft_error(), want1) != NULL, "\"%s\" lacks \"%s\"", mosft_error(), want1);
    if (want2) ck_assert_msg(strstr(mosft_error(), want2) != NULL, "\"%s\" lacks \"%s\"", mosft_error(), want2);
    ck_assert_ptr_null(m.embed);
}

START_TEST(test_load_errors) {
    REQUIRE_SHARED();
    char *dir = test_tmpdir();
    char *cfg = path_join(dir, "config.json"), *wts = path_join(dir, "model.safetensors");
    char *text = NULL;
    ck_assert_int_eq(file_read_all(shared_path(STORIES "/config.json"), &text, NULL), MOSFT_OK);
    char *abs_wts = realpath(shared_path(STORIES "/model.safetensors"), NULL);
    ck_assert_int_eq(symlink(abs_wts, wts), 0);
    // A config whose intermediate_size disagrees with the weights.
    char *bad = xstrdup(text);
    memcpy(strstr(bad, "\"intermediate_size\": 172"), "\"intermediate_size\": 170", 24);
    atomic_write_file(cfg, bad, strlen(bad));
    expect_load_error(dir, "none", "model.layers.0.mlp.gate_proj.weight: expected shape [170, 64] (from config.json), got [172, 64]",
                      "model.safetensors");
    expect_load_error(dir, "nf4", "gate_proj.weight: expected shape [170, 64]", NULL);
    free(bad);
    // Fewer layers in the config than in the checkpoint.
    bad = xstrdup(text);
    memcpy(strstr(bad, "\"num_hidden_layers\": 5"), "\"num_hidden_layers\": 4", 22);
    atomic_write_file(cfg, bad, strlen(bad));
    expect_load_error(dir, "none", "model.layers.4.input_layernorm.weight: expected 4 layers", NULL);
    free(bad);
    // Untied embeddings in the config, but no lm_head stored.
    bad = xstrdup(text);
    memcpy(strstr(bad, "\"tie_word_embeddings\": true"), "\"tie_word_embeddings\":false", 27);
    atomic_write_file(cfg, bad, strlen(bad));
    expect_load_error(dir, "none", "lm_head.weight: expected a tensor of shape [512, 64] (from config.json), got nothing",
                      NULL);
    free(bad);
    // An unknown quantization.
    atomic_write_file(cfg, text, strlen(text));
    expect_load_error(dir, "int8", "model.quantization: expected \"nf4\" or \"none\", got \"int8\"", NULL);
    // The right config loads.
    llama_model m;
    ck_assert_msg(llama_model_load(&m, dir, "none", 1) == MOSFT_OK, "%s", mosft_error());
    llama_model_free(&m);
    free(text);
    free(abs_wts);
    free(cfg);
    free(wts);
    rm_rf(dir);
}
END_TEST

START_TEST(test_info) {
    REQUIRE_SHARED();
    char cmd[512], *out = NULL;
    snprintf(cmd, sizeof cmd, "./build/mosft info %s", shared_path(STORIES));
    ck_assert_int_eq(run_capture(cmd, &out), 0);
    static const char *want[] = {
        "architecture     llama: 5 layers, hidden 64, intermediate 172\n",
        "attention        8 heads, 4 kv heads (grouped-query), head_dim 8\n",
        "vocabulary       512\n",
        "rms_norm_eps     1e-05\n",
        "rope             theta 10000\n",
        "embeddings       tied (lm_head = embed_tokens)\n",
        // 260,032 (transformers' count); 5 layers x (2*64*64 + 2*64*32 + 3*64*172) in the linears
        "parameters       260,032 (226,560 in the 7 linear types)\n",
        // 2 bytes x 260,032 = 520,064 B
        "size as bf16     507.9 KiB\n",
        // 1,044,992 bytes: the file's size
        "weights          1 file, 47 tensors, 1020.5 KiB on disk\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        ck_assert_msg(strstr(out, want[i]) != NULL, "mosft info output lacks \"%s\":\n%s", want[i], out);
    ck_assert_msg(strstr(out, "warning") == NULL, "%s", out);
    free(out);
    // The published Llama-3.2-3B config (no weights).
    ck_assert_int_eq(run_capture("./build/mosft info tests/fixtures/configs/llama3.2-3b", &out), 0);
    ck_assert_msg(strstr(out, "parameters       3,212,749,824") && strstr(out, "llama3 scaling (factor 32, low 1, high 4, original 8192)") &&
                      strstr(out, "weights          none found (config only)"),
                  "%s", out);
    free(out);
    // A folder without config.json: exit 2 with the file named.
    ck_assert_int_eq(run_capture("./build/mosft info tests/fixtures/configs", &out), 2);
    ck_assert_msg(strstr(out, "error: ") && strstr(out, "tests/fixtures/configs/config.json"), "%s", out);
    free(out);
}
END_TEST

static Suite *model_suite(void) {
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_config_stories);
    tcase_add_test(tc, test_config_published);
    tcase_add_test(tc, test_rope_inv_freq);
    tcase_add_test(tc, test_bad_config);
    tcase_add_test(tc, test_load_fp32);
    tcase_add_test(tc, test_load_nf4);
    tcase_add_test(tc, test_load_sharded);
    tcase_add_test(tc, test_load_prequantized);
    tcase_add_test(tc, test_load_errors);
    tcase_add_test(tc, test_info);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(model_suite)
