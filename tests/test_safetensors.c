// test_safetensors.c: the safetensors reader/writer: round trips, every malformed-header case,
// sharded checkpoints.
#include <stdint.h>

#include "core/dtype.h"
#include "core/fileio.h"
#include "core/safetensors.h"
#include "tests/test_util.h"

// Write raw bytes: an 8-byte header length, the header text, then `data_len` bytes of payload.
static char *write_raw(const char *dir, const char *name, const char *header, uint64_t hlen_override,
                       size_t data_len) {
    char *p = path_join(dir, name);
    FILE *f = fopen(p, "wb");
    ck_assert_ptr_nonnull(f);
    uint64_t hl = hlen_override ? hlen_override : strlen(header);
    fwrite(&hl, 8, 1, f);
    fwrite(header, 1, strlen(header), f);
    for (size_t i = 0; i < data_len; i++) fputc((int)(i * 7 + 1), f);
    fclose(f);
    return p;
}

// Open must fail with an input error whose message contains `want`.
static void expect_bad(const char *path, const char *want) {
    st_file f;
    mosft_error_clear();
    int rc = st_open(&f, path);
    ck_assert_msg(rc == MOSFT_ERR_INPUT, "expected an input error for %s, got rc=%d (%s)", path, rc, mosft_error());
    ck_assert_msg(strstr(mosft_error(), want) != NULL, "message \"%s\" lacks \"%s\"", mosft_error(), want);
    ck_assert_msg(strstr(mosft_error(), path) != NULL, "message \"%s\" does not name the file", mosft_error());
    st_close(&f);
}

START_TEST(test_round_trip) {
    char *dir = test_tmpdir();
    char *p = path_join(dir, "rt.safetensors");
    float f32[6] = {1.5f, -2.25f, 3.0f, 1e-8f, -0.0f, 65504.0f};
    uint16_t bf[4], h[4];
    int32_t i32[5] = {-7, 0, 2147483647, -2147483647 - 1, 42};
    uint8_t u8[3] = {0, 128, 255};
    for (int i = 0; i < 4; i++) {
        bf[i] = f32_to_bf16(f32[i]);
        h[i] = f32_to_f16(f32[i]);
    }
    st_writer *w = st_writer_new();
    int64_t s23[2] = {2, 3}, s4[1] = {4}, s5[1] = {5}, s3[1] = {3}, s0[2] = {0, 4};
    st_writer_add(w, "a.f32", MOSFT_F32, 2, s23, f32);
    st_writer_add(w, "b.bf16", MOSFT_BF16, 1, s4, bf);
    st_writer_add(w, "c.f16", MOSFT_F16, 1, s4, h);
    st_writer_add(w, "d.i32", MOSFT_I32, 1, s5, i32);
    st_writer_add(w, "e.u8", MOSFT_U8, 1, s3, u8);
    st_writer_add(w, "f.empty", MOSFT_F32, 2, s0, NULL);
    st_writer_meta(w, "format", "mos");
    st_writer_meta(w, "step", "12");
    ck_assert_int_eq(st_writer_write(w, p), MOSFT_OK);
    st_writer_free(w);
    // No temporary file is left behind.
    char cmd[512];
    snprintf(cmd, sizeof cmd, "ls %s | grep -c tmp", dir);
    char *out = NULL;
    run_capture(cmd, &out);
    ck_assert_int_eq(atoi(out), 0);
    free(out);

    st_file f;
    ck_assert_int_eq(st_open(&f, p), MOSFT_OK);
    ck_assert_int_eq(f.n_tensors, 6);
    ck_assert_str_eq(st_meta(&f, "format"), "mos");
    ck_assert_str_eq(st_meta(&f, "step"), "12");
    ck_assert_ptr_null(st_meta(&f, "nope"));
    const st_tensor *t = st_find(&f, "a.f32");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->ndim, 2);
    ck_assert_int_eq(t->shape[0], 2);
    ck_assert_int_eq(t->shape[1], 3);
    ck_assert_int_eq(memcmp(t->data, f32, sizeof f32), 0);
    ck_assert_int_eq(((uintptr_t)t->data) % 8, 0);  // data section is 8-byte aligned
    float back[6];
    st_tensor_to_f32(st_find(&f, "b.bf16"), back);
    for (int i = 0; i < 4; i++) ck_assert_float_eq(back[i], bf16_round(f32[i]));
    st_tensor_to_f32(st_find(&f, "c.f16"), back);
    for (int i = 0; i < 4; i++) ck_assert_float_eq(back[i], f16_to_f32(h[i]));
    ck_assert_float_eq(back[0], 1.5f);
    ck_assert_int_eq(memcmp(st_find(&f, "d.i32")->data, i32, sizeof i32), 0);
    ck_assert_int_eq(memcmp(st_find(&f, "e.u8")->data, u8, sizeof u8), 0);
    ck_assert_int_eq(st_find(&f, "f.empty")->numel, 0);
    int64_t want[2] = {2, 3};
    ck_assert_int_eq(st_expect(&f, t, MOSFT_F32, 2, want), MOSFT_OK);
    int64_t wrong[2] = {3, 2};
    ck_assert_int_eq(st_expect(&f, t, MOSFT_F32, 2, wrong), MOSFT_ERR_INPUT);
    ck_assert_ptr_nonnull(strstr(mosft_error(), "expected F32 [3, 2], got F32 [2, 3]"));
    st_close(&f);
    free(p);
    rm_rf(dir);
}
END_TEST

START_TEST(test_reads_real_model) {
    st_file f;
    ck_assert_int_eq(st_open(&f, "tests/fixtures/stories260K/model.safetensors"), MOSFT_OK);
    ck_assert_int_eq(f.n_tensors, 47);
    const st_tensor *e = st_find(&f, "model.embed_tokens.weight");
    ck_assert_ptr_nonnull(e);
    ck_assert_int_eq(e->shape[0], 512);
    ck_assert_int_eq(e->shape[1], 64);
    ck_assert_int_eq(e->dtype, MOSFT_F32);
    st_close(&f);
}
END_TEST

START_TEST(test_malformed) {
    char *dir = test_tmpdir();
    char *p;
    // A valid header for reference: one F32 tensor of 2 elements = 8 bytes.
    const char *good = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    p = write_raw(dir, "good.st", good, 0, 8);
    st_file f;
    ck_assert_int_eq(st_open(&f, p), MOSFT_OK);
    st_close(&f);
    free(p);

    // Truncated: the data section is shorter than the header says.
    p = write_raw(dir, "trunc.st", good, 0, 5);
    expect_bad(p, "past the end of the data");
    free(p);
    // Header length larger than the file.
    p = write_raw(dir, "hlen.st", good, 1000000, 8);
    expect_bad(p, "header length");
    free(p);
    // Shorter than 8 bytes.
    p = path_join(dir, "tiny.st");
    atomic_write_file(p, "abc", 3);
    expect_bad(p, "at least 8 bytes");
    free(p);
    // Offsets past the end.
    p = write_raw(dir, "past.st", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 0, 8);
    expect_bad(p, "past the end");
    free(p);
    // Overlapping tensors.
    p = write_raw(dir, "overlap.st",
                  "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                  0, 12);
    expect_bad(p, "overlap");
    free(p);
    // Bad JSON.
    p = write_raw(dir, "json.st", "{\"x\":{\"dtype\":\"F32\",", 0, 8);
    expect_bad(p, "expected valid JSON");
    free(p);
    // Not an object at the top.
    p = write_raw(dir, "arr.st", "[1,2,3]", 0, 0);
    expect_bad(p, "expected a JSON object");
    free(p);
    // Unknown dtype.
    p = write_raw(dir, "dtype.st", "{\"x\":{\"dtype\":\"F8_E9\",\"shape\":[2],\"data_offsets\":[0,2]}}", 0, 8);
    expect_bad(p, "F8_E9");
    free(p);
    // Shape and offsets disagree.
    p = write_raw(dir, "size.st", "{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 0, 12);
    expect_bad(p, "expected 12 for F32 [3]");
    free(p);
    // Negative dimension, missing offsets, end before begin.
    p = write_raw(dir, "neg.st", "{\"x\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 0, 8);
    expect_bad(p, "non-negative integer");
    free(p);
    p = write_raw(dir, "nooff.st", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2]}}", 0, 8);
    expect_bad(p, "data_offsets");
    free(p);
    p = write_raw(dir, "rev.st", "{\"x\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", 0, 8);
    expect_bad(p, "begin <= end");
    free(p);
    // Metadata must map strings to strings.
    p = write_raw(dir, "meta.st", "{\"__metadata__\":{\"step\":12}}", 0, 0);
    expect_bad(p, "__metadata__.step");
    free(p);
    // Missing file: input error too.
    p = path_join(dir, "missing.st");
    expect_bad(p, "cannot open");
    free(p);
    rm_rf(dir);
}
END_TEST

START_TEST(test_sharded) {
    char *dir = test_tmpdir();
    float a[4] = {1, 2, 3, 4}, b[2] = {5, 6};
    int64_t s4[1] = {4}, s2[1] = {2};
    char *p1 = path_join(dir, "model-00001-of-00002.safetensors");
    char *p2 = path_join(dir, "model-00002-of-00002.safetensors");
    st_writer *w = st_writer_new();
    st_writer_add(w, "a", MOSFT_F32, 1, s4, a);
    ck_assert_int_eq(st_writer_write(w, p1), MOSFT_OK);
    st_writer_free(w);
    w = st_writer_new();
    st_writer_add(w, "b", MOSFT_F32, 1, s2, b);
    ck_assert_int_eq(st_writer_write(w, p2), MOSFT_OK);
    st_writer_free(w);
    char *idx = path_join(dir, "model.safetensors.index.json");
    const char *j = "{\"metadata\":{\"total_size\":24},\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                    "\"b\":\"model-00002-of-00002.safetensors\"}}";
    ck_assert_int_eq(atomic_write_file(idx, j, strlen(j)), MOSFT_OK);
    st_set s;
    ck_assert_int_eq(st_set_open(&s, dir), MOSFT_OK);
    ck_assert_int_eq(s.n_files, 2);
    ck_assert_int_eq(st_set_count(&s), 2);
    const st_file *fl = NULL;
    const st_tensor *tb = st_set_find(&s, "b", &fl);
    ck_assert_ptr_nonnull(tb);
    ck_assert_ptr_eq(fl, &s.files[1]);
    ck_assert_float_eq(((const float *)tb->data)[1], 6.0f);
    ck_assert_ptr_null(st_set_find(&s, "c", NULL));
    st_set_close(&s);
    // The index names a tensor that its shard does not hold.
    const char *j2 = "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                     "\"zz\":\"model-00002-of-00002.safetensors\"}}";
    ck_assert_int_eq(atomic_write_file(idx, j2, strlen(j2)), MOSFT_OK);
    ck_assert_int_eq(st_set_open(&s, dir), MOSFT_ERR_INPUT);
    ck_assert_ptr_nonnull(strstr(mosft_error(), "zz"));
    st_set_close(&s);
    // The index names a missing shard.
    const char *j3 = "{\"weight_map\":{\"a\":\"model-00009-of-00009.safetensors\"}}";
    ck_assert_int_eq(atomic_write_file(idx, j3, strlen(j3)), MOSFT_OK);
    ck_assert_int_eq(st_set_open(&s, dir), MOSFT_ERR_INPUT);
    ck_assert_ptr_nonnull(strstr(mosft_error(), "model-00009-of-00009"));
    st_set_close(&s);
    // A folder with neither file.
    char *empty = path_join(dir, "empty");
    mkdir_p(empty);
    ck_assert_int_eq(st_set_open(&s, empty), MOSFT_ERR_INPUT);
    ck_assert_ptr_nonnull(strstr(mosft_error(), "model.safetensors"));
    st_set_close(&s);
    free(empty);
    free(p1);
    free(p2);
    free(idx);
    rm_rf(dir);
}
END_TEST

START_TEST(test_dtype_conversions) {
    // bf16 rounds to nearest even; these bit patterns are computed by hand.
    ck_assert_uint_eq(f32_to_bf16(1.0f), 0x3f80);
    float x;
    uint32_t u = 0x3f808000u;  // exactly halfway between 0x3f80 and 0x3f81: ties to even (0x3f80)
    memcpy(&x, &u, 4);
    ck_assert_uint_eq(f32_to_bf16(x), 0x3f80);
    u = 0x3f818000u;  // halfway between 0x3f81 and 0x3f82: to even (0x3f82)
    memcpy(&x, &u, 4);
    ck_assert_uint_eq(f32_to_bf16(x), 0x3f82);
    u = 0x3f808001u;  // just above halfway: up
    memcpy(&x, &u, 4);
    ck_assert_uint_eq(f32_to_bf16(x), 0x3f81);
    ck_assert_uint_eq(f32_to_f16(1.0f), 0x3c00);
    ck_assert_uint_eq(f32_to_f16(-2.0f), 0xc000);
    ck_assert_uint_eq(f32_to_f16(65504.0f), 0x7bff);
    ck_assert_uint_eq(f32_to_f16(1e6f), 0x7c00);
    ck_assert_float_eq(f16_to_f32(0x0001), 5.960464477539063e-08f);
    ck_assert_float_eq(f16_to_f32(0x3555), 0.333251953125f);
    for (int i = 0; i < 0x7c00; i += 37) ck_assert_uint_eq(f32_to_f16(f16_to_f32((uint16_t)i)), (uint16_t)i);
}
END_TEST

static Suite *safetensors_suite(void) {
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_round_trip);
    tcase_add_test(tc, test_reads_real_model);
    tcase_add_test(tc, test_malformed);
    tcase_add_test(tc, test_sharded);
    tcase_add_test(tc, test_dtype_conversions);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(safetensors_suite)
