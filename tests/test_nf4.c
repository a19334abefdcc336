// test_nf4.c: NF4 quantization against bitsandbytes: the code table and the dynamic map, hand-computed
// blocks, the four oracle files made by bitsandbytes 0.50 (byte for byte, with and without double
// quantization, dequantization equal to bnb's bf16 output), the HF bnb-4bit layout round trip, and a
// 4096 x 4096 random matrix (error band, determinism).
#include <stdint.h>

#include "core/dtype.h"
#include "core/fileio.h"
#include "core/nf4.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "tests/test_util.h"

static const char *k_cases[4] = {"small_64x64", "rect_256x1024", "tall_1000x320", "outliers_128x512"};

static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

START_TEST(test_code_table) {
    // The table of shared/docs/NF4.md, as decimal literals (independent of nf4.c's copy).
    static const double doc[16] = {-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                                   -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                                   0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                                   0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};
    for (int i = 0; i < 16; i++) ck_assert_uint_eq(fbits(k_nf4_code[i]), fbits((float)doc[i]));
    for (int i = 0; i < 15; i++) ck_assert(k_nf4_code[i] < k_nf4_code[i + 1]);
    // The dynamic map: hand-derivable entries. Sorted, 127 negatives, 0 at 127, 1 at 255 (appended:
    // there is no -1, the map is asymmetric); the largest magnitude below 1 is the last midpoint of
    // linspace(0.1, 1, 65), 1 - 0.9/64/2, the next one 1 - 3 * 0.9/64/2.
    float map[256];
    nf4_dynamic_map(map);
    ck_assert_float_eq(map[127], 0.0f);
    ck_assert_float_eq(map[255], 1.0f);
    ck_assert_float_eq_tol(map[254], 0.99296875f, 1e-6f);
    ck_assert_float_eq_tol(map[0], -0.99296875f, 1e-6f);
    ck_assert_float_eq_tol(map[1], -0.97890625f, 1e-6f);
    ck_assert_float_eq_tol(map[128], 0.55e-6f, 1e-12f);  // smallest positive: 1e-6 * (0.1 + 1) / 2
    for (int i = 0; i < 255; i++) ck_assert(map[i] < map[i + 1]);
    // 8-bit codes: each map value is its own code; between two neighbours the nearer one; exactly on
    // the fp32 midpoint, the even index (bnb's search with steps 64..1 from 127 ends on even pivots);
    // beyond the ends, the ends.
    for (int i = 0; i < 256; i++) ck_assert_uint_eq(nf4_dynamic_code(map, map[i]), i);
    for (int i = 0; i < 255; i++) {
        float mid = (map[i] + map[i + 1]) * 0.5f;
        ck_assert_msg(nf4_dynamic_code(map, mid) == (i % 2 ? i + 1 : i), "midpoint of %d and %d", i, i + 1);
        ck_assert_uint_eq(nf4_dynamic_code(map, nextafterf(mid, -2.0f)), i);
        ck_assert_uint_eq(nf4_dynamic_code(map, nextafterf(mid, 2.0f)), i + 1);
    }
    ck_assert_uint_eq(nf4_dynamic_code(map, -1.0f), 0);
    ck_assert_uint_eq(nf4_dynamic_code(map, 1.5f), 255);
    ck_assert_uint_eq(nf4_dynamic_code(map, NAN), 0);
}
END_TEST

// One row of `n` values, quantized without double quantization.
static void quant_row(const float *x, int n, nf4_tensor *t) { nf4_quantize(x, 1, n, 0, t); }

static int code_at(const nf4_tensor *t, int64_t i) { return (i & 1) ? t->packed[i >> 1] & 15 : t->packed[i >> 1] >> 4; }

START_TEST(test_hand_blocks) {
    // absmax 2 (a power of two, so x * (1/absmax) is exact): x = 2 * v where v is known.
    float x[64];
    int want[64];
    for (int i = 0; i < 64; i++) {
        x[i] = 0;
        want[i] = 7;  // 0 -> code 7 (0.0)
    }
    x[0] = -2.0f, want[0] = 0;  // the absmax element, negative: -1 -> code 0
    for (int c = 0; c < 16; c++) {  // every code value itself maps to its own index
        x[1 + c] = 2.0f * k_nf4_code[c];
        want[1 + c] = c;
    }
    // Exactly on the midpoint between codes 8 and 9 (fp32 midpoint): ties go to the lower code.
    float mid89 = (k_nf4_code[8] + k_nf4_code[9]) * 0.5f;
    x[20] = 2.0f * mid89, want[20] = 8;
    x[21] = 2.0f * nextafterf(mid89, 1.0f), want[21] = 9;
    float mid01 = (k_nf4_code[0] + k_nf4_code[1]) * 0.5f;
    x[22] = 2.0f * mid01, want[22] = 0;
    x[23] = 2.0f * nextafterf(mid01, 0.0f), want[23] = 1;
    float mid67 = (k_nf4_code[6] + k_nf4_code[7]) * 0.5f;  // -0.0455...
    x[24] = 2.0f * mid67, want[24] = 6;
    x[25] = 2.0f * nextafterf(mid67, 0.0f), want[25] = 7;
    x[26] = 2.0f * 0.039790149f, want[26] = 7;   // just below the 7|8 midpoint 0.0397901498...
    x[27] = 2.0f * 0.0398f, want[27] = 8;
    x[28] = 2.0f * 0.9f, want[28] = 15;          // above 0.8614784
    x[29] = 2.0f * 0.86f, want[29] = 14;
    x[30] = 2.0f * -0.5f, want[30] = 2;          // between -0.6106 and -0.4600
    x[31] = 2.0f * 0.3f, want[31] = 11;          // between 0.2920 and 0.3893
    nf4_tensor t;
    quant_row(x, 64, &t);
    ck_assert_int_eq(t.n_blocks, 1);
    ck_assert_float_eq(t.absmax[0], 2.0f);
    for (int i = 0; i < 64; i++) ck_assert_msg(code_at(&t, i) == want[i], "element %d: code %d, want %d", i, code_at(&t, i), want[i]);
    // Nibble order: the even element in the high nibble.
    ck_assert_uint_eq(t.packed[0], (0u << 4) | 0u);
    ck_assert_uint_eq(t.packed[1], (1u << 4) | 2u);
    // Dequantization: code value times absmax.
    float back[64];
    nf4_dequantize(&t, back);
    for (int i = 0; i < 64; i++) ck_assert_float_eq(back[i], k_nf4_code[want[i]] * 2.0f);
    nf4_free(&t);

    // Odd element count: a 1-element last block and a half-filled last byte (padding quantizes 0 -> 7).
    float y[65];
    for (int i = 0; i < 64; i++) y[i] = (i % 2) ? 1.0f : -1.0f;
    y[64] = 0.5f;
    quant_row(y, 65, &t);
    ck_assert_int_eq(t.n_blocks, 2);
    ck_assert_float_eq(t.absmax[1], 0.5f);
    ck_assert_uint_eq(t.packed[0], 0x0f);
    ck_assert_uint_eq(t.packed[32], 0xf7);
    nf4_free(&t);

    // An all-zero block: absmax 0, 0 * (1/0) is NaN, which bnb's tree sends to code 0; dequant is 0.
    float z[64] = {0};
    quant_row(z, 64, &t);
    ck_assert_float_eq(t.absmax[0], 0.0f);
    ck_assert_uint_eq(t.packed[0], 0x00);
    nf4_dequantize(&t, back);
    ck_assert_float_eq(back[0], 0.0f);
    nf4_free(&t);

    // Double quantization by hand: block scales 1 and 3 -> offset 2, centred -1 and +1, nested absmax
    // 1, dynamic codes 0 (the map's most negative value, -0.99296875) and 255 (1.0); dequantized scales
    // 2 - 0.99296875 and exactly 3.
    float w[128];
    for (int i = 0; i < 128; i++) w[i] = i < 64 ? (i == 5 ? 1.0f : 0.25f) : (i == 70 ? -3.0f : 0.5f);
    nf4_quantize(w, 2, 64, 1, &t);
    ck_assert_float_eq(t.offset, 2.0f);
    ck_assert_float_eq(t.nested_absmax[0], 1.0f);
    ck_assert_uint_eq(t.absmax_q[0], 0);
    ck_assert_uint_eq(t.absmax_q[1], 255);
    float am[2];
    nf4_block_absmax(&t, am);
    ck_assert_float_eq_tol(am[0], 1.00703125f, 1e-6f);
    ck_assert_float_eq(am[1], 3.0f);
    ck_assert_uint_eq(nf4_bytes(&t), (size_t)nf4_storage_bytes(128, 1));
    nf4_free(&t);
    // One block only: nested absmax 0 -> NaN -> code 0; the scale dequantizes to the offset itself.
    nf4_quantize(x, 1, 64, 1, &t);
    ck_assert_float_eq(t.offset, 2.0f);
    ck_assert_float_eq(t.nested_absmax[0], 0.0f);
    nf4_block_absmax(&t, am);
    ck_assert_float_eq(am[0], 2.0f);
    nf4_free(&t);
}
END_TEST

// Raw bytes of a tensor from an oracle file (checked dtype and element count).
static const void *oracle(const st_file *f, const char *name, mosft_dtype dt, int64_t numel) {
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL, "%s: no tensor %s", f->path, name);
    ck_assert_int_eq(t->dtype, dt);
    ck_assert_int_eq(t->numel, numel);
    return t->data;
}

// The dequantized values rounded to bf16 must equal bnb's bf16 output bit for bit.
static void check_dequant(const nf4_tensor *t, const uint16_t *want, const char *what) {
    float *d = xmalloc(sizeof(float) * (size_t)t->numel);
    nf4_dequantize(t, d);
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < t->numel; i++) {
        uint16_t w;
        memcpy(&w, want + i, 2);
        if (f32_to_bf16(d[i]) != w) {
            if (first < 0) first = i;
            bad++;
        }
    }
    ck_assert_msg(bad == 0, "%s: %lld dequantized values differ from bnb (first at %lld)", what, (long long)bad,
                  (long long)first);
    // Row-range dequantization gives the same values.
    int64_t r0 = t->rows / 3, nr = t->rows - r0 > 5 ? 5 : t->rows - r0;
    float *part = xmalloc(sizeof(float) * (size_t)(nr * t->cols));
    nf4_dequantize_rows(t, r0, nr, part);
    ck_assert_int_eq(memcmp(part, d + r0 * t->cols, sizeof(float) * (size_t)(nr * t->cols)), 0);
    free(part);
    free(d);
}

START_TEST(test_oracles) {
    REQUIRE_SHARED();
    for (int c = 0; c < 4; c++) {
        char rel[128];
        snprintf(rel, sizeof rel, "nf4/%s.safetensors", k_cases[c]);
        st_file f;
        ck_assert_msg(st_open(&f, shared_path(rel)) == MOSFT_OK, "%s", mosft_error());
        const st_tensor *in = st_find(&f, "input_f32");
        ck_assert_ptr_nonnull(in);
        int64_t rows = in->shape[0], cols = in->shape[1], n = rows * cols, nb = (n + 63) / 64, nn = (nb + 255) / 256;
        float *x = xmalloc(sizeof(float) * (size_t)n);
        st_tensor_to_f32(in, x);
        // The input is a bf16 matrix: its fp32 copy holds bf16 values exactly.
        for (int64_t i = 0; i < n; i++) ck_assert(bf16_round(x[i]) == x[i]);

        // Tables.
        float map[256];
        nf4_dynamic_map(map);
        ck_assert_int_eq(memcmp(map, oracle(&f, "nested_code", MOSFT_F32, 256), sizeof map), 0);
        ck_assert_int_eq(memcmp(k_nf4_code, oracle(&f, "nf4_code", MOSFT_F32, 16), sizeof(float) * 16), 0);

        // With double quantization.
        nf4_tensor t;
        nf4_quantize(x, rows, cols, 1, &t);
        ck_assert_int_eq(t.n_blocks, nb);
        ck_assert_msg(memcmp(t.packed, oracle(&f, "packed", MOSFT_U8, n / 2), (size_t)(n / 2)) == 0, "%s: packed",
                      k_cases[c]);
        ck_assert_msg(memcmp(t.absmax_q, oracle(&f, "absmax_codes", MOSFT_U8, nb), (size_t)nb) == 0,
                      "%s: absmax codes", k_cases[c]);
        ck_assert_msg(memcmp(t.nested_absmax, oracle(&f, "nested_absmax", MOSFT_F32, nn), sizeof(float) * (size_t)nn) == 0,
                      "%s: nested absmax", k_cases[c]);
        float off = strtof(st_meta(&f, "offset"), NULL);
        ck_assert_msg(fbits(t.offset) == fbits(off), "%s: offset %.9g, bnb %.9g", k_cases[c], (double)t.offset,
                      (double)off);
        check_dequant(&t, oracle(&f, "dequant", MOSFT_BF16, n), k_cases[c]);
        nf4_free(&t);

        // Without.
        nf4_quantize(x, rows, cols, 0, &t);
        ck_assert_msg(memcmp(t.packed, oracle(&f, "packed_nodq", MOSFT_U8, n / 2), (size_t)(n / 2)) == 0,
                      "%s: packed_nodq", k_cases[c]);
        ck_assert_msg(memcmp(t.absmax, oracle(&f, "absmax_nodq", MOSFT_F32, nb), sizeof(float) * (size_t)nb) == 0,
                      "%s: absmax_nodq", k_cases[c]);
        check_dequant(&t, oracle(&f, "dequant_nodq", MOSFT_BF16, n), k_cases[c]);
        ck_assert_uint_eq(nf4_bytes(&t), (size_t)nf4_storage_bytes(n, 0));
        nf4_free(&t);
        free(x);
        st_close(&f);
    }
}
END_TEST

static void expect_same(const nf4_tensor *a, const nf4_tensor *b) {
    ck_assert_int_eq(a->rows, b->rows);
    ck_assert_int_eq(a->cols, b->cols);
    ck_assert_int_eq(a->numel, b->numel);
    ck_assert_int_eq(a->n_blocks, b->n_blocks);
    ck_assert_int_eq(a->double_quant, b->double_quant);
    ck_assert_int_eq(memcmp(a->packed, b->packed, (size_t)((a->numel + 1) / 2)), 0);
    if (a->double_quant) {
        ck_assert_int_eq(memcmp(a->absmax_q, b->absmax_q, (size_t)a->n_blocks), 0);
        ck_assert_int_eq(memcmp(a->nested_absmax, b->nested_absmax, sizeof(float) * (size_t)((a->n_blocks + 255) / 256)), 0);
        ck_assert_uint_eq(fbits(a->offset), fbits(b->offset));
        ck_assert_int_eq(memcmp(a->nested_code, b->nested_code, sizeof a->nested_code), 0);
    } else {
        ck_assert_int_eq(memcmp(a->absmax, b->absmax, sizeof(float) * (size_t)a->n_blocks), 0);
    }
}

static void fill_random(float *w, int64_t n, uint64_t seed, float std) {
    uint64_t key = rng_key(99, seed, 0, 0, 0);
    for (int64_t i = 0; i < n; i++) w[i] = bf16_round(std * rng_normal(key, (uint64_t)i));
}

// Read `name` from a one-file set and return the error code; *msg gets the message.
static int read_back(const char *path, const char *name, nf4_tensor *t, int *found) {
    st_set s;
    ck_assert_int_eq(st_set_open(&s, path), MOSFT_OK);
    mosft_error_clear();
    int rc = nf4_read_bnb(&s, name, t, found);
    st_set_close(&s);
    return rc;
}

START_TEST(test_bnb_round_trip) {
    char *dir = test_tmpdir();
    char *path = path_join(dir, "q.safetensors");
    // 3 x 4100: 193 blocks (a partial last one); the double-quantized weight has a partial nested block.
    int64_t rows = 3, cols = 4100;
    float *w = xmalloc(sizeof(float) * (size_t)(rows * cols));
    fill_random(w, rows * cols, 1, 0.02f);
    nf4_tensor dq, nodq;
    nf4_quantize(w, rows, cols, 1, &dq);
    nf4_quantize(w, rows, cols, 0, &nodq);
    st_writer *wr = st_writer_new();
    char js1[512], js2[512];
    nf4_write_bnb(wr, "model.layers.0.mlp.up_proj.weight", &dq, js1, sizeof js1);
    nf4_write_bnb(wr, "model.layers.0.mlp.down_proj.weight", &nodq, js2, sizeof js2);
    ck_assert_int_eq(st_writer_write(wr, path), MOSFT_OK);
    st_writer_free(wr);

    // The file holds exactly the tensors of transformers' layout, with their dtypes and shapes.
    st_file f;
    ck_assert_int_eq(st_open(&f, path), MOSFT_OK);
    ck_assert_int_eq(f.n_tensors, 6 + 4);
    const st_tensor *t = st_find(&f, "model.layers.0.mlp.up_proj.weight");
    ck_assert(t && t->dtype == MOSFT_U8 && t->ndim == 2 && t->shape[0] == 6150 && t->shape[1] == 1);
    t = st_find(&f, "model.layers.0.mlp.up_proj.weight.absmax");
    ck_assert(t && t->dtype == MOSFT_U8 && t->numel == 193);
    t = st_find(&f, "model.layers.0.mlp.down_proj.weight.absmax");
    ck_assert(t && t->dtype == MOSFT_F32 && t->numel == 193);
    t = st_find(&f, "model.layers.0.mlp.up_proj.weight.nested_absmax");
    ck_assert(t && t->dtype == MOSFT_F32 && t->numel == 1);
    t = st_find(&f, "model.layers.0.mlp.up_proj.weight.nested_quant_map");
    ck_assert(t && t->dtype == MOSFT_F32 && t->numel == 256);
    t = st_find(&f, "model.layers.0.mlp.up_proj.weight.quant_map");
    ck_assert(t && t->dtype == MOSFT_F32 && t->numel == 16);
    ck_assert_ptr_null(st_find(&f, "model.layers.0.mlp.down_proj.weight.nested_absmax"));
    // The quant_state JSON as json.dumps writes it; the offset reads back to the same fp32 value.
    t = st_find(&f, "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4");
    ck_assert(t && t->dtype == MOSFT_U8);
    char *js = xmalloc(t->nbytes + 1);
    memcpy(js, t->data, t->nbytes);
    js[t->nbytes] = 0;
    const char *prefix = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 4100], "
                         "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ";
    ck_assert_msg(strncmp(js, prefix, strlen(prefix)) == 0 && js[t->nbytes - 1] == '}', "%s", js);
    const char *o = strstr(js, "\"nested_offset\": ") + 17;
    ck_assert_uint_eq(fbits((float)strtod(o, NULL)), fbits(dq.offset));
    free(js);
    t = st_find(&f, "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4");
    ck_assert_int_eq(memcmp(t->data, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 4100]}", t->nbytes), 0);
    st_close(&f);

    nf4_tensor back;
    int found = -1;
    ck_assert_int_eq(read_back(path, "model.layers.0.mlp.up_proj.weight", &back, &found), MOSFT_OK);
    ck_assert_int_eq(found, 1);
    expect_same(&dq, &back);
    nf4_free(&back);
    ck_assert_int_eq(read_back(path, "model.layers.0.mlp.down_proj.weight", &back, &found), MOSFT_OK);
    ck_assert_int_eq(found, 1);
    expect_same(&nodq, &back);
    nf4_free(&back);
    // A weight that is not there: not found, no error.
    ck_assert_int_eq(read_back(path, "model.layers.1.mlp.up_proj.weight", &back, &found), MOSFT_OK);
    ck_assert_int_eq(found, 0);

    // Broken files: each one a clear input error naming the file and the tensor.
    struct {
        const char *json;   // quant_state text
        int64_t absmax_n;   // elements of .absmax
        int drop_nested;    // leave out .nested_absmax
        const char *want;   // part of the message
    } bad[] = {
        {"{\"quant_type\": \"fp8\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 4100]}", 193, 0,
         "quant_type: expected \"nf4\", got fp8"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 128, \"dtype\": \"bfloat16\", \"shape\": [3, 4100]}", 193, 0,
         "blocksize: expected 64"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3]}", 193, 0, "shape: expected"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64", 193, 0, "expected the bytes of a JSON object"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 4100], \"nested_blocksize\": 256, "
         "\"nested_dtype\": \"float32\", \"nested_offset\": 0.01}",
         192, 0, ".absmax: expected U8 with 193 elements, got U8 [192]"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 4100], \"nested_blocksize\": 256, "
         "\"nested_dtype\": \"float32\", \"nested_offset\": 0.01}",
         193, 1, ".nested_absmax: expected this tensor"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [4, 4100], \"nested_blocksize\": 256, "
         "\"nested_dtype\": \"float32\", \"nested_offset\": 0.01}",
         193, 0, ": w: expected U8 with 8200 elements, got U8 [6150, 1]"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        char *p = path_join(dir, "bad.safetensors");
        st_writer *b = st_writer_new();
        int64_t sp[2] = {6150, 1}, sa = bad[k].absmax_n, s1 = 1, s16 = 16, s256 = 256, sj = (int64_t)strlen(bad[k].json);
        st_writer_add(b, "w", MOSFT_U8, 2, sp, dq.packed);
        st_writer_add(b, "w.absmax", MOSFT_U8, 1, &sa, dq.absmax_q);
        st_writer_add(b, "w.quant_map", MOSFT_F32, 1, &s16, k_nf4_code);
        if (!bad[k].drop_nested) st_writer_add(b, "w.nested_absmax", MOSFT_F32, 1, &s1, dq.nested_absmax);
        st_writer_add(b, "w.nested_quant_map", MOSFT_F32, 1, &s256, dq.nested_code);
        st_writer_add(b, "w.quant_state.bitsandbytes__nf4", MOSFT_U8, 1, &sj, bad[k].json);
        ck_assert_int_eq(st_writer_write(b, p), MOSFT_OK);
        st_writer_free(b);
        int rc = read_back(p, "w", &back, &found);
        ck_assert_msg(rc == MOSFT_ERR_INPUT, "case %zu: rc %d", k, rc);
        ck_assert_msg(strstr(mosft_error(), bad[k].want) != NULL, "case %zu: \"%s\" lacks \"%s\"", k, mosft_error(),
                      bad[k].want);
        ck_assert_msg(strstr(mosft_error(), p) != NULL, "case %zu: \"%s\" does not name the file", k, mosft_error());
        ck_assert_ptr_null(back.packed);
        free(p);
    }
    nf4_free(&dq);
    nf4_free(&nodq);
    free(w);
    free(path);
    rm_rf(dir);
}
END_TEST

START_TEST(test_large_random) {
    // A 4096 x 4096 layer with N(0, 0.02) bf16 weights: NF4's relative Frobenius error is ~0.09-0.1
    // (bnb gives 0.092 on the 0.02-std oracle), and quantizing twice gives the same bytes.
    int64_t n = 4096, numel = n * n;
    float *w = xmalloc(sizeof(float) * (size_t)numel);
    fill_random(w, numel, 7, 0.02f);
    double t0 = mosft_now();
    nf4_tensor a, b;
    nf4_quantize(w, n, n, 1, &a);
    double t1 = mosft_now();
    float *d = xmalloc(sizeof(float) * (size_t)numel);
    nf4_dequantize(&a, d);
    double err = rel_l2(d, w, (size_t)numel);
    nf4_tensor c;
    nf4_quantize(w, n, n, 0, &c);
    nf4_dequantize(&c, d);
    double err_nodq = rel_l2(d, w, (size_t)numel);
    fprintf(stderr, "4096x4096 N(0,0.02): relative error %.5f (double quant), %.5f (without); quantize %.2f s\n", err,
            err_nodq, t1 - t0);
    ck_assert_msg(err > 0.08 && err < 0.12, "relative error %.4f", err);
    ck_assert_msg(err_nodq > 0.08 && err_nodq < 0.12 && err_nodq <= err, "relative error %.4f", err_nodq);
    // Threads split the blocks; the bytes must not depend on how many.
    setenv("MOSFT_THREADS", "3", 1);
    nf4_quantize(w, n, n, 1, &b);
    unsetenv("MOSFT_THREADS");
    expect_same(&a, &b);
    nf4_free(&b);
    setenv("MOSFT_THREADS", "1", 1);
    nf4_quantize(w, n, n, 1, &b);
    unsetenv("MOSFT_THREADS");
    expect_same(&a, &b);
    nf4_free(&a);
    nf4_free(&b);
    nf4_free(&c);
    free(d);
    free(w);
}
END_TEST

static Suite *nf4_suite(void) {
    Suite *s = suite_create("nf4");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_code_table);
    tcase_add_test(tc, test_hand_blocks);
    tcase_add_test(tc, test_oracles);
    tcase_add_test(tc, test_bnb_round_trip);
    tcase_add_test(tc, test_large_random);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(nf4_suite)
