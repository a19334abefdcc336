// test_kernels.c: every CUDA kernel against its CPU twin (core/ops_cpu.h, core/nf4.h, core/adapter.h)
// on fresh random inputs, with the tolerances written at each check:
//   bit-identical: NF4 quantization/dequantization (also against bitsandbytes' oracle files), AdamW,
//                  the adapter's gather/scatter, dropout masks;
//   fp32 results from bf16 inputs (GEMMs with fp32 output, logits): |d| <= 1e-5 max|ref| + 1e-5 |ref|;
//   bf16 results: |d| <= atol + 2^-7 |ref| (one bf16 rounding of the result, plus the inputs' effect);
//   attention and the loss's gradient (bf16 probabilities inside): rel L2 <= 1e-2 and elementwise
//   |d| <= 2e-2 max|ref| + 2^-6 |ref|.
// Inputs are bf16-rounded before both twins see them; outputs are poisoned (0xff) before each kernel.
#include <math.h>

#include "core/adapter.h"
#include "core/nf4.h"
#include "core/ops_cpu.h"
#include "core/safetensors.h"
#include "tests/gpu/gpu_util.h"

#define RT (1.0 / 128)  // 2^-7

static cuda_ctx *ctx_new(void) {
    cuda_ctx *c = cuda_ctx_create();
    ck_assert_msg(c != NULL, "no CUDA device: %s", mosft_error());
    return c;
}

// ---- NF4 -----------------------------------------------------------------------------------------

// Quantize x on the GPU and on the CPU; every byte and scale must agree, and dequantization too.
static void nf4_compare(cuda_ctx *ctx, const float *x, int64_t rows, int64_t cols, int dq, const char *what) {
    int64_t n = rows * cols;
    nf4_tensor ht;
    nf4_quantize(x, rows, cols, dq, &ht);
    void *mem = dev_alloc(nf4_cuda_bytes(n, dq));
    nf4_cuda_tensor dt;
    nf4_cuda_layout(&dt, rows, cols, dq, mem);
    float *dx = dev_up(x, sizeof(float) * (size_t)n);
    float *am = dev_alloc(sizeof(float) * (size_t)ht.n_blocks);
    nf4_quantize_cuda(ctx, &dt, dx, am);
    uint8_t *packed = xmalloc((size_t)(n + 1) / 2);
    dev_down(packed, dt.packed, (size_t)(n + 1) / 2);
    ck_assert_msg(memcmp(packed, ht.packed, (size_t)(n + 1) / 2) == 0, "%s: packed codes differ", what);
    if (dq) {
        int64_t nn = (ht.n_blocks + 255) / 256;
        uint8_t *q = xmalloc((size_t)ht.n_blocks);
        float *na = xmalloc(sizeof(float) * (size_t)nn);
        dev_down(q, dt.absmax_q, (size_t)ht.n_blocks);
        dev_down(na, dt.nested_absmax, sizeof(float) * (size_t)nn);
        ck_assert_msg(memcmp(q, ht.absmax_q, (size_t)ht.n_blocks) == 0, "%s: absmax codes differ", what);
        ck_assert_msg(memcmp(na, ht.nested_absmax, sizeof(float) * (size_t)nn) == 0, "%s: nested absmax differ", what);
        ck_assert_msg(memcmp(&dt.offset, &ht.offset, 4) == 0, "%s: offset %.9g vs %.9g", what, (double)dt.offset,
                      (double)ht.offset);
        free(q);
        free(na);
    } else {
        float *a = xmalloc(sizeof(float) * (size_t)ht.n_blocks);
        dev_down(a, dt.absmax, sizeof(float) * (size_t)ht.n_blocks);
        ck_assert_msg(memcmp(a, ht.absmax, sizeof(float) * (size_t)ht.n_blocks) == 0, "%s: absmax differ", what);
        free(a);
    }
    // dequantization: bf16(code * absmax), as base_linear_weight
    void *out = dev_alloc(2 * (size_t)n);
    nf4_dequantize_cuda(ctx, &dt, out, 0);
    uint16_t *got = xmalloc(2 * (size_t)n);
    dev_down(got, out, 2 * (size_t)n);
    float *ref = xmalloc(sizeof(float) * (size_t)n);
    nf4_dequantize(&ht, ref);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad += got[i] != f32_to_bf16(ref[i]);
    ck_assert_msg(bad == 0, "%s: %lld dequantized values differ", what, (long long)bad);
    // the upload path (pre-quantized weights) dequantizes the same
    nf4_cuda_tensor ut;
    void *mem2 = dev_alloc(nf4_cuda_bytes(n, dq));
    nf4_cuda_layout(&ut, rows, cols, dq, mem2);
    nf4_upload_cuda(ctx, &ut, &ht);
    nf4_dequantize_cuda(ctx, &ut, out, 0);
    uint16_t *got2 = xmalloc(2 * (size_t)n);
    dev_down(got2, out, 2 * (size_t)n);
    ck_assert_msg(memcmp(got, got2, 2 * (size_t)n) == 0, "%s: uploaded tensor dequantizes differently", what);
    // into a wider buffer (a weight group's rows beside the adapter's columns): the same rows, the gap kept
    int64_t ldo = cols + 24;
    uint16_t *wide = xmalloc(2 * (size_t)(rows * ldo));
    for (int64_t i = 0; i < rows * ldo; i++) wide[i] = 0x7fc1;  // a NaN pattern the kernel never writes
    void *outw = dev_up(wide, 2 * (size_t)(rows * ldo));
    nf4_dequantize_cuda(ctx, &ut, outw, ldo);
    dev_down(wide, outw, 2 * (size_t)(rows * ldo));
    for (int64_t r = 0; r < rows; r++) {
        ck_assert_msg(memcmp(wide + r * ldo, got + r * cols, 2 * (size_t)cols) == 0, "%s: row %lld differs with ldo %lld",
                      what, (long long)r, (long long)ldo);
        for (int64_t c = cols; c < ldo; c++) ck_assert_msg(wide[r * ldo + c] == 0x7fc1, "%s: wrote past its row", what);
    }
    free(wide);
    cudaFree(outw);
    fprintf(stderr, "nf4 %-28s %lld x %lld dq=%d: bit-identical\n", what, (long long)rows, (long long)cols, dq);
    free(got2);
    cudaFree(mem2);
    free(got);
    free(ref);
    cudaFree(out);
    free(packed);
    cudaFree(mem);
    cudaFree(dx);
    cudaFree(am);
    nf4_free(&ht);
}

START_TEST(test_nf4_random) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 101);
    // cols % 32, % 16, % 8 and odd: each vector width of the dequantization and the scalar path
    int64_t shapes[][2] = {{64, 64}, {1000, 320}, {3, 40}, {333, 77}, {100, 48}, {4096, 1024}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t rows = shapes[s][0], cols = shapes[s][1], n = rows * cols;
        float *x = rnd_bf16(&r, (size_t)n, 0.02f);
        for (int64_t i = 0; i < n; i += 997) x[i] = bf16_round(x[i] * 40.0f);  // outliers
        if (n > 256)
            for (int64_t i = 128; i < 192; i++) x[i] = 0.0f;  // an all-zero block
        for (int dq = 0; dq < 2; dq++) nf4_compare(ctx, x, rows, cols, dq, "random");
        free(x);
    }
    cuda_ctx_free(ctx);
}
END_TEST

// A K-augmented weight group in one launch (weight_group_fill_cuda): up to three NF4 tensors stacked
// in row bands, the adapter's B beside their rows and A below them; every value bit-identical to the CPU
// dequantization, the rest of the buffer untouched. The vector launch (d_in, R, ld multiples of 8) and
// the piece-by-piece fallback; with and without the adapter blocks; double quantization on and off.
START_TEST(test_weight_group_fill) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 202);
    // d_in, rows of each of up to 3 tensors, R (0: no adapter blocks), extra columns (ld = d_in + R + extra)
    int cases[][6] = {{256, 96, 32, 32, 16, 0}, {512, 1000, 0, 0, 24, 8}, {128, 64, 64, 0, 0, 0}, {44, 40, 12, 12, 4, 0},
                      {64, 48, 16, 16, 6, 2}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int di = cases[k][0], R = cases[k][4], extra = cases[k][5];
        int64_t ld = di + R + extra, rows = 0;
        int nt = 0;
        int64_t trows[3], row0[3];
        for (int i = 0; i < 3; i++)
            if (cases[k][1 + i]) trows[nt] = cases[k][1 + i], row0[nt] = rows, rows += trows[nt], nt++;
        int64_t nbuf = (rows + R + 1) * ld;
        nf4_tensor ht[3];
        nf4_cuda_tensor dt[3];
        void *mem[3];
        float *ref = xmalloc(sizeof(float) * (size_t)rows * di);
        for (int i = 0; i < nt; i++) {
            float *x = rnd_bf16(&r, (size_t)(trows[i] * di), 0.02f);
            nf4_quantize(x, trows[i], di, (int)((k + i) % 2), &ht[i]);
            nf4_dequantize(&ht[i], ref + row0[i] * di);
            mem[i] = dev_alloc(nf4_cuda_bytes(trows[i] * di, ht[i].double_quant));
            nf4_cuda_layout(&dt[i], trows[i], di, ht[i].double_quant, mem[i]);
            nf4_upload_cuda(ctx, &dt[i], &ht[i]);
            free(x);
        }
        float *B = R ? rnd_bf16(&r, (size_t)rows * R, 1.0f) : NULL, *A = R ? rnd_bf16(&r, (size_t)R * di, 1.0f) : NULL;
        bf16 *dB = R ? dev_bf16(B, (size_t)rows * R) : NULL, *dA = R ? dev_bf16(A, (size_t)R * di) : NULL;
        uint16_t *poison = xmalloc(2 * (size_t)nbuf);
        for (int64_t i = 0; i < nbuf; i++) poison[i] = 0x7fc1;  // a NaN pattern the kernel never writes
        bf16 *buf = dev_up(poison, 2 * (size_t)nbuf);
        weight_piece p[WEIGHT_PIECES_MAX];
        int n = 0;
        for (int i = 0; i < nt; i++) p[n++] = (weight_piece){&dt[i], NULL, 0, 0, 0, buf + row0[i] * ld};
        if (R) n += adapter_block_pieces(p + n, buf, ld, di, (int)rows, dB, dA, R);
        weight_group_fill_cuda(cuda_ctx_stream(ctx), p, n, ld);
        CK_CUDA(cudaDeviceSynchronize());
        uint16_t *got = xmalloc(2 * (size_t)nbuf);
        dev_down(got, buf, 2 * (size_t)nbuf);
        for (int64_t i = 0; i < nbuf / ld; i++)
            for (int64_t j = 0; j < ld; j++) {
                uint16_t want = 0x7fc1;
                if (i < rows && j < di) want = f32_to_bf16(ref[i * di + j]);
                if (R && i < rows && j >= di && j < di + R) want = f32_to_bf16(B[i * R + (j - di)]);
                if (R && i >= rows && i < rows + R && j < di) want = f32_to_bf16(A[(i - rows) * di + j]);
                ck_assert_msg(got[i * ld + j] == want, "weight group %zu (d_in %d, R %d, ld %lld): element (%lld, %lld) "
                              "is %04x, expected %04x", k, di, R, (long long)ld, (long long)i, (long long)j, got[i * ld + j], want);
            }
        fprintf(stderr, "weight group: %d NF4 tensors, %lld x %d, R %-2d ld %-4lld in one fill: bit-identical\n", nt,
                (long long)rows, di, R, (long long)ld);
        for (int i = 0; i < nt; i++) nf4_free(&ht[i]), cudaFree(mem[i]);
        free(ref), free(B), free(A), free(poison), free(got);
        cudaFree(dB), cudaFree(dA), cudaFree(buf);
    }
    cuda_ctx_free(ctx);
}
END_TEST

static const void *oracle(const st_file *f, const char *name, mosft_dtype dt, int64_t numel) {
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL, "%s: no tensor %s", f->path, name);
    ck_assert_int_eq(t->dtype, dt);
    ck_assert_int_eq(t->numel, numel);
    return t->data;
}

// bitsandbytes' own bytes (shared/data/nf4): the GPU quantization must reproduce them.
START_TEST(test_nf4_oracles) {
    REQUIRE_SHARED();
    const char *cases[] = {"small_64x64", "rect_256x1024", "tall_1000x320", "outliers_128x512"};
    cuda_ctx *ctx = ctx_new();
    for (int c = 0; c < 4; c++) {
        char rel[128];
        snprintf(rel, sizeof rel, "nf4/%s.safetensors", cases[c]);
        st_file f;
        ck_assert_msg(st_open(&f, shared_path(rel)) == MOSFT_OK, "%s", mosft_error());
        const st_tensor *in = st_find(&f, "input_f32");
        int64_t rows = in->shape[0], cols = in->shape[1], n = rows * cols, nb = (n + 63) / 64, nn = (nb + 255) / 256;
        float *x = xmalloc(sizeof(float) * (size_t)n);
        st_tensor_to_f32(in, x);
        for (int dq = 1; dq >= 0; dq--) {
            void *mem = dev_alloc(nf4_cuda_bytes(n, dq));
            nf4_cuda_tensor dt;
            nf4_cuda_layout(&dt, rows, cols, dq, mem);
            float *dx = dev_up(x, sizeof(float) * (size_t)n), *am = dev_alloc(sizeof(float) * (size_t)nb);
            nf4_quantize_cuda(ctx, &dt, dx, am);
            uint8_t *p = xmalloc((size_t)n / 2);
            dev_down(p, dt.packed, (size_t)n / 2);
            ck_assert_msg(memcmp(p, oracle(&f, dq ? "packed" : "packed_nodq", MOSFT_U8, n / 2), (size_t)n / 2) == 0,
                          "%s: packed codes differ from bitsandbytes", cases[c]);
            if (dq) {
                uint8_t *q = xmalloc((size_t)nb);
                float *na = xmalloc(sizeof(float) * (size_t)nn);
                dev_down(q, dt.absmax_q, (size_t)nb);
                dev_down(na, dt.nested_absmax, sizeof(float) * (size_t)nn);
                ck_assert_msg(memcmp(q, oracle(&f, "absmax_codes", MOSFT_U8, nb), (size_t)nb) == 0, "%s: absmax codes",
                              cases[c]);
                ck_assert_msg(memcmp(na, oracle(&f, "nested_absmax", MOSFT_F32, nn), 4 * (size_t)nn) == 0,
                              "%s: nested absmax", cases[c]);
                float off = strtof(st_meta(&f, "offset"), NULL);
                ck_assert_msg(memcmp(&off, &dt.offset, 4) == 0, "%s: offset", cases[c]);
                free(q);
                free(na);
            } else {
                float *a = xmalloc(sizeof(float) * (size_t)nb);
                dev_down(a, dt.absmax, 4 * (size_t)nb);
                ck_assert_msg(memcmp(a, oracle(&f, "absmax_nodq", MOSFT_F32, nb), 4 * (size_t)nb) == 0, "%s: absmax",
                              cases[c]);
                free(a);
            }
            void *out = dev_alloc(2 * (size_t)n);
            nf4_dequantize_cuda(ctx, &dt, out, 0);
            uint16_t *got = xmalloc(2 * (size_t)n);
            dev_down(got, out, 2 * (size_t)n);
            ck_assert_msg(memcmp(got, oracle(&f, dq ? "dequant" : "dequant_nodq", MOSFT_BF16, n), 2 * (size_t)n) == 0,
                          "%s: dequantization differs from bitsandbytes' bf16 output", cases[c]);
            fprintf(stderr, "nf4 oracle %-18s dq=%d: packed, scales, dequant bit-identical to bitsandbytes\n", cases[c],
                    dq);
            free(got);
            free(p);
            cudaFree(out);
            cudaFree(mem);
            cudaFree(dx);
            cudaFree(am);
        }
        free(x);
        st_close(&f);
    }
    cuda_ctx_free(ctx);
}
END_TEST

// ---- GEMM ------------------------------------------------------------------------------------------

START_TEST(test_gemm) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 202);
    int64_t M = 37, N = 56, K = 72;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int out32 = 0; out32 < 2; out32++)
                for (int acc = 0; acc < 2; acc++) {
                    int64_t lda = (ta ? M : K) + 8, ldb = (tb ? K : N) + 16, ldd = N + 8;
                    int64_t na = (ta ? K : M) * lda, nb = (tb ? N : K) * ldb;
                    float *A = rnd_bf16(&r, (size_t)na, 1.0f), *B = rnd_bf16(&r, (size_t)nb, 1.0f);
                    float *C0 = rnd_bf16(&r, (size_t)(M * ldd), 1.0f);
                    float *ref = xmalloc(sizeof(float) * (size_t)(M * ldd));
                    memcpy(ref, C0, sizeof(float) * (size_t)(M * ldd));
                    float alpha = 0.75f;
                    // reference: alpha * op(A) op(B) (+ C0)
                    float *prod = xcalloc((size_t)(M * N), sizeof(float));
                    gemm_cpu(ta, tb, M, N, K, A, lda, B, ldb, prod, N, 0);
                    for (int64_t i = 0; i < M; i++)
                        for (int64_t j = 0; j < N; j++)
                            ref[i * ldd + j] = alpha * prod[i * N + j] + (acc ? C0[i * ldd + j] : 0.0f);
                    void *dA = dev_bf16(A, (size_t)na), *dB = dev_bf16(B, (size_t)nb);
                    void *dC = out32 ? dev_up(C0, sizeof(float) * (size_t)(M * ldd)) : dev_bf16(C0, (size_t)(M * ldd));
                    void *dD = dev_alloc((out32 ? 4 : 2) * (size_t)(M * ldd));
                    gemm_cuda(ctx, ta, tb, M, N, K, alpha, dA, lda, dB, ldb, acc ? 1.0f : 0.0f, acc ? dC : NULL, dD,
                              ldd, out32 ? GEMM_F32 : GEMM_BF16);
                    float *got = out32 ? down_f32(dD, (size_t)(M * ldd)) : down_bf16(dD, (size_t)(M * ldd));
                    // compare the written region only
                    float *g2 = xmalloc(sizeof(float) * (size_t)(M * N)),
                          *r2 = xmalloc(sizeof(float) * (size_t)(M * N));
                    for (int64_t i = 0; i < M; i++)
                        for (int64_t j = 0; j < N; j++) {
                            g2[i * N + j] = got[i * ldd + j];
                            r2[i * N + j] = ref[i * ldd + j];
                        }
                    char what[64];
                    snprintf(what, sizeof what, "gemm ta%d tb%d %s%s", ta, tb, out32 ? "f32" : "bf16",
                             acc ? " +C" : "");
                    double mx = max_abs(r2, (size_t)(M * N));
                    int ok = out32 ? close_enough(what, g2, r2, (size_t)(M * N), 1e-5 * mx, 1e-5)
                                   : close_enough(what, g2, r2, (size_t)(M * N), 1e-3 * mx, RT);
                    ck_assert_msg(ok, "%s", what);
                    free(A), free(B), free(C0), free(ref), free(prod), free(got), free(g2), free(r2);
                    cudaFree(dA), cudaFree(dB), cudaFree(dC), cudaFree(dD);
                }
    // the adapter's skinny shapes (N small, K long: cuBLASLt may split K itself), both transposes of A
    {
        int64_t sm = 96, sn = 40, sk = 8192;
        for (int ta = 0; ta < 2; ta++) {
            float *A = rnd_bf16(&r, (size_t)(sm * sk), 1.0f), *B = rnd_bf16(&r, (size_t)(sk * sn), 1.0f);
            float *ref = xmalloc(sizeof(float) * (size_t)(sm * sn));
            gemm_cpu(ta, 0, sm, sn, sk, A, ta ? sm : sk, B, sn, ref, sn, 0);
            for (int64_t i = 0; i < sm * sn; i++) ref[i] *= 0.5f;
            void *dA = dev_bf16(A, (size_t)(sm * sk)), *dB = dev_bf16(B, (size_t)(sk * sn));
            float *dD = dev_alloc(4 * (size_t)(sm * (sn + 8)));
            gemm_cuda(ctx, ta, 0, sm, sn, sk, 0.5f, dA, ta ? sm : sk, dB, sn, 0.0f, NULL, dD, sn + 8, GEMM_F32);
            float *got = down_f32(dD, (size_t)(sm * (sn + 8))), *g2 = xmalloc(sizeof(float) * (size_t)(sm * sn));
            for (int64_t i = 0; i < sm; i++) memcpy(g2 + i * sn, got + i * (sn + 8), sizeof(float) * (size_t)sn);
            char what[64];
            snprintf(what, sizeof what, "gemm skinny ta%d", ta);
            ck_assert(close_enough(what, g2, ref, (size_t)(sm * sn), 1e-5 * max_abs(ref, (size_t)(sm * sn)), 1e-5));
            free(A), free(B), free(ref), free(got), free(g2);
            cudaFree(dA), cudaFree(dB), cudaFree(dD);
        }
    }
    // strided batch: each matrix as its own product
    int batch = 5;
    int64_t sa = M * K + 8, sb = K * N + 16, sd = M * N + 24;
    float *A = rnd_bf16(&r, (size_t)(sa * batch), 1.0f), *B = rnd_bf16(&r, (size_t)(sb * batch), 1.0f);
    void *dA = dev_bf16(A, (size_t)(sa * batch)), *dB = dev_bf16(B, (size_t)(sb * batch));
    float *dD = dev_alloc(4 * (size_t)(sd * batch));
    gemm_batched_cuda(ctx, 0, 0, M, N, K, 1.0f, dA, K, sa, dB, N, sb, 0.0f, dD, N, sd, GEMM_F32, batch);
    float *got = down_f32(dD, (size_t)(sd * batch)), *ref = xmalloc(sizeof(float) * (size_t)(M * N));
    for (int b = 0; b < batch; b++) {
        gemm_cpu(0, 0, M, N, K, A + b * sa, K, B + b * sb, N, ref, N, 0);
        ck_assert(close_enough("gemm batched f32", got + b * sd, ref, (size_t)(M * N),
                               1e-5 * max_abs(ref, (size_t)(M * N)), 1e-5));
    }
    free(A), free(B), free(got), free(ref);
    cudaFree(dA), cudaFree(dB), cudaFree(dD);
    cuda_ctx_free(ctx);
}
END_TEST

// The fused kernels' split sums: D = sum of the partials in split order, bit for bit against the same
// fp32 loop on the CPU (bf16 and fp32 outputs, a row stride past N, the spare columns untouched; a -0
// partial alone sums to +0, as the loop from 0 gives).
START_TEST(test_splitk_sum) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 515);
    const int64_t shapes[][3] = {{37, 64, 72}, {100, 96, 96}, {13, 7, 9}, {20, 32, 34}};  // M, N, ldd
    for (int si = 0; si < 4; si++) {
        int64_t M = shapes[si][0], N = shapes[si][1], ldd = shapes[si][2];
        for (int splits = 1; splits <= 7; splits += 3) {
            size_t np = (size_t)(splits * M * N);
            float *P = xmalloc(sizeof(float) * np);
            for (size_t i = 0; i < np; i++) P[i] = (float)(rng_next_double(&r) * 8.0 - 4.0);
            P[0] = -0.0f;  // a sum from +0 turns it into +0
            float *dP = dev_up(P, sizeof(float) * np);
            for (int f32 = 0; f32 < 2; f32++) {
                size_t es = f32 ? 4 : 2, nd = (size_t)(M * ldd);
                void *dD = dev_alloc(es * nd);  // 0xff poison: the spare columns keep it
                splitk_sum_cuda(ctx, dP, splits, M, N, dD, ldd, f32 ? GEMM_F32 : GEMM_BF16);
                CK_CUDA(cudaDeviceSynchronize());
                unsigned char *got = xmalloc(es * nd);
                CK_CUDA(cudaMemcpy(got, dD, es * nd, cudaMemcpyDeviceToHost));
                int64_t bad = 0;
                for (int64_t m = 0; m < M; m++)
                    for (int64_t n = 0; n < ldd; n++) {
                        const unsigned char *g = got + es * (size_t)(m * ldd + n);
                        if (n >= N) {
                            bad += f32 ? *(const uint32_t *)g != 0xffffffffu : *(const uint16_t *)g != 0xffff;
                            continue;
                        }
                        float sum = 0.0f;
                        for (int c = 0; c < splits; c++) sum += P[(size_t)c * M * N + m * N + n];
                        if (f32) {
                            uint32_t w;
                            memcpy(&w, &sum, 4);
                            bad += *(const uint32_t *)g != w;
                        } else {
                            bad += *(const uint16_t *)g != f32_to_bf16(sum);
                        }
                    }
                ck_assert_msg(bad == 0, "split sum M %lld N %lld ldd %lld splits %d %s: %lld elements differ", (long long)M,
                              (long long)N, (long long)ldd, splits, f32 ? "f32" : "bf16", (long long)bad);
                free(got);
                cudaFree(dD);
            }
            free(P);
            cudaFree(dP);
        }
    }
    cuda_ctx_free(ctx);
}
END_TEST

// The algorithm choice by measurement: the bit hash against its CPU twin, then products tuned (every
// size tunes here) against the same products on the heuristic's first choice: identical bits, and
// within tolerance of the CPU product. On the GPU cuBLASLt offers several candidates for these shapes.
START_TEST(test_gemm_tune) {
    rng_state r;
    rng_seed(&r, 212);
    int64_t rows = 37, wpr = 53, ldw = 61;
    uint32_t *w = xmalloc(sizeof(uint32_t) * (size_t)(rows * ldw));
    for (int64_t i = 0; i < rows * ldw; i++) w[i] = (uint32_t)rng_next(&r);
    cuda_ctx *ctx = ctx_new();
    uint32_t *dw = dev_up(w, sizeof(uint32_t) * (size_t)(rows * ldw));
    uint64_t *part = dev_alloc(sizeof(uint64_t) * 256);
    uint64_t hc = bits_hash_cpu(w, rows, wpr, ldw), hg = bits_hash_cuda(ctx, dw, rows, wpr, ldw, part);
    ck_assert_msg(hc == hg, "bits hash: GPU %016llx, CPU %016llx", (unsigned long long)hg, (unsigned long long)hc);
    w[5 * ldw + 7] ^= 1u << 13;  // one bit inside the rows: another hash; one in the row padding: the same
    w[3 * ldw + wpr + 2] ^= 1u;
    CK_CUDA(cudaMemcpy(dw, w, sizeof(uint32_t) * (size_t)(rows * ldw), cudaMemcpyHostToDevice));
    uint64_t hc2 = bits_hash_cpu(w, rows, wpr, ldw), hg2 = bits_hash_cuda(ctx, dw, rows, wpr, ldw, part);
    ck_assert(hc2 == hg2 && hc2 != hc);
    w[5 * ldw + 7] ^= 1u << 13;
    ck_assert(bits_hash_cpu(w, rows, wpr, ldw) == hc);
    cudaFree(dw), cudaFree(part), free(w);
    int64_t M = 512, N = 384, K = 320;
    for (int out32 = 0; out32 < 2; out32++)
        for (int acc = 0; acc < 2; acc++) {
            int64_t ldd = N + 8;
            float *A = rnd_bf16(&r, (size_t)(M * K), 1.0f), *B = rnd_bf16(&r, (size_t)(N * K), 1.0f);
            float *C0 = rnd_bf16(&r, (size_t)(M * ldd), 1.0f);
            size_t es = out32 ? 4 : 2;
            void *dA = dev_bf16(A, (size_t)(M * K)), *dB = dev_bf16(B, (size_t)(N * K));
            void *dC = out32 ? dev_up(C0, 4 * (size_t)(M * ldd)) : dev_bf16(C0, (size_t)(M * ldd));
            void *d0 = dev_alloc(es * (size_t)(M * ldd)), *d1 = dev_alloc(es * (size_t)(M * ldd));
            CK_CUDA(cudaMemset(d0, 0, es * (size_t)(M * ldd)));
            CK_CUDA(cudaMemset(d1, 0, es * (size_t)(M * ldd)));
            CK_CUDA(cudaDeviceSynchronize());  // (cudaMemset is not ordered with ctx's non-blocking streams)
            cuda_ctx *c0 = ctx_new(), *c1 = ctx_new();
            gemm_tune_set_min_flop(1e300);  // c0: the heuristic's first choice
            gemm_cuda(c0, 0, 1, M, N, K, 0.5f, dA, K, dB, K, acc ? 1.0f : 0.0f, acc ? dC : NULL, d0, ldd,
                      out32 ? GEMM_F32 : GEMM_BF16);
            gemm_tune_set_level(1), gemm_tune_set_min_flop(0);  // c1: chosen by measurement, at the plan's second run
            for (int run = 0; run < 2; run++)
                gemm_cuda(c1, 0, 1, M, N, K, 0.5f, dA, K, dB, K, acc ? 1.0f : 0.0f, acc ? dC : NULL, d1, ldd,
                          out32 ? GEMM_F32 : GEMM_BF16);
            gemm_tune_set_level(-1), gemm_tune_set_min_flop(5e10);
            CK_CUDA(cudaDeviceSynchronize());
            uint8_t *h0 = xmalloc(es * (size_t)(M * ldd)), *h1 = xmalloc(es * (size_t)(M * ldd));
            dev_down(h0, d0, es * (size_t)(M * ldd));
            dev_down(h1, d1, es * (size_t)(M * ldd));
            ck_assert_msg(!memcmp(h0, h1, es * (size_t)(M * ldd)), "tuned product %s%s differs from the first choice's",
                          out32 ? "f32" : "bf16", acc ? " +C" : "");
            float *ref = xcalloc((size_t)(M * N), sizeof(float)), *got = xmalloc(sizeof(float) * (size_t)(M * N));
            gemm_cpu(0, 1, M, N, K, A, K, B, K, ref, N, 0);
            float *g = out32 ? down_f32(d1, (size_t)(M * ldd)) : down_bf16(d1, (size_t)(M * ldd));
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) {
                    ref[i * N + j] = 0.5f * ref[i * N + j] + (acc ? C0[i * ldd + j] : 0.0f);
                    got[i * N + j] = g[i * ldd + j];
                }
            char what[64];
            snprintf(what, sizeof what, "gemm tuned %s%s", out32 ? "f32" : "bf16", acc ? " +C" : "");
            double mx = max_abs(ref, (size_t)(M * N));
            ck_assert(out32 ? close_enough(what, got, ref, (size_t)(M * N), 1e-5 * mx, 1e-5)
                            : close_enough(what, got, ref, (size_t)(M * N), 1e-3 * mx, RT));
            free(A), free(B), free(C0), free(h0), free(h1), free(ref), free(got), free(g);
            cudaFree(dA), cudaFree(dB), cudaFree(dC), cudaFree(d0), cudaFree(d1);
            cuda_ctx_free(c0), cuda_ctx_free(c1);
        }
    cuda_ctx_free(ctx);
}
END_TEST

// ---- norms, activations, embedding -----------------------------------------------------------------

// Overwrite device bf16 memory d[n] with x.
static void up_bf16(void *d, const float *x, size_t n) {
    uint16_t *h = to_bf16(x, n);
    CK_CUDA(cudaMemcpy(d, h, 2 * n, cudaMemcpyHostToDevice));
    free(h);
}

START_TEST(test_rmsnorm) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 303);
    int Cs[] = {64, 3072, 4096, 5120, 8320};  // register kernels of 1, 3, 4, 5 vectors; the loop kernel
    for (int ci = 0; ci < 5; ci++) {
        int64_t T = 37;
        int C = Cs[ci];
        size_t n = (size_t)(T * C);
        float *x = rnd_bf16(&r, n, 1.5f), *w = rnd_bf16(&r, (size_t)C, 1.0f), *g = rnd_bf16(&r, n, 0.3f);
        // the held gradient as the kernel keeps it: hi = bf16(v), lo = bf16(v - hi) of an fp32 v
        float *v0 = xmalloc(sizeof(float) * n), *hi0 = xmalloc(sizeof(float) * n), *lo0 = xmalloc(sizeof(float) * n);
        for (size_t i = 0; i < n; i++) {
            v0[i] = 0.2f * rnd_normal(&r);
            hi0[i] = bf16_round(v0[i]);
            lo0[i] = bf16_round(v0[i] - hi0[i]);
        }
        float *y = xmalloc(sizeof(float) * n), *rs = xmalloc(sizeof(float) * (size_t)T);
        rmsnorm_forward_cpu(y, rs, x, w, T, C, 1e-5f);
        float *gx = xmalloc(sizeof(float) * n), *gn = xcalloc(n, sizeof(float));  // += onto the pair / alone
        for (size_t i = 0; i < n; i++) gx[i] = hi0[i] + lo0[i];
        rmsnorm_backward_cpu(gx, g, x, w, rs, T, C, 1e-5f);
        rmsnorm_backward_cpu(gn, g, x, w, rs, T, C, 1e-5f);
        int64_t ld = C + 16;  // a row stride wider than the row (the adapter's h rides there)
        void *dx = dev_bf16(x, n), *dy = dev_alloc(2 * (size_t)(T * ld));
        float *dw = dev_up(w, sizeof(float) * (size_t)C), *drs = dev_alloc(sizeof(float) * (size_t)T);
        rmsnorm_forward_cuda(ctx, dy, ld, drs, dx, dw, T, C, 1e-5f);
        float *gyl = down_bf16(dy, (size_t)(T * ld)), *gy = xmalloc(sizeof(float) * n), *grs = down_f32(drs, (size_t)T);
        for (int64_t t = 0; t < T; t++) memcpy(gy + t * C, gyl + t * ld, sizeof(float) * (size_t)C);
        ck_assert(close_enough("rmsnorm fwd out (bf16)", gy, y, n, 1e-3 * max_abs(y, n), RT));
        ck_assert(close_enough("rmsnorm fwd rstd", grs, rs, (size_t)T, 0, 1e-5));
        free(gyl);
        float *hil = xcalloc((size_t)(T * ld), sizeof(float));  // hi0 in rows of ld
        for (int64_t t = 0; t < T; t++) memcpy(hil + t * ld, hi0 + t * C, sizeof(float) * (size_t)C);
        float *dg = dev_up(g, sizeof(float) * n);
        void *dgb = dev_bf16(g, n), *dlo = dev_bf16(lo0, n), *dhi = dev_bf16(hil, (size_t)(T * ld));
        // fp32 output gradient (the lm_head's) and bf16 (the layers' input-gradient GEMMs': g is bf16-exact,
        // so the same result), added to the held pair or written alone
        for (int k = 0; k < 3; k++) {
            int f32 = k != 1, acc = k < 2;
            const float *want = acc ? gx : gn;
            rmsnorm_backward_cuda(ctx, dhi, ld, dlo, acc, f32 ? (const void *)dg : dgb, f32, dx, dw, drs, T, C);
            float *ghl = down_bf16(dhi, (size_t)(T * ld)), *glo = down_bf16(dlo, n), *ghi = xmalloc(sizeof(float) * n),
                  *gv = xmalloc(sizeof(float) * n);
            for (int64_t t = 0; t < T; t++) memcpy(ghi + t * C, ghl + t * ld, sizeof(float) * (size_t)C);
            int split = 1;
            for (size_t i = 0; i < n; i++) {
                gv[i] = ghi[i] + glo[i];
                split &= fabsf(glo[i]) <= fabsf(ghi[i]) * (1.0f / 256);  // at most half a bf16 step of hi
            }
            const char *what[3] = {"rmsnorm bwd hi + lo (f32 gout, +=)", "rmsnorm bwd hi + lo (bf16 gout, +=)",
                                   "rmsnorm bwd hi + lo (f32 gout, written)"};
            ck_assert_msg(split, "%s: lo is more than half a bf16 step of hi", what[k]);
            ck_assert(close_enough(what[k], gv, want, n, 1e-5 * max_abs(want, n), 1e-4));
            ck_assert(close_enough("rmsnorm bwd hi (the GEMM operand)", ghi, want, n, 1e-5 * max_abs(want, n), RT));
            for (int64_t t = 0; t < T; t++)  // the columns beside the row are left alone
                for (int64_t j = C; j < ld; j++) ck_assert(ghl[t * ld + j] == 0.0f);
            free(ghl), free(glo), free(ghi), free(gv);
            up_bf16(dhi, hil, (size_t)(T * ld));  // the held pair again for the next case
            up_bf16(dlo, lo0, n);
        }
        free(x), free(w), free(g), free(v0), free(hi0), free(lo0), free(hil), free(y), free(rs), free(gx), free(gn), free(gy),
            free(grs);
        cudaFree(dx), cudaFree(dy), cudaFree(dw), cudaFree(drs), cudaFree(dg), cudaFree(dgb), cudaFree(dlo), cudaFree(dhi);
    }
    cuda_ctx_free(ctx);
}
END_TEST

START_TEST(test_swiglu_embedding) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 404);
    int64_t T = 13;
    for (int I = 172; I <= 176; I += 4) {  // 172: the one-element path (stories260K), 176: 8 at a time
        size_t n = (size_t)(T * I);
        float *gu = rnd_bf16(&r, 2 * n, 2.0f), *go = rnd_bf16(&r, n, 0.5f);
        float *g = xmalloc(sizeof(float) * n), *u = xmalloc(sizeof(float) * n);
        for (int64_t t = 0; t < T; t++)
            for (int i = 0; i < I; i++) {
                g[t * I + i] = gu[t * 2 * I + i];
                u[t * I + i] = gu[t * 2 * I + I + i];
            }
        float *out = xmalloc(sizeof(float) * n), *gg = xcalloc(n, sizeof(float)), *gup = xcalloc(n, sizeof(float));
        swiglu_forward_cpu(out, g, u, (int64_t)n);
        swiglu_backward_cpu(gg, gup, go, g, u, (int64_t)n);
        void *dgu = dev_bf16(gu, 2 * n), *dout = dev_alloc(2 * n), *dgo = dev_bf16(go, n);
        swiglu_forward_cuda(ctx, dout, I, dgu, 2 * I, T, I);
        float *got = down_bf16(dout, n);
        ck_assert(close_enough("swiglu fwd", got, out, n, 1e-3 * max_abs(out, n), RT));
        swiglu_backward_cuda(ctx, dgu, 2 * I, dgo, T, I);
        float *gg2 = down_bf16(dgu, 2 * n), *ga = xmalloc(sizeof(float) * n), *gb = xmalloc(sizeof(float) * n);
        for (int64_t t = 0; t < T; t++)
            for (int i = 0; i < I; i++) {
                ga[t * I + i] = gg2[t * 2 * I + i];
                gb[t * I + i] = gg2[t * 2 * I + I + i];
            }
        ck_assert(close_enough("swiglu bwd dgate", ga, gg, n, 1e-3 * max_abs(gg, n), RT));
        ck_assert(close_enough("swiglu bwd dup", gb, gup, n, 1e-3 * max_abs(gup, n), RT));
        free(gu), free(go), free(g), free(u), free(out), free(gg), free(gup), free(got), free(gg2), free(ga), free(gb);
        cudaFree(dgu), cudaFree(dout), cudaFree(dgo);
    }
    // embedding: an exact copy of rows
    int V = 50, C = 64;
    float *table = rnd_bf16(&r, (size_t)V * C, 1.0f);
    int32_t ids[13];
    for (int t = 0; t < 13; t++) ids[t] = (int32_t)rng_next_below(&r, (uint64_t)V);
    float *e = xmalloc(sizeof(float) * 13 * (size_t)C);
    embedding_forward_cpu(e, ids, table, 13, C, V);
    void *dt = dev_bf16(table, (size_t)V * C), *de = dev_alloc(2 * 13 * (size_t)C);
    int32_t *dids = dev_up(ids, sizeof ids);
    embedding_forward_cuda(ctx, de, dids, dt, 13, C);
    float *ge = down_bf16(de, 13 * (size_t)C);
    ck_assert(close_enough("embedding", ge, e, 13 * (size_t)C, 0, 0));
    free(table), free(e), free(ge);
    cudaFree(dt), cudaFree(de), cudaFree(dids);
    cuda_ctx_free(ctx);
}
END_TEST

// ---- rope and attention ------------------------------------------------------------------------------

// token-major [B][S][H][D] -> head-major [B][H][S][D]
static void to_heads(float *dst, const float *src, int B, int S, int H, int D) {
    for (int b = 0; b < B; b++)
        for (int s = 0; s < S; s++)
            for (int h = 0; h < H; h++)
                memcpy(dst + (((size_t)b * H + h) * S + s) * D, src + (((size_t)b * S + s) * H + h) * D,
                       sizeof(float) * D);
}
START_TEST(test_rope) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 505);
    int B = 2, S = 19, Hq = 8, Hkv = 4, D = 16, W = (Hq + 2 * Hkv) * D;
    int64_t T = (int64_t)B * S;
    float inv[8];
    for (int i = 0; i < D / 2; i++) inv[i] = (float)(1.0 / pow(10000.0, 2.0 * i / D));
    float *cs = xmalloc(sizeof(float) * (size_t)S * D);
    rope_table_host(cs, inv, S, D);
    int32_t *pos = xmalloc(sizeof(int32_t) * (size_t)T);
    for (int64_t t = 0; t < T; t++) pos[t] = (int32_t)(t % S);
    float *dcs = dev_up(cs, sizeof(float) * (size_t)S * D);
    // forward: in place on the q and k heads of the token-major projection output, with a row stride past the
    // row (16-byte rows: the 8-pair kernel; an odd stride: the one-pair kernel). The v heads and the spare
    // columns keep their bits.
    int nh = Hq + Hkv;
    for (int lv = 0; lv < 2; lv++) {
        int64_t ld = lv ? W + 1 : W + 8;
        float *x = rnd_bf16(&r, (size_t)(T * ld), 1.0f), *want = xmalloc(sizeof(float) * (size_t)(T * ld));
        memcpy(want, x, sizeof(float) * (size_t)(T * ld));
        float *hx = xmalloc(sizeof(float) * (size_t)(T * nh * D));
        for (int64_t t = 0; t < T; t++) memcpy(hx + t * nh * D, x + t * ld, sizeof(float) * nh * D);
        rope_forward_cpu(hx, pos, inv, T, nh, D);
        for (int64_t t = 0; t < T; t++) memcpy(want + t * ld, hx + t * nh * D, sizeof(float) * nh * D);
        void *dx = dev_bf16(x, (size_t)(T * ld));
        rope_qk_cuda(ctx, dx, ld, dcs, B, S, Hq, Hkv, D);
        float *got = down_bf16(dx, (size_t)(T * ld));
        int64_t same = 0, kept = 0;
        for (int64_t t = 0; t < T; t++)
            for (int64_t c = (int64_t)nh * D; c < ld; c++) {
                kept++;
                same += !memcmp(&got[t * ld + c], &x[t * ld + c], sizeof(float));
            }
        ck_assert_msg(same == kept, "rope (ld %lld): %lld of %lld untouched elements changed", (long long)ld,
                      (long long)(kept - same), (long long)kept);
        ck_assert(close_enough("rope q, k", got, want, (size_t)(T * ld), 1e-3, RT));
        free(x), free(want), free(hx), free(got);
        cudaFree(dx);
    }
    // backward: head-major fp32 gradients -> token-major bf16 gqkv with the inverse rotation
    float *g = rnd_bf16(&r, (size_t)(T * W), 1.0f);
    float *gqt = xmalloc(sizeof(float) * (size_t)(T * Hq * D)), *gkt = xmalloc(sizeof(float) * (size_t)(T * Hkv * D)),
          *gvt = xmalloc(sizeof(float) * (size_t)(T * Hkv * D));
    for (int64_t t = 0; t < T; t++) {
        memcpy(gqt + t * Hq * D, g + t * W, sizeof(float) * Hq * D);
        memcpy(gkt + t * Hkv * D, g + t * W + Hq * D, sizeof(float) * Hkv * D);
        memcpy(gvt + t * Hkv * D, g + t * W + (Hq + Hkv) * D, sizeof(float) * Hkv * D);
    }
    float *hq = xmalloc(sizeof(float) * (size_t)(T * Hq * D)), *hk = xmalloc(sizeof(float) * (size_t)(T * Hkv * D)),
          *hv = xmalloc(sizeof(float) * (size_t)(T * Hkv * D));
    to_heads(hq, gqt, B, S, Hq, D);
    to_heads(hk, gkt, B, S, Hkv, D);
    to_heads(hv, gvt, B, S, Hkv, D);
    rope_backward_cpu(gqt, pos, inv, T, Hq, D);
    rope_backward_cpu(gkt, pos, inv, T, Hkv, D);
    float *ref = xmalloc(sizeof(float) * (size_t)(T * W));
    for (int64_t t = 0; t < T; t++) {
        memcpy(ref + t * W, gqt + t * Hq * D, sizeof(float) * Hq * D);
        memcpy(ref + t * W + Hq * D, gkt + t * Hkv * D, sizeof(float) * Hkv * D);
        memcpy(ref + t * W + (Hq + Hkv) * D, gvt + t * Hkv * D, sizeof(float) * Hkv * D);
    }
    float *dgq = dev_up(hq, sizeof(float) * (size_t)(T * Hq * D)),
          *dgk = dev_up(hk, sizeof(float) * (size_t)(T * Hkv * D)),
          *dgv = dev_up(hv, sizeof(float) * (size_t)(T * Hkv * D));
    void *dg = dev_alloc(2 * (size_t)(T * W));
    rope_merge_backward_cuda(ctx, dg, W, dgq, dgk, dgv, dcs, B, S, Hq, Hkv, D);
    float *got = down_bf16(dg, (size_t)(T * W));
    ck_assert(close_enough("rope merge backward", got, ref, (size_t)(T * W), 1e-3, RT));
    free(cs), free(pos), free(g), free(gqt), free(gkt), free(gvt), free(hq), free(hk), free(hv), free(ref), free(got);
    cudaFree(dcs), cudaFree(dgq), cudaFree(dgk), cudaFree(dgv), cudaFree(dg);
    cuda_ctx_free(ctx);
}
END_TEST

// One shape, one implementation (flash 0: the batched GEMMs; 1: the FlashAttention-style kernels; 2: with the
// warpgroup kernels where the device has them). The input is the q|k|v projection's output, token-major with
// a row stride past its width, rotated in place by rope_qk_cuda as the step does.
static void attention_case(cuda_ctx *ctx, int flash, int B, int S, int Hq, int Hkv, int D, uint64_t seed) {
    attention_use_flash(flash != 0);
    flash_attention_use_wgmma(flash == 2);
    fprintf(stderr, "attention %s B=%d S=%d Hq=%d Hkv=%d D=%d\n",
            !flash ? "gemm" : flash_attention_uses_wgmma(ctx, D) ? "flash (warpgroup)" : "flash", B, S, Hq, Hkv, D);
    rng_state r;
    rng_seed(&r, seed);
    int64_t T = (int64_t)B * S, nq = T * Hq * D, nk = T * Hkv * D;
    int64_t W = (int64_t)(Hq + 2 * Hkv) * D, ldx = W + 8;  // a row stride wider than the row
    int32_t *mask = xmalloc(sizeof(int32_t) * (size_t)T);
    for (int b = 0; b < B; b++)
        for (int s = 0; s < S; s++) mask[b * S + s] = b == 1 ? s < 25 : (b == 2 ? s >= 3 : 1);  // right / left padding
    float *x = rnd_bf16(&r, (size_t)(T * ldx), 1.0f);
    for (int64_t i = 0; i < 40; i++) x[i] = bf16_round(x[i] * 8.0f);  // a few sharp rows
    float *inv = xmalloc(sizeof(float) * (size_t)(D / 2));
    for (int i = 0; i < D / 2; i++) inv[i] = (float)(1.0 / pow(10000.0, 2.0 * i / D));
    float *cs = xmalloc(sizeof(float) * (size_t)S * D);
    rope_table_host(cs, inv, S, D);
    int32_t *pos = xmalloc(sizeof(int32_t) * (size_t)T);
    for (int64_t t = 0; t < T; t++) pos[t] = (int32_t)(t % S);
    // the CPU twin's inputs: q and k rotated and rounded to bf16 (as the GPU keeps them), v as it is
    float *q = xmalloc(sizeof(float) * (size_t)nq), *k = xmalloc(sizeof(float) * (size_t)nk),
          *v = xmalloc(sizeof(float) * (size_t)nk);
    for (int64_t t = 0; t < T; t++) {
        memcpy(q + t * Hq * D, x + t * ldx, sizeof(float) * Hq * D);
        memcpy(k + t * Hkv * D, x + t * ldx + Hq * D, sizeof(float) * Hkv * D);
        memcpy(v + t * Hkv * D, x + t * ldx + (Hq + Hkv) * D, sizeof(float) * Hkv * D);
    }
    rope_forward_cpu(q, pos, inv, T, Hq, D);
    rope_forward_cpu(k, pos, inv, T, Hkv, D);
    for (int64_t i = 0; i < nq; i++) q[i] = bf16_round(q[i]);
    for (int64_t i = 0; i < nk; i++) k[i] = bf16_round(k[i]);
    float *out = xmalloc(sizeof(float) * (size_t)nq);
    attention_forward_cpu(out, q, k, v, mask, B, S, Hq, Hkv, D);
    void *dx = dev_bf16(x, (size_t)(T * ldx));
    float *dcs = dev_up(cs, sizeof(float) * (size_t)S * D);
    int32_t *dm = dev_up(mask, sizeof(int32_t) * (size_t)T);
    int bc = 2;  // two chunks (the second one partial)
    size_t sb = attention_scratch_bytes(bc, S, Hq, Hkv, D), sf = flash_attention_scratch_bytes(bc, S, Hq);
    void *scratch = dev_alloc(sb > sf ? sb : sf);
    void *dout = dev_alloc(2 * (size_t)nq), *otmp = dev_alloc(2 * (size_t)nq);
    float *lse = dev_alloc(sizeof(float) * (size_t)(T * Hq));
    rope_qk_cuda(ctx, dx, ldx, dcs, B, S, Hq, Hkv, D);
    attention_forward_cuda(ctx, dout, (int64_t)Hq * D, lse, dx, ldx, dm, B, S, Hq, Hkv, D, scratch, bc, otmp);
    float *got = down_bf16(dout, (size_t)nq);
    double mx = max_abs(out, (size_t)nq);
    ck_assert(close_enough("attention fwd", got, out, (size_t)nq, 1e-2 * mx, 1.0 / 64));
    ck_assert(rel_l2(got, out, (size_t)nq) < 1e-2);
    {  // q and k rotated (what the backward reads); v and the spare columns keep their bits
        float *xr = down_bf16(dx, (size_t)(T * ldx)), *want = xmalloc(sizeof(float) * (size_t)(T * ldx));
        memcpy(want, x, sizeof(float) * (size_t)(T * ldx));
        int64_t kept = 0;
        for (int64_t t = 0; t < T; t++) {
            memcpy(want + t * ldx, q + t * Hq * D, sizeof(float) * Hq * D);
            memcpy(want + t * ldx + Hq * D, k + t * Hkv * D, sizeof(float) * Hkv * D);
            for (int64_t c = (Hq + Hkv) * D; c < ldx; c++) kept += !memcmp(&xr[t * ldx + c], &x[t * ldx + c], sizeof(float));
        }
        ck_assert_msg(kept == T * (ldx - (Hq + Hkv) * D), "attention fwd: v or the spare columns changed");
        ck_assert(close_enough("attention fwd: q, k rotated", xr, want, (size_t)(T * ldx), 1e-3, RT));
        free(xr), free(want);
    }
    // backward, into the fused projection's gradient gqkv [T][W] with RoPE's inverse rotation
    float *go = rnd_bf16(&r, (size_t)nq, 1.0f);
    float *gq = xcalloc((size_t)nq, sizeof(float)), *gk = xcalloc((size_t)nk, sizeof(float)),
          *gv = xcalloc((size_t)nk, sizeof(float));
    // the CPU twin on the GPU's bf16 output (delta uses it), its inputs otherwise
    attention_backward_cpu(gq, gk, gv, go, q, k, v, mask, B, S, Hq, Hkv, D);
    rope_backward_cpu(gq, pos, inv, T, Hq, D);
    rope_backward_cpu(gk, pos, inv, T, Hkv, D);
    int64_t ldg = W + 8;  // a row stride wider than the row (the adapter's columns)
    void *dgo = dev_bf16(go, (size_t)nq);
    void *dg = dev_alloc(2 * (size_t)(T * ldg));
    float *dgq = dev_alloc(4 * (size_t)nq), *dgk = dev_alloc(4 * (size_t)nk), *dgv = dev_alloc(4 * (size_t)nk);
    float *delta = dev_alloc(4 * (size_t)(T * Hq));
    void *dotmp = dev_alloc(2 * (size_t)nq);
    attention_backward_cuda(ctx, dg, ldg, dcs, dgo, dout, (int64_t)Hq * D, lse, dx, ldx, dm, B, S, Hq, Hkv, D, delta,
                            scratch, bc, dotmp, dgq, dgk, dgv);
    float *hg = down_bf16(dg, (size_t)(T * ldg));
    float *tq = xmalloc(sizeof(float) * (size_t)nq), *tk = xmalloc(sizeof(float) * (size_t)nk),
          *tv = xmalloc(sizeof(float) * (size_t)nk);
    for (int64_t t = 0; t < T; t++) {
        memcpy(tq + t * Hq * D, hg + t * ldg, sizeof(float) * Hq * D);
        memcpy(tk + t * Hkv * D, hg + t * ldg + Hq * D, sizeof(float) * Hkv * D);
        memcpy(tv + t * Hkv * D, hg + t * ldg + (Hq + Hkv) * D, sizeof(float) * Hkv * D);
    }
    const char *nm[3] = {"attention bwd dq", "attention bwd dk", "attention bwd dv"};
    float *gs[3] = {tq, tk, tv}, *rs[3] = {gq, gk, gv};
    size_t ns[3] = {(size_t)nq, (size_t)nk, (size_t)nk};
    int ok[3];  // all three compared (and printed) before the first failure stops the test
    for (int i = 0; i < 3; i++) ok[i] = close_enough(nm[i], gs[i], rs[i], ns[i], 2e-2 * max_abs(rs[i], ns[i]), 1.0 / 64);
    for (int i = 0; i < 3; i++) {
        ck_assert_msg(ok[i], "%s: beyond the tolerance", nm[i]);
        ck_assert_msg(rel_l2(gs[i], rs[i], ns[i]) < 1e-2, "%s: rel L2 %g", nm[i], rel_l2(gs[i], rs[i], ns[i]));
    }
    free(mask), free(x), free(q), free(k), free(v), free(out), free(got), free(go), free(gq), free(gk);
    free(gv), free(hg), free(tq), free(tk), free(tv), free(inv), free(cs), free(pos);
    cudaFree(dx), cudaFree(dm), cudaFree(scratch), cudaFree(dout), cudaFree(otmp),
        cudaFree(lse);
    cudaFree(dgo), cudaFree(dgq), cudaFree(dgk), cudaFree(dgv), cudaFree(delta), cudaFree(dotmp), cudaFree(dcs),
        cudaFree(dg);
}

START_TEST(test_attention) {
    cuda_ctx *ctx = ctx_new();
    for (int flash = 0; flash < 2; flash++) {
        attention_case(ctx, flash, 3, 37, 8, 2, 16, 606);  // GQA, padding, S not a tile multiple
        attention_case(ctx, flash, 2, 130, 4, 4, 128, 607);  // MHA at a real head size, 3 tiles
        attention_case(ctx, flash, 2, 70, 4, 1, 64, 608);
        attention_case(ctx, flash, 3, 200, 8, 2, 128, 609);  // GQA at D = 128, several key and query tiles
        attention_case(ctx, flash, 2, 96, 4, 2, 32, 610);
    }
    // the warpgroup kernels (D 128 only): the same D 128 cases, and one with S a multiple of 64
    attention_case(ctx, 2, 2, 130, 4, 4, 128, 607);
    attention_case(ctx, 2, 3, 200, 8, 2, 128, 609);
    attention_case(ctx, 2, 2, 256, 6, 2, 128, 611);
    attention_use_flash(1);
    flash_attention_use_wgmma(1);
    cuda_ctx_free(ctx);
}
END_TEST

// ---- loss ------------------------------------------------------------------------------------------

// The training path's numerics on the CPU, from the fp32 logits lg[T][V]: each logit rounded to bf16 (as
// transformers' bf16 lm_head gives them), the CPU twin's row (ce_row_cpu), dlogits rounded to bf16, then
// gh = dlogits W. Returns the loss summed over the supervised rows.
static double ce_bf16_logits_cpu(const float *lg, const float *W, const int32_t *tg, int64_t T, int C, int V, float scale,
                                 float *gh) {
    double loss = 0.0;
    float *dl = xmalloc(sizeof(float) * (size_t)V);
    for (int64_t t = 0; t < T; t++) {
        float *g = gh + t * C;
        memset(g, 0, sizeof(float) * (size_t)C);
        if (tg[t] == OPS_IGNORE_INDEX) continue;
        for (int j = 0; j < V; j++) dl[j] = bf16_round(lg[t * V + j]);
        loss += ce_row_cpu(dl, V, tg[t], scale, 1);
        for (int j = 0; j < V; j++) {
            float d = bf16_round(dl[j]);
            for (int i = 0; i < C; i++) g[i] += d * W[(size_t)j * C + i];
        }
    }
    free(dl);
    return loss;
}

// Every row's logits (forward_logits: no gradient) go through fp32 logits, the rest through bf16 ones.
// 16-byte paths: fp32 logits when V % 4 == 0, bf16 when V % 8 == 0; other V the scalar ones.
static void check_lmhead_ce(int V) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 707);
    int64_t T = 50;
    int C = 64;
    float *h = rnd_bf16(&r, (size_t)(T * C), 1.0f), *W = rnd_bf16(&r, (size_t)V * C, 0.5f);
    int32_t *tg = xmalloc(sizeof(int32_t) * (size_t)T);
    for (int64_t t = 0; t < T; t++) tg[t] = t % 7 == 3 ? OPS_IGNORE_INDEX : (int32_t)rng_next_below(&r, (uint64_t)V);
    float scale = 1.0f / 43.0f;
    float *gh = xcalloc((size_t)(T * C), sizeof(float)), *lg = xmalloc(sizeof(float) * (size_t)(T * V));
    int64_t cnt;
    double loss = lmhead_ce_forward_backward_cpu(h, W, tg, T, C, V, scale, gh, lg, &cnt);
    void *dh = dev_bf16(h, (size_t)(T * C)), *dW = dev_bf16(W, (size_t)V * C);
    int32_t *dtg = dev_up(tg, sizeof(int32_t) * (size_t)T);
    float *dgh = dev_alloc(4 * (size_t)(T * C)), *drl = dev_alloc(4 * (size_t)T);
    int64_t rows = 48;  // several chunks (half the rows a pass with fp32 logits: 17, 17, 16; 25, 25 with bf16)
    void *scratch = dev_alloc(lmhead_ce_scratch_bytes(rows, C, V));
    float *glg = xmalloc(sizeof(float) * (size_t)(T * V));
    lmhead_ce_cuda(ctx, dh, dW, dtg, T, C, V, scale, NULL, drl, glg, scratch, rows, NULL, 0, 0);
    float *rl = down_f32(drl, (size_t)T);
    double gl = 0;
    for (int64_t t = 0; t < T; t++) gl += rl[t];
    fprintf(stderr, "lm_head CE loss (V %d): GPU %.9g, CPU %.9g\n", V, gl, loss);
    ck_assert_msg(fabs(gl - loss) <= 1e-5 * fabs(loss), "loss %.9g vs %.9g", gl, loss);
    ck_assert(
        close_enough("lm_head logits (f32)", glg, lg, (size_t)(T * V), 1e-5 * max_abs(lg, (size_t)(T * V)), 1e-5));
    // Every row with the gradient: bf16 logits, against the CPU's fp32 logits rounded to bf16 (a logit
    // next to a rounding boundary can round the other way after a different fp32 summation order: 1e-4
    // on the loss), and dh against the CPU's fp32 dh as well.
    float *ghb = xmalloc(sizeof(float) * (size_t)(T * C));
    double loss_b = ce_bf16_logits_cpu(lg, W, tg, T, C, V, scale, ghb);
    lmhead_ce_cuda(ctx, dh, dW, dtg, T, C, V, scale, dgh, drl, NULL, scratch, rows, NULL, 0, 0);
    free(rl);
    rl = down_f32(drl, (size_t)T);
    float *ggh = down_f32(dgh, (size_t)T * C);
    gl = 0;
    for (int64_t t = 0; t < T; t++) gl += rl[t];
    fprintf(stderr, "lm_head CE loss, bf16 logits: GPU %.9g, CPU %.9g (fp32 logits %.9g)\n", gl, loss_b, loss);
    ck_assert_msg(fabs(gl - loss_b) <= 1e-4 * fabs(loss_b), "loss %.9g vs %.9g", gl, loss_b);
    ck_assert(close_enough("lm_head CE dh (bf16 twin)", ggh, ghb, (size_t)(T * C), 2e-2 * max_abs(ghb, (size_t)(T * C)),
                           1.0 / 64));
    ck_assert(close_enough("lm_head CE dh", ggh, gh, (size_t)(T * C), 2e-2 * max_abs(gh, (size_t)(T * C)), 1.0 / 64));
    ck_assert(rel_l2(ggh, gh, (size_t)(T * C)) < 1e-2);
    // The training path: only the supervised rows (gathered, then their dh scattered back), the list
    // padded with copies of its first row as the step pads it (the pads must write nothing); the other
    // rows of row_loss and gh must come out zero although both start as garbage (NaN bytes). bf16
    // logits, against the same twin.
    int32_t *list = xmalloc(sizeof(int32_t) * (size_t)T);
    int64_t n = 0;
    for (int64_t t = 0; t < T; t++)
        if (tg[t] != OPS_IGNORE_INDEX) list[n++] = (int32_t)t;
    ck_assert_int_eq(n, cnt);
    int64_t n_list = (n + 15) / 16 * 16 < T ? (n + 15) / 16 * 16 : T;
    ck_assert_int_gt(n_list, n);  // this shape has pads
    for (int64_t i = n; i < n_list; i++) list[i] = list[0];
    int32_t *dlist = dev_up(list, sizeof(int32_t) * (size_t)n_list);
    CK_CUDA(cudaMemset(dgh, 0xff, 4 * (size_t)(T * C)));
    CK_CUDA(cudaMemset(drl, 0xff, 4 * (size_t)T));
    CK_CUDA(cudaDeviceSynchronize());  // (cudaMemset is not ordered with ctx's non-blocking stream)
    lmhead_ce_cuda(ctx, dh, dW, dtg, T, C, V, scale, dgh, drl, NULL, scratch, 16, dlist, n, n_list);  // 3 chunks
    free(rl), free(ggh);
    rl = down_f32(drl, (size_t)T), ggh = down_f32(dgh, (size_t)T * C);
    gl = 0;
    for (int64_t t = 0; t < T; t++) {
        gl += rl[t];
        if (tg[t] == OPS_IGNORE_INDEX) {
            ck_assert_msg(rl[t] == 0.0f, "row %lld left out: loss %g", (long long)t, rl[t]);
            for (int i = 0; i < C; i++) ck_assert_msg(ggh[t * C + i] == 0.0f, "row %lld left out: dh %g", (long long)t, ggh[t * C + i]);
        }
    }
    fprintf(stderr, "lm_head CE loss, supervised rows, bf16 logits: GPU %.9g, CPU %.9g\n", gl, loss_b);
    ck_assert_msg(fabs(gl - loss_b) <= 1e-4 * fabs(loss_b), "loss %.9g vs %.9g", gl, loss_b);
    ck_assert(
        close_enough("lm_head CE dh (rows)", ggh, ghb, (size_t)(T * C), 2e-2 * max_abs(ghb, (size_t)(T * C)), 1.0 / 64));
    ck_assert(rel_l2(ggh, ghb, (size_t)(T * C)) < 1e-2);
    free(list);
    cudaFree(dlist);
    free(h), free(W), free(tg), free(gh), free(ghb), free(lg), free(glg), free(rl), free(ggh);
    cudaFree(dh), cudaFree(dW), cudaFree(dtg), cudaFree(dgh), cudaFree(drl), cudaFree(scratch);
    cuda_ctx_free(ctx);
}

START_TEST(test_lmhead_ce) {
    check_lmhead_ce(1000);
    check_lmhead_ce(1001);
    check_lmhead_ce(1004);
}
END_TEST

// ---- optimizer ---------------------------------------------------------------------------------------

START_TEST(test_adamw_norm) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 808);
    int64_t n = 100003;
    float *p = rnd_bf16(&r, (size_t)n, 0.1f), *g = rnd_bf16(&r, (size_t)n, 0.01f), *m = rnd_bf16(&r, (size_t)n, 0.01f);
    float *v = xmalloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) v[i] = fabsf(rnd_normal(&r)) * 1e-4f;
    for (int with_scale = 0; with_scale < 2; with_scale++) {
        float gs = with_scale ? 0.37f : 1.0f;
        float *dp = dev_up(p, 4 * (size_t)n), *dg = dev_up(g, 4 * (size_t)n), *dm = dev_up(m, 4 * (size_t)n),
              *dv = dev_up(v, 4 * (size_t)n);
        float *cp = xmalloc(4 * (size_t)n), *cg = xmalloc(4 * (size_t)n), *cm = xmalloc(4 * (size_t)n),
              *cv = xmalloc(4 * (size_t)n);
        memcpy(cp, p, 4 * (size_t)n), memcpy(cg, g, 4 * (size_t)n), memcpy(cm, m, 4 * (size_t)n),
            memcpy(cv, v, 4 * (size_t)n);
        for (int step = 1; step <= 3; step++) {
            if (gs != 1.0f)
                for (int64_t i = 0; i < n; i++) cg[i] = g[i] * gs;
            adamw_update_cpu(cp, cg, cm, cv, n, 1e-3, 0.9, 0.999, 1e-8, 0.01, step);
            adamw_cuda(ctx, dp, dg, dm, dv, n, gs, 1e-3, 0.9, 0.999, 1e-8, 0.01, step);
        }
        float *hp = down_f32(dp, (size_t)n), *hm = down_f32(dm, (size_t)n), *hv = down_f32(dv, (size_t)n);
        ck_assert_msg(memcmp(hp, cp, 4 * (size_t)n) == 0, "AdamW params differ from the CPU (scale %g)", (double)gs);
        ck_assert_msg(memcmp(hm, cm, 4 * (size_t)n) == 0, "AdamW m differs");
        ck_assert_msg(memcmp(hv, cv, 4 * (size_t)n) == 0, "AdamW v differs");
        fprintf(stderr, "adamw (3 steps, grad scale %.2f): bit-identical to adamw_update_cpu\n", (double)gs);
        free(cp), free(cg), free(cm), free(cv), free(hp), free(hm), free(hv);
        cudaFree(dp), cudaFree(dg), cudaFree(dm), cudaFree(dv);
    }
    float *dg = dev_up(g, 4 * (size_t)n);
    void *part = dev_alloc(reduce_scratch_bytes(n));
    double a = sum_squares_cuda(ctx, dg, n, part), b = global_norm_sq_cpu(g, n);
    double a2 = sum_squares_cuda(ctx, dg, n, part);
    fprintf(stderr, "grad norm^2: GPU %.17g, CPU %.17g\n", a, b);
    ck_assert_msg(fabs(a - b) <= 1e-12 * b, "norm %.17g vs %.17g", a, b);
    ck_assert_msg(a == a2, "the reduction is not deterministic");
    free(p), free(g), free(m), free(v);
    cudaFree(dg), cudaFree(part);
    cuda_ctx_free(ctx);
}
END_TEST

// ---- adapters ------------------------------------------------------------------------------------------

static llama_config tiny_config(void) {
    llama_config c;
    memset(&c, 0, sizeof c);
    c.hidden = 64;
    c.intermediate = 176;
    c.n_layers = 3;
    c.n_heads = 8;
    c.n_kv_heads = 2;
    c.head_dim = 8;
    c.vocab = 100;
    c.rms_eps = 1e-5;
    c.rope_theta = 10000;
    return c;
}

static void gather_scatter_check(cuda_ctx *ctx, adapter *ad, const char *what) {
    rng_state r;
    rng_seed(&r, 909);
    for (size_t i = 0; i < ad->n_params; i++) ad->params[i] = rnd_normal(&r) * 0.1f;
    float *dparams = dev_up(ad->params, 4 * ad->n_params);
    float *grad = xcalloc(ad->n_params, sizeof(float));
    float *dgrad = dev_up(grad, 4 * ad->n_params);
    float *dgrad3 = dev_up(grad, 4 * ad->n_params);  // the same scatters, up to 3 modules a launch
    int L = ad->model.n_layers, rk = ad->rank, l = lowrank_map_shards(ad);
    int64_t *offA = xmalloc(sizeof(int64_t) * (size_t)rk * l), *offB = xmalloc(sizeof(int64_t) * (size_t)rk * l);
    float *scale = xmalloc(sizeof(float) * (size_t)rk);
    // the batched gather (one launch for every (layer, module)) writes B with a wider row stride (as into
    // a group's block-diagonal B): the jobs, the CPU's factors, and the device buffers for it
    enum { PADB = 3 };
    lowrank_gather_job *jobs = xcalloc((size_t)L * MOD_COUNT, sizeof *jobs);
    float **cA = xcalloc((size_t)L * MOD_COUNT, sizeof *cA), **cB = xcalloc((size_t)L * MOD_COUNT, sizeof *cB);
    int nj = 0;
    int64_t nmax = 0;
    for (int li = 0; li < L; li++) {
        lowrank_map lm[MOD_COUNT];
        const float *lA[MOD_COUNT], *lB[MOD_COUNT];
        int nl = 0;
        for (int m = 0; m < MOD_COUNT; m++) {
            if (!adapter_targets(ad, m)) continue;
            int di, dout, hs, lo, sB;
            llama_module_dims(&ad->model, m, &di, &dout);
            ck_assert_int_eq(lowrank_map_host(ad, li, m, offA, offB, scale, &hs, &lo, &sB), MOSFT_OK);
            lowrank_map mp = {.r = rk,
                              .l = lo,
                              .d_in = di,
                              .d_out = dout,
                              .strideB = sB,
                              .scaleB = 1.0f,
                              .offA = dev_up(offA, 8 * (size_t)rk * lo),
                              .offB = dev_up(offB, 8 * (size_t)rk * lo),
                              .scaleA = hs ? dev_up(scale, 4 * (size_t)rk) : NULL,
                              .ldB = rk};
            float *A = xmalloc(sizeof(float) * (size_t)rk * di), *B = xmalloc(sizeof(float) * (size_t)dout * rk);
            ad->ops->build(ad, li, m, A, B);
            void *dA = dev_alloc(2 * (size_t)rk * di), *dB = dev_alloc(2 * (size_t)dout * rk);
            lowrank_gather_job one = {mp, dA, dB};  // this map alone, B with row stride r
            void *done = dev_up(&one, sizeof one);
            lowrank_gather_batch_cuda(ctx, done, 1, (int64_t)rk * (di > dout ? di : dout), dparams);
            cudaFree(done);
            float *gA = down_bf16(dA, (size_t)rk * di), *gB = down_bf16(dB, (size_t)dout * rk);
            for (size_t i = 0; i < (size_t)rk * di; i++)
                ck_assert_msg(gA[i] == bf16_round(A[i]), "%s: gathered A differs", what);
            for (size_t i = 0; i < (size_t)dout * rk; i++)
                ck_assert_msg(gB[i] == bf16_round(B[i]), "%s: gathered B differs", what);
            lowrank_gather_job *jb = &jobs[nj];
            jb->mp = mp;
            jb->mp.ldB = rk + PADB;
            jb->A = dev_alloc(2 * (size_t)rk * di);
            jb->B = dev_alloc(2 * (size_t)dout * (rk + PADB));
            CK_CUDA(cudaMemset(jb->B, 0, 2 * (size_t)dout * (rk + PADB)));
            CK_CUDA(cudaDeviceSynchronize());  // (cudaMemset is not ordered with ctx's non-blocking stream)
            cA[nj] = A;
            cB[nj] = B;
            nj++;
            if ((int64_t)rk * di > nmax) nmax = (int64_t)rk * di;
            if ((int64_t)dout * rk > nmax) nmax = (int64_t)dout * rk;
            // scatter: random factor gradients, all layers into one buffer in order
            float *fA = rnd_bf16(&r, (size_t)rk * di, 1.0f), *fB = rnd_bf16(&r, (size_t)dout * rk, 1.0f);
            float *dfA = dev_up(fA, 4 * (size_t)rk * di), *dfB = dev_up(fB, 4 * (size_t)dout * rk);
            ad->ops->scatter(ad, li, m, fA, fB, grad);
            lowrank_scatter_cuda(ctx, &mp, dfA, dfB, dgrad);
            CK_CUDA(cudaDeviceSynchronize());
            lm[nl] = mp, lA[nl] = dfA, lB[nl] = dfB, nl++;
            free(gA), free(gB), free(fA), free(fB);
            cudaFree(dA), cudaFree(dB);
        }
        for (int i = 0; i < nl; i += 3) lowrank_scatter_group_cuda(ctx, lm + i, nl - i < 3 ? nl - i : 3, lA + i, lB + i, dgrad3);
        CK_CUDA(cudaDeviceSynchronize());
        for (int i = 0; i < nl; i++) cudaFree((void *)lA[i]), cudaFree((void *)lB[i]);
    }
    lowrank_gather_job *djobs = dev_up(jobs, sizeof *jobs * (size_t)nj);
    lowrank_gather_batch_cuda(ctx, djobs, nj, nmax, dparams);
    CK_CUDA(cudaDeviceSynchronize());
    for (int j = 0; j < nj; j++) {
        lowrank_map *mp = &jobs[j].mp;
        int64_t na = (int64_t)rk * mp->d_in, nb = (int64_t)mp->d_out * (rk + PADB);
        float *gA = down_bf16(jobs[j].A, (size_t)na), *gB = down_bf16(jobs[j].B, (size_t)nb);
        for (int64_t i = 0; i < na; i++) ck_assert_msg(gA[i] == bf16_round(cA[j][i]), "%s: batched gather: A differs", what);
        for (int64_t d = 0; d < mp->d_out; d++)
            for (int k = 0; k < rk + PADB; k++)
                ck_assert_msg(gB[d * (rk + PADB) + k] == (k < rk ? bf16_round(cB[j][d * rk + k]) : 0.0f),
                              "%s: batched gather: B differs (row %lld, column %d)", what, (long long)d, k);
        free(gA), free(gB), free(cA[j]), free(cB[j]);
        cudaFree(jobs[j].A), cudaFree(jobs[j].B), cudaFree((void *)mp->offA), cudaFree((void *)mp->offB);
        if (mp->scaleA) cudaFree((void *)mp->scaleA);
    }
    cudaFree(djobs);
    free(jobs), free(cA), free(cB);
    float *got = down_f32(dgrad, ad->n_params);
    ck_assert_msg(memcmp(got, grad, 4 * ad->n_params) == 0, "%s: scattered gradients differ from the CPU", what);
    free(got);
    got = down_f32(dgrad3, ad->n_params);
    ck_assert_msg(memcmp(got, grad, 4 * ad->n_params) == 0, "%s: scattered gradients (3 modules a launch) differ from the CPU",
                  what);
    fprintf(stderr, "adapter %-26s gather (one map, all maps) and scatter bit-identical (%zu params, %d maps)\n", what,
            ad->n_params, nj);
    free(got), free(grad), free(offA), free(offB), free(scale);
    cudaFree(dparams), cudaFree(dgrad), cudaFree(dgrad3);
}

START_TEST(test_adapter_gather_scatter) {
    cuda_ctx *ctx = ctx_new();
    llama_config c = tiny_config();
    adapter_spec s;
    memset(&s, 0, sizeof s);
    snprintf(s.method, sizeof s.method, "mos");
    s.r = 4;
    s.equiv_rank = 4;
    s.private_rank = 1;
    s.shards = 4;
    s.alpha = 8;
    s.seed = 3;
    s.pair_dissociation = 1;
    s.scale_mean = 1;
    for (int m = 0; m < MOD_COUNT; m++) s.targets[m] = 1;
    adapter *ad;
    ck_assert_int_eq(adapter_create(&ad, &s, &c), MOSFT_OK);
    gather_scatter_check(ctx, ad, "mos r4 Rv4 Rp1 l4");
    adapter_free(ad);
    s.scale_std = 0.3;  // random scaling ablation: the A factors carry per-rank scales
    ck_assert_int_eq(adapter_create(&ad, &s, &c), MOSFT_OK);
    gather_scatter_check(ctx, ad, "mos, random scaling");
    adapter_free(ad);
    snprintf(s.method, sizeof s.method, "lora");
    s.scale_std = 0;
    s.targets[MOD_K] = 0;
    ck_assert_int_eq(adapter_create(&ad, &s, &c), MOSFT_OK);
    gather_scatter_check(ctx, ad, "lora r4 (no k)");
    adapter_free(ad);
    // a group's blocks into its K-augmented weight buffer: B beside the weight's rows, A below them, the
    // weight itself untouched; the vector kernel (R, d_in, ld multiples of 8) and the 2D-copy fallback
    int shapes[][4] = {{96, 4096 / 16, 12288 / 16, 96}, {32, 88, 40, 32}, {4, 64, 24, 4}, {48, 176, 64, 56}};
    for (int k = 0; k < 4; k++) {
        int R = shapes[k][0], di = shapes[k][1], dout = shapes[k][2], rpad = shapes[k][3];
        int64_t ld = di + rpad, nbuf = (int64_t)(dout + rpad) * ld;
        rng_state r;
        rng_seed(&r, 77 + k);
        float *B = rnd_bf16(&r, (size_t)dout * R, 1.0f), *A = rnd_bf16(&r, (size_t)R * di, 1.0f);
        float *W = rnd_bf16(&r, (size_t)nbuf, 1.0f);
        bf16 *dB = dev_bf16(B, (size_t)dout * R), *dA = dev_bf16(A, (size_t)R * di), *dW = dev_bf16(W, (size_t)nbuf);
        adapter_blocks_cuda(cuda_ctx_stream(ctx), dW, ld, di, dout, dB, dA, R);
        CK_CUDA(cudaDeviceSynchronize());
        float *got = down_bf16(dW, (size_t)nbuf);
        for (int64_t i = 0; i < dout + rpad; i++)
            for (int64_t j = 0; j < ld; j++) {
                float want = W[i * ld + j];
                if (i < dout && j >= di && j < di + R) want = B[i * R + (j - di)];
                if (i >= dout && i < dout + R && j < di) want = A[(i - dout) * di + j];
                ck_assert_msg(got[i * ld + j] == want, "adapter blocks R %d d_in %d: element (%lld, %lld) differs", R, di,
                              (long long)i, (long long)j);
            }
        fprintf(stderr, "adapter blocks R %-3d d_in %-4d d_out %-4d ld %-5lld into the weight buffer: exact\n", R, di, dout,
                (long long)ld);
        free(B), free(A), free(W), free(got);
        cudaFree(dB), cudaFree(dA), cudaFree(dW);
    }
    cuda_ctx_free(ctx);
}
END_TEST

// A CPU mask stream of T x d multipliers (adapter_dropout_mask) as the device's kept bits (bit e set <=>
// element e kept, dropout_mask_words words).
static uint32_t *dev_mask_bits(const float *mask, int64_t T, int d) {
    int64_t words = dropout_mask_words(T, d);
    uint32_t *hb = xcalloc((size_t)words, sizeof(uint32_t));
    for (int64_t e = 0; e < T * d; e++)
        if (mask[e] != 0.0f) hb[e >> 5] |= 1u << (e & 31);
    uint32_t *db = dev_up(hb, sizeof(uint32_t) * (size_t)words);
    free(hb);
    return db;
}

// Backward of a group of n modules with dropout: gx += sum_i mask_i * (gh_i A_i), into fp32 and into
// bf16, against a double CPU sum with the CPU's masks (adapter_dropout_mask).
static void check_dropout_dx(cuda_ctx *ctx, rng_state *r, int64_t T, int d, int ldx, int n, int rk, int ldgh, float p,
                             const char *what) {
    float *gh = rnd_bf16(r, (size_t)(T * ldgh), 1.0f), *A = rnd_bf16(r, (size_t)(n * rk * d), 0.2f);
    float *gx = rnd_bf16(r, (size_t)(T * ldx), 1.0f);
    uint64_t keys[3];
    float *masks = xmalloc(sizeof(float) * (size_t)(n * T * d));
    for (int i = 0; i < n; i++) {
        keys[i] = rng_key(RNG_DROPOUT, 5, 6, 7, 20 + i);
        adapter_dropout_mask(keys[i], p, (size_t)(T * d), masks + (size_t)i * T * d);
    }
    double *add = xcalloc((size_t)(T * d), sizeof(double));
    for (int i = 0; i < n; i++)
        for (int64_t t = 0; t < T; t++)
            for (int c = 0; c < d; c++) {
                double acc = 0;
                for (int k = 0; k < rk; k++) acc += (double)gh[t * ldgh + i * rk + k] * A[((int64_t)i * rk + k) * d + c];
                add[t * d + c] += acc * masks[(size_t)i * T * d + t * d + c];
            }
    float *want = xmalloc(sizeof(float) * (size_t)(T * ldx)), *wantb = xmalloc(sizeof(float) * (size_t)(T * ldx));
    for (int64_t t = 0; t < T; t++)
        for (int c = 0; c < ldx; c++) {
            want[t * ldx + c] = c < d ? (float)(gx[t * ldx + c] + add[t * d + c]) : gx[t * ldx + c];
            wantb[t * ldx + c] = c < d ? (float)(bf16_round(gx[t * ldx + c]) + add[t * d + c]) : bf16_round(gx[t * ldx + c]);
        }
    void *dgh = dev_bf16(gh, (size_t)(T * ldgh)), *dA = dev_bf16(A, (size_t)(n * rk * d));
    // from the generator, and (d % 32 == 0) from the masks as kept bits (packed here from the CPU's masks)
    uint32_t *dbits[3] = {NULL, NULL, NULL};
    for (int i = 0; d % 32 == 0 && i < n; i++) dbits[i] = dev_mask_bits(masks + (size_t)i * T * d, T, d);
    for (int from_bits = 0; from_bits <= (d % 32 == 0); from_bits++) {
        const uint32_t *const *bp = from_bits ? (const uint32_t *const *)dbits : NULL;
        float *dgx = dev_up(gx, 4 * (size_t)(T * ldx));
        lowrank_dropout_dx_cuda(ctx, dgx, 1, ldx, dgh, ldgh, dA, n, rk, T, d, keys, rng_dropout_threshold16(p),
                                1.0f / (1.0f - p), bp);
        float *got = down_f32(dgx, (size_t)(T * ldx));
        char name[160];
        snprintf(name, sizeof name, "dropout dx, %s (f32 +=%s)", what, from_bits ? ", kept bits" : "");
        ck_assert(close_enough(name, got, want, (size_t)(T * ldx), 1e-5, 1e-5));
        void *dgb = dev_bf16(gx, (size_t)(T * ldx));
        lowrank_dropout_dx_cuda(ctx, dgb, 0, ldx, dgh, ldgh, dA, n, rk, T, d, keys, rng_dropout_threshold16(p),
                                1.0f / (1.0f - p), bp);
        float *gotb = down_bf16(dgb, (size_t)(T * ldx));
        snprintf(name, sizeof name, "dropout dx, %s (bf16 +=%s)", what, from_bits ? ", kept bits" : "");
        ck_assert(close_enough(name, gotb, wantb, (size_t)(T * ldx), 1e-3, 1.0 / 128));
        free(got), free(gotb);
        cudaFree(dgx), cudaFree(dgb);
    }
    for (int i = 0; i < 3; i++) cudaFree(dbits[i]);
    free(gh), free(A), free(gx), free(masks), free(add), free(want), free(wantb);
    cudaFree(dgh), cudaFree(dA);
}

// dL/dA of a group of n modules with dropout in one pass over x: gA[i r + j][c] = sum_t gh[t][i r + j] *
// bf16(x[t][c] mask_i[t][c]), against a double CPU sum with the CPU's masks; from the generator and (when
// d % 32 == 0) from the bits dropout_apply_cuda keeps (bit-identical); with and without T splits.
static void check_dropout_da(cuda_ctx *ctx, rng_state *r, int64_t T, int d, int ldx, int n, int rk, int ldgh, float p,
                             const char *what) {
    ck_assert(lowrank_dropout_fused_fits(n, rk));
    float keep = 1.0f / (1.0f - p);
    uint32_t thr = rng_dropout_threshold16(p);
    float *gh = rnd_bf16(r, (size_t)(T * ldgh), 1.0f), *x = rnd_bf16(r, (size_t)(T * ldx), 1.0f);
    uint64_t keys[3];
    float *masks = xmalloc(sizeof(float) * (size_t)(n * T * d));
    for (int i = 0; i < n; i++) {
        keys[i] = rng_key(RNG_DROPOUT, 9, 8, 7, 40 + i);
        adapter_dropout_mask(keys[i], p, (size_t)(T * d), masks + (size_t)i * T * d);
    }
    int64_t NR = (int64_t)n * rk;
    float *want = xmalloc(sizeof(float) * (size_t)(NR * d));
    for (int i = 0; i < n; i++)
        for (int j = 0; j < rk; j++)
            for (int c = 0; c < d; c++) {
                double acc = 0;
                for (int64_t t = 0; t < T; t++)
                    acc += (double)gh[t * ldgh + i * rk + j] * bf16_round(x[t * ldx + c] * masks[(size_t)i * T * d + t * d + c]);
                want[(i * rk + j) * d + c] = (float)acc;
            }
    void *dgh = dev_bf16(gh, (size_t)(T * ldgh)), *dx = dev_bf16(x, (size_t)(T * ldx));
    float *dgA = dev_alloc(4 * (size_t)(NR * d));
    size_t part_floats = (size_t)16 * NR * d;
    float *part = dev_alloc(4 * part_floats);
    char name[160];
    lowrank_dropout_da_cuda(ctx, dgA, dgh, ldgh, dx, ldx, n, rk, T, d, keys, thr, keep, NULL, part, part_floats);
    float *got = down_f32(dgA, (size_t)(NR * d));
    snprintf(name, sizeof name, "dropout dA, %s (T splits)", what);  // sums of a few hundred products
    ck_assert(close_enough(name, got, want, (size_t)(NR * d), 1e-4, 1e-4));
    lowrank_dropout_da_cuda(ctx, dgA, dgh, ldgh, dx, ldx, n, rk, T, d, keys, thr, keep, NULL, NULL, 0);
    float *got1 = down_f32(dgA, (size_t)(NR * d));
    snprintf(name, sizeof name, "dropout dA, %s (one split)", what);
    ck_assert(close_enough(name, got1, want, (size_t)(NR * d), 1e-4, 1e-4));
    free(got1);
    if (d % 32 == 0) {  // the masks from the bits the forward's masked copy keeps
        int64_t nw = dropout_mask_words(T, d);
        uint32_t *dbits = dev_alloc(4 * (size_t)(n * nw));
        void *scratch = dev_alloc(2 * (size_t)(T * d));
        const uint32_t *bp[3];
        for (int i = 0; i < n; i++) {
            bp[i] = dbits + i * nw;
            dropout_apply_cuda(ctx, scratch, dx, ldx, T, d, keys[i], thr, keep, dbits + i * nw);
        }
        lowrank_dropout_da_cuda(ctx, dgA, dgh, ldgh, dx, ldx, n, rk, T, d, keys, thr, keep, bp, part, part_floats);
        float *gotb = down_f32(dgA, (size_t)(NR * d));
        ck_assert_msg(memcmp(gotb, got, 4 * (size_t)(NR * d)) == 0, "dropout dA, %s: kept bits differ from the generator",
                      what);
        free(gotb);
        cudaFree(dbits), cudaFree(scratch);
    }
    free(gh), free(x), free(masks), free(want), free(got);
    cudaFree(dgh), cudaFree(dx), cudaFree(dgA), cudaFree(part);
}

// h of a group of n modules with dropout in one pass over x: h[t][i r + j] = bf16(sum_c bf16(x[t][c]
// mask_i[t][c]) A_i[j][c]) into x's extra columns, against a double CPU sum with the CPU's masks, with
// and without splits of d_in; the kept bits (d % 32 == 0) against the CPU's masks.
static void check_dropout_h(cuda_ctx *ctx, rng_state *r, int64_t T, int d, int n, int rk, float p, const char *what) {
    ck_assert(lowrank_dropout_fused_fits(n, rk));
    float keep = 1.0f / (1.0f - p);
    uint32_t thr = rng_dropout_threshold16(p);
    int64_t NR = (int64_t)n * rk, ldx = d + NR + 8;  // x [T][d | h | 8 spare], as the step lays it out
    float *x = rnd_bf16(r, (size_t)(T * ldx), 1.0f), *A = rnd_bf16(r, (size_t)(NR * d), 0.2f);
    uint64_t keys[3];
    float *masks = xmalloc(sizeof(float) * (size_t)(n * T * d));
    for (int i = 0; i < n; i++) {
        keys[i] = rng_key(RNG_DROPOUT, 3, 1, 4, 60 + i);
        adapter_dropout_mask(keys[i], p, (size_t)(T * d), masks + (size_t)i * T * d);
    }
    float *want = xmalloc(sizeof(float) * (size_t)(T * NR));
    for (int64_t t = 0; t < T; t++)
        for (int i = 0; i < n; i++)
            for (int j = 0; j < rk; j++) {
                double acc = 0;
                for (int c = 0; c < d; c++)
                    acc += (double)bf16_round(x[t * ldx + c] * masks[(size_t)i * T * d + t * d + c]) * A[(i * rk + j) * d + c];
                want[t * NR + i * rk + j] = bf16_round((float)acc);
            }
    void *dx = dev_bf16(x, (size_t)(T * ldx)), *dA = dev_bf16(A, (size_t)(NR * d));
    size_t part_floats = (size_t)16 * T * NR;
    float *part = dev_alloc(4 * part_floats);
    int64_t nw = dropout_mask_words(T, d);
    uint32_t *dbits = d % 32 == 0 ? dev_alloc(4 * (size_t)(n * nw)) : NULL;
    uint32_t *bp[3] = {NULL, NULL, NULL};
    for (int i = 0; dbits && i < n; i++) bp[i] = dbits + i * nw;
    char name[160];
    for (int split = 1; split >= 0; split--) {
        lowrank_dropout_h_cuda(ctx, (bf16 *)dx + d, ldx, dx, ldx, dA, n, rk, T, d, keys, thr, keep, dbits ? bp : NULL,
                               split ? part : NULL, split ? part_floats : 0);
        float *all = down_bf16(dx, (size_t)(T * ldx)), *got = xmalloc(sizeof(float) * (size_t)(T * NR));
        int64_t touched = 0;
        for (int64_t t = 0; t < T; t++) {
            for (int64_t j = 0; j < NR; j++) got[t * NR + j] = all[t * ldx + d + j];
            for (int64_t c = 0; c < ldx; c++)  // x itself and the spare columns stay as they were
                if (c < d || c >= d + NR) touched += all[t * ldx + c] != bf16_round(x[t * ldx + c]);
        }
        snprintf(name, sizeof name, "dropout h, %s (%s)", what, split ? "d_in splits" : "one split");
        ck_assert(close_enough(name, got, want, (size_t)(T * NR), 1e-3, 1.0 / 64));
        ck_assert_msg(touched == 0, "dropout h, %s: %lld values outside h changed", what, (long long)touched);
        free(all), free(got);
    }
    if (dbits) {
        uint32_t *bits = xmalloc(4 * (size_t)(n * nw));
        CK_CUDA(cudaMemcpy(bits, dbits, 4 * (size_t)(n * nw), cudaMemcpyDeviceToHost));
        int64_t bad = 0;
        for (int i = 0; i < n; i++)
            for (int64_t e = 0; e < T * d; e++)
                bad += (int)((bits[i * nw + e / 32] >> (e % 32)) & 1) != (masks[(size_t)i * T * d + e] != 0.0f);
        ck_assert_msg(bad == 0, "dropout h, %s: %lld kept mask bits wrong", what, (long long)bad);
        free(bits);
        cudaFree(dbits);
    }
    free(x), free(A), free(masks), free(want);
    cudaFree(dx), cudaFree(dA), cudaFree(part);
}

// SwiGLU with the adapter product in one pass. Forward: a against swiglu_forward_cpu, h = a A^T against a
// double sum over the kernel's own bf16 a; backward: dgate | dup against swiglu_backward_cpu, gh over the
// gate / up blocks of sB against a double sum over the kernel's own bf16 dgate | dup; with and without
// splits of I, T and I not multiples of the tiles, columns outside the outputs untouched. The forward
// twice more with the streaming-rows kernel (slices of 512 columns of I; without room for their
// partials only where one slice covers I, the tiles otherwise).
static void check_swiglu_lowrank(cuda_ctx *ctx, rng_state *r, int64_t T, int I, int rk, int cg, int cu, int R) {
    ck_assert(swiglu_lowrank_fits(1, I, 2 * I + R + 8, R, rk));
    ck_assert(swiglu_lowrank_fits(0, I, 2 * I + R + 8, R, rk) == (R <= 64));
    int64_t ldgu = 2 * (int64_t)I + R + 8, lda = I + R + 8;  // [gate | up | gh | 8 spare], [a | h | 8 spare]
    size_t ngu = (size_t)(T * ldgu), na = (size_t)(T * lda), n = (size_t)(T * I);
    float *gu = rnd_bf16(r, ngu, 2.0f), *go = rnd_bf16(r, n, 0.5f), *a0 = rnd_bf16(r, na, 1.0f);
    float *A = rnd_bf16(r, (size_t)R * I, 0.2f), *B = rnd_bf16(r, (size_t)(2 * I) * R, 0.2f);
    float *g = xmalloc(sizeof(float) * n), *u = xmalloc(sizeof(float) * n);
    for (int64_t t = 0; t < T; t++)
        for (int i = 0; i < I; i++) g[t * I + i] = gu[t * ldgu + i], u[t * I + i] = gu[t * ldgu + I + i];
    float *a = xmalloc(sizeof(float) * n), *dg = xcalloc(n, sizeof(float)), *du = xcalloc(n, sizeof(float));
    swiglu_forward_cpu(a, g, u, (int64_t)n);
    swiglu_backward_cpu(dg, du, go, g, u, (int64_t)n);
    size_t part_floats = (size_t)16 * T * R;
    if (swiglu_bands_part_floats(T, I, R, rk) > part_floats) part_floats = swiglu_bands_part_floats(T, I, R, rk);
    float *part = dev_alloc(4 * part_floats);
    void *dA = dev_bf16(A, (size_t)R * I), *dB = dev_bf16(B, (size_t)(2 * I) * R), *dgo = dev_bf16(go, n);
    int64_t ldhh = R + 8;  // the gate|up group's h (module m's columns from its c_m), 8 spare
    float *hh = rnd_bf16(r, (size_t)(T * ldhh), 1.0f);
    char name[160];
    for (int pass = 3; pass >= 0; pass--) {  // forward rows kernel with partials, without; tiles with, without
        int split = pass & 1;
        swiglu_lowrank_use_rows(pass >> 1);
        float *part_ = split ? part : NULL;
        size_t pf = split ? part_floats : 0;
        const char *how = pass == 3 ? "rows kernel, slices" : pass == 2 ? "rows kernel, no room for partials"
                        : split ? "tiles, splits" : "tiles, one split";
        // forward (R columns of h; the down group's R is at most 64)
        void *dgu = dev_bf16(gu, ngu), *da = dev_bf16(a0, na);
        int64_t touched = 0;
        if (swiglu_lowrank_fits(0, I, ldgu, R, rk)) {
        swiglu_lowrank_forward_cuda(ctx, da, lda, (bf16 *)da + I, lda, dgu, ldgu, dA, R, T, I, part_, pf);
        float *ga = down_bf16(da, na), *got = xmalloc(sizeof(float) * n), *gh = xmalloc(sizeof(float) * (size_t)(T * R));
        float *want = xmalloc(sizeof(float) * (size_t)(T * R));
        for (int64_t t = 0; t < T; t++) {
            for (int i = 0; i < I; i++) got[t * I + i] = ga[t * lda + i];
            for (int j = 0; j < R; j++) {
                double acc = 0;
                for (int i = 0; i < I; i++) acc += (double)ga[t * lda + i] * A[(int64_t)j * I + i];
                want[t * R + j] = (float)acc, gh[t * R + j] = ga[t * lda + I + j];
            }
            for (int64_t c = I + R; c < lda; c++) touched += ga[t * lda + c] != bf16_round(a0[t * lda + c]);
        }
        snprintf(name, sizeof name, "swiglu+h fwd a, T %lld I %d R %d (%s)", (long long)T, I, R, how);
        ck_assert(close_enough(name, got, a, n, 1e-3 * max_abs(a, n), RT));
        snprintf(name, sizeof name, "swiglu+h fwd h, T %lld I %d R %d (%s)", (long long)T, I, R, how);
        ck_assert(close_enough(name, gh, want, (size_t)(T * R), 1e-3, RT));
        ck_assert_msg(touched == 0, "swiglu+h fwd: %lld spare values changed", (long long)touched);
        free(ga), free(got), free(gh), free(want);
        }
        cudaFree(da);
        // backward (gh of the gate / up blocks): with the rows kernels on, the bands kernel with dL/dB
        // (where it takes the shape; else the tiles run in passes 1 and 0)
        float *gbw = NULL, *gbg = NULL;
        if (pass >= 2) {
            float *gb0 = xmalloc(sizeof(float) * (size_t)(2 * I) * R);
            for (size_t i = 0; i < (size_t)(2 * I) * R; i++) gb0[i] = 7.0f;  // what must stay
            float *dgb = dev_up(gb0, sizeof(float) * (size_t)(2 * I) * R);
            void *dhh = dev_bf16(hh, (size_t)(T * ldhh));
            int made = swiglu_lowrank_backward_db_cuda(ctx, dgu, ldgu, dgo, (bf16 *)dgu + 2 * I, ldgu, dB, R, rk, cg, cu, dhh,
                                                       ldhh, 0.5f, dgb, T, I, split ? part : NULL, split ? part_floats : 0);
            if (made) gbg = down_f32(dgb, (size_t)(2 * I) * R), gbw = gb0;
            else free(gb0);
            cudaFree(dgb), cudaFree(dhh);
            if (!made) {
                // (with several slices it may also leave a GPU's wave to the tiles: on the H100 every shape here runs)
                ck_assert_msg(rk > 32 || !split || I > 512, "swiglu bands bwd: refused r %d with room for partials", rk);
                cudaFree(dgu);
                continue;
            }
        } else {
            swiglu_lowrank_backward_cuda(ctx, dgu, ldgu, dgo, (bf16 *)dgu + 2 * I, ldgu, dB, R, rk, cg, cu, T, I, part_, pf,
                                         NULL);
        }
        float *gg = down_bf16(dgu, ngu), *gga = xmalloc(sizeof(float) * n), *ggb = xmalloc(sizeof(float) * n);
        float *ghw = xcalloc((size_t)(T * R), sizeof(float)), *ghg = xmalloc(sizeof(float) * (size_t)(T * R));
        touched = 0;
        for (int64_t t = 0; t < T; t++) {
            for (int i = 0; i < I; i++) gga[t * I + i] = gg[t * ldgu + i], ggb[t * I + i] = gg[t * ldgu + I + i];
            for (int m = 0; m < 2; m++) {
                int c0 = m ? cu : cg;
                for (int j = 0; c0 >= 0 && j < rk; j++) {
                    double acc = 0;
                    for (int i = 0; i < I; i++)
                        acc += (double)gg[t * ldgu + m * I + i] * B[(int64_t)(m * I + i) * R + c0 + j];
                    ghw[t * R + c0 + j] = (float)acc;
                }
            }
            for (int j = 0; j < R; j++) {
                ghg[t * R + j] = gg[t * ldgu + 2 * I + j];
                int mine = (cg >= 0 && j >= cg && j < cg + rk) || (cu >= 0 && j >= cu && j < cu + rk);
                if (!mine) ghg[t * R + j] = ghw[t * R + j] = 0, touched += gg[t * ldgu + 2 * I + j] != bf16_round(gu[t * ldgu + 2 * I + j]);
            }
            for (int64_t c = 2 * I + R; c < ldgu; c++) touched += gg[t * ldgu + c] != bf16_round(gu[t * ldgu + c]);
        }
        snprintf(name, sizeof name, "swiglu+gh bwd dgate, T %lld I %d (%s)", (long long)T, I, how);
        ck_assert(close_enough(name, gga, dg, n, 1e-3 * max_abs(dg, n), RT));
        snprintf(name, sizeof name, "swiglu+gh bwd dup, T %lld I %d (%s)", (long long)T, I, how);
        ck_assert(close_enough(name, ggb, du, n, 1e-3 * max_abs(du, n), RT));
        snprintf(name, sizeof name, "swiglu+gh bwd gh, r %d gate %d up %d R %d (%s)", rk, cg, cu, R, how);
        ck_assert(close_enough(name, ghg, ghw, (size_t)(T * R), 1e-3, RT));
        ck_assert_msg(touched == 0, "swiglu+gh bwd: %lld values outside the outputs changed", (long long)touched);
        if (gbw) {  // dL/dB = 0.5 d_m^T h over the module's block (of the GPU's bf16 dgate, dup), 7 elsewhere
            for (int m = 0; m < 2; m++) {
                int c0 = m ? cu : cg;
                const float *dm = m ? ggb : gga;
                for (int i = 0; c0 >= 0 && i < I; i++)
                    for (int j = 0; j < rk; j++) {
                        double acc = 0;
                        for (int64_t t = 0; t < T; t++) acc += (double)dm[t * I + i] * hh[t * ldhh + c0 + j];
                        gbw[(int64_t)(m * I + i) * R + c0 + j] = (float)(0.5 * acc);
                    }
            }
            snprintf(name, sizeof name, "swiglu+dB bwd dB, r %d gate %d up %d R %d (%s)", rk, cg, cu, R, how);
            ck_assert(close_enough(name, gbg, gbw, (size_t)(2 * I) * R, 1e-3 * max_abs(gbw, (size_t)(2 * I) * R), RT));
            free(gbw), free(gbg);
        }
        free(gg), free(gga), free(ggb), free(ghw), free(ghg);
        cudaFree(dgu);
    }
    swiglu_lowrank_use_rows(1);
    free(gu), free(go), free(a0), free(A), free(B), free(g), free(u), free(a), free(dg), free(du), free(hh);
    cudaFree(part), cudaFree(dA), cudaFree(dB), cudaFree(dgo);
}

// The down module's masked input gradient inside the SwiGLU backward (swiglu_dx, dropout): dgate | dup
// bit for bit as the two-pass path (lowrank_dropout_dx_cuda into a bf16 gout with the kept bits, then
// swiglu_lowrank_backward_cuda), and against the CPU: swiglu_backward_cpu of bf16(gout + the double
// masked sum) with the CPU's mask (tolerance for a bf16 rounding of gout that a double and an fp32 sum
// may take differently); gh as the two-pass path (within rounding: the splits of I may differ) and gout
// left as it was.
static void check_swiglu_dx(cuda_ctx *ctx, rng_state *r, int64_t T, int I, int rk, float p) {
    int R = 2 * rk, cg = 0, cu = rk;
    int64_t ldgu = 2 * (int64_t)I + R + 8, ldgh = rk + 8;
    size_t ngu = (size_t)(T * ldgu), n = (size_t)(T * I);
    ck_assert(swiglu_lowrank_fits(1, I, ldgu, R, rk));
    float keep = 1.0f / (1.0f - p);
    uint64_t key = rng_key(RNG_DROPOUT, 3, 1, 4, 15);
    float *gu = rnd_bf16(r, ngu, 2.0f), *go = rnd_bf16(r, n, 0.5f), *B = rnd_bf16(r, (size_t)(2 * I) * R, 0.2f);
    float *gh = rnd_bf16(r, (size_t)(T * ldgh), 1.0f), *A = rnd_bf16(r, (size_t)rk * I, 0.2f);
    float *mask = xmalloc(sizeof(float) * n);
    adapter_dropout_mask(key, p, n, mask);
    float *g = xmalloc(sizeof(float) * n), *u = xmalloc(sizeof(float) * n), *go2 = xmalloc(sizeof(float) * n);
    for (int64_t t = 0; t < T; t++)
        for (int i = 0; i < I; i++) {
            g[t * I + i] = gu[t * ldgu + i], u[t * I + i] = gu[t * ldgu + I + i];
            double acc = 0;
            for (int k = 0; k < rk; k++) acc += (double)gh[t * ldgh + k] * A[(int64_t)k * I + i];
            go2[t * I + i] = bf16_round((float)(go[t * I + i] + acc * mask[t * I + i]));
        }
    float *dg = xcalloc(n, sizeof(float)), *du = xcalloc(n, sizeof(float));  // the CPU twin accumulates
    swiglu_backward_cpu(dg, du, go2, g, u, (int64_t)n);
    size_t pf = (size_t)16 * T * R;
    float *part = dev_alloc(4 * pf);
    void *dB = dev_bf16(B, (size_t)(2 * I) * R), *dgh = dev_bf16(gh, (size_t)(T * ldgh)), *dA = dev_bf16(A, (size_t)rk * I);
    uint32_t *dbits = dev_mask_bits(mask, T, I);
    const uint32_t *bp[1] = {dbits};
    // two passes
    void *dgo1 = dev_bf16(go, n), *dgu1 = dev_bf16(gu, ngu);
    lowrank_dropout_dx_cuda(ctx, dgo1, 0, I, dgh, ldgh, dA, 1, rk, T, I, &key, rng_dropout_threshold16(p), keep, bp);
    swiglu_lowrank_backward_cuda(ctx, dgu1, ldgu, dgo1, (bf16 *)dgu1 + 2 * I, ldgu, dB, R, rk, cg, cu, T, I, part, pf, NULL);
    // one
    ck_assert(swiglu_dx_fits(I, rk, ldgh, dgh, dA));
    void *dgo2 = dev_bf16(go, n), *dgu2 = dev_bf16(gu, ngu);
    swiglu_dx sd = {(const bf16 *)dgh, ldgh, (const bf16 *)dA, dbits, keep};
    swiglu_lowrank_backward_cuda(ctx, dgu2, ldgu, dgo2, (bf16 *)dgu2 + 2 * I, ldgu, dB, R, rk, cg, cu, T, I, part, pf, &sd);
    float *g1 = down_bf16(dgu1, ngu), *g2 = down_bf16(dgu2, ngu), *o2 = down_bf16(dgo2, n);
    float *ga = xmalloc(sizeof(float) * n), *gb = xmalloc(sizeof(float) * n);
    float *h1 = xmalloc(sizeof(float) * (size_t)(T * R)), *h2 = xmalloc(sizeof(float) * (size_t)(T * R));
    int64_t differ = 0, touched = 0;
    for (int64_t t = 0; t < T; t++) {
        for (int i = 0; i < 2 * I; i++) differ += g1[t * ldgu + i] != g2[t * ldgu + i];
        for (int i = 0; i < I; i++) ga[t * I + i] = g2[t * ldgu + i], gb[t * I + i] = g2[t * ldgu + I + i];
        for (int j = 0; j < R; j++) h1[t * R + j] = g1[t * ldgu + 2 * I + j], h2[t * R + j] = g2[t * ldgu + 2 * I + j];
        for (int i = 0; i < I; i++) touched += o2[t * I + i] != bf16_round(go[t * I + i]);
    }
    char name[160];
    snprintf(name, sizeof name, "swiglu+dx bwd dgate, T %lld I %d r %d", (long long)T, I, rk);
    ck_assert(close_enough(name, ga, dg, n, 1e-2 * max_abs(dg, n), RT));
    snprintf(name, sizeof name, "swiglu+dx bwd dup, T %lld I %d r %d", (long long)T, I, rk);
    ck_assert(close_enough(name, gb, du, n, 1e-2 * max_abs(du, n), RT));
    snprintf(name, sizeof name, "swiglu+dx bwd gh, T %lld I %d r %d", (long long)T, I, rk);
    ck_assert(close_enough(name, h2, h1, (size_t)(T * R), 1e-3, RT));
    ck_assert_msg(differ == 0, "swiglu+dx: %lld of dgate | dup differ from the two-pass path", (long long)differ);
    ck_assert_msg(touched == 0, "swiglu+dx: %lld values of gout changed", (long long)touched);
    free(gu), free(go), free(B), free(gh), free(A), free(mask), free(g), free(u), free(go2), free(dg), free(du);
    free(g1), free(g2), free(o2), free(ga), free(gb), free(h1), free(h2);
    cudaFree(part), cudaFree(dB), cudaFree(dgh), cudaFree(dA), cudaFree(dbits);
    cudaFree(dgo1), cudaFree(dgu1), cudaFree(dgo2), cudaFree(dgu2);
}

START_TEST(test_swiglu_lowrank) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 4242);
    check_swiglu_lowrank(ctx, &r, 100, 200, 32, 0, 32, 64);   // MoS r 32: gate and up
    check_swiglu_lowrank(ctx, &r, 64, 128, 16, -1, 0, 16);    // up only
    check_swiglu_lowrank(ctx, &r, 70, 136, 64, 0, -1, 64);    // gate only, LoRA r 64
    check_swiglu_lowrank(ctx, &r, 33, 256, 48, 48, 0, 96);    // up before gate in R
    check_swiglu_lowrank(ctx, &r, 130, 392, 32, 0, 32, 64);   // several chunks and row blocks
    check_swiglu_lowrank(ctx, &r, 100, 1000, 32, 0, 32, 64);  // rows kernel: two slices, the last one short
    check_swiglu_lowrank(ctx, &r, 37, 1544, 16, -1, 0, 16);   // four slices, the last one 8 columns; up only
    check_swiglu_lowrank(ctx, &r, 48, 1024, 32, 32, 0, 64);   // whole slices, up before gate in R
    check_swiglu_lowrank(ctx, &r, 1000, 1536, 32, 0, 32, 64); // bands kernel: token groups of several bands
    check_swiglu_dx(ctx, &r, 100, 192, 32, 0.1f);               // the down module's dropout term, MoS r 32
    check_swiglu_dx(ctx, &r, 130, 416, 16, 0.3f);               // a half chunk at the end of I, r 16
    check_swiglu_dx(ctx, &r, 70, 256, 64, 0.1f);                // LoRA r 64
    cuda_ctx_free(ctx);
}
END_TEST

START_TEST(test_dropout) {
    cuda_ctx *ctx = ctx_new();
    rng_state r;
    rng_seed(&r, 1001);
    int64_t T = 129;  // several blocks of the 4-element kernels
    int d = 72, ldx = 80;
    float p = 0.1f;
    uint64_t key = rng_key(RNG_DROPOUT, 5, 6, 7, 8);
    float *x = rnd_bf16(&r, (size_t)(T * ldx), 1.0f), *mask = xmalloc(sizeof(float) * (size_t)(T * d));
    adapter_dropout_mask(key, p, (size_t)(T * d), mask);
    float *ref = xmalloc(sizeof(float) * (size_t)(T * d));
    for (int64_t t = 0; t < T; t++)
        for (int c = 0; c < d; c++) ref[t * d + c] = bf16_round(x[t * ldx + c] * mask[t * d + c]);
    void *dx = dev_bf16(x, (size_t)(T * ldx)), *dxd = dev_alloc(2 * (size_t)(T * d));
    int64_t nw = dropout_mask_words(T, d);
    uint32_t *dbits = dev_alloc(4 * (size_t)nw);
    dropout_apply_cuda(ctx, dxd, dx, ldx, T, d, key, rng_dropout_threshold16(p), 1.0f / (1.0f - p), dbits);
    float *got = down_bf16(dxd, (size_t)(T * d));
    ck_assert(close_enough("dropout apply (same mask)", got, ref, (size_t)(T * d), 0, 0));
    // the kept bits: bit e of the stream set <=> element e kept; the tail of the last word clear
    uint32_t *bits = xmalloc(4 * (size_t)nw);
    CK_CUDA(cudaMemcpy(bits, dbits, 4 * (size_t)nw, cudaMemcpyDeviceToHost));
    int64_t bad = 0;
    for (int64_t e = 0; e < T * d; e++) bad += (int)((bits[e / 32] >> (e % 32)) & 1) != (mask[e] != 0.0f);
    for (int64_t e = T * d; e < 32 * nw; e++) bad += (bits[e / 32] >> (e % 32)) & 1;
    ck_assert_msg(bad == 0, "dropout mask bits: %lld of %lld wrong", (long long)bad, (long long)(T * d));
    free(x), free(mask), free(ref), free(got), free(bits);
    cudaFree(dx), cudaFree(dxd), cudaFree(dbits);
    // the masked input gradient: a rank that is not a multiple of the 32-chunk or of 16 (the mma's k),
    // partial row and column tiles, 16-byte copies and the element-wise fallbacks (rank 12, width 36,
    // row stride 44: neither gh, A nor a bf16 gx in 16-byte pieces), several rank chunks (r 72)
    check_dropout_dx(ctx, &r, 129, 72, 80, 3, 40, 3 * 40 + 8, p, "3 modules, r 40, d 72");
    check_dropout_dx(ctx, &r, 100, 36, 44, 2, 12, 2 * 12 + 3, p, "2 modules, r 12, d 36, unaligned");
    check_dropout_dx(ctx, &r, 300, 392, 400, 1, 32, 40, 0.3f, "1 module, r 32, d 392, p 0.3");
    check_dropout_dx(ctx, &r, 70, 256, 264, 2, 72, 2 * 72 + 8, p, "2 modules, r 72, d 256");
    check_dropout_dx(ctx, &r, 130, 320, 328, 3, 32, 3 * 32 + 8, p, "3 modules, r 32, d 320");
    // dL/dA: 16-byte copies with generator and kept-bit masks and T splits (3 x 32, d 256), partial
    // column tiles (d 72), the element-wise fallback (row strides 44 and 36), one module of 64
    check_dropout_da(ctx, &r, 300, 256, 264, 3, 32, 3 * 32 + 8, p, "3 modules, r 32, d 256");
    check_dropout_da(ctx, &r, 129, 72, 80, 2, 16, 40, p, "2 modules, r 16, d 72");
    check_dropout_da(ctx, &r, 70, 36, 44, 1, 32, 36, 0.3f, "1 module, r 32, d 36, unaligned, p 0.3");
    check_dropout_da(ctx, &r, 200, 128, 128, 1, 64, 64, p, "1 module, r 64, d 128");
    // h: kept bits and 16-byte copies (d 256), partial column chunks (d 72), the element-wise fallback
    // (d 36: d_in % 8 != 0, row stride 76), one module of 64
    check_dropout_h(ctx, &r, 300, 256, 3, 32, p, "3 modules, r 32, d 256");
    check_dropout_h(ctx, &r, 129, 72, 2, 16, p, "2 modules, r 16, d 72");
    check_dropout_h(ctx, &r, 70, 36, 1, 32, 0.3f, "1 module, r 32, d 36, p 0.3");
    check_dropout_h(ctx, &r, 200, 128, 1, 64, p, "1 module, r 64, d 128");
    cuda_ctx_free(ctx);
}
END_TEST

static Suite *kernels_suite(void) {
    Suite *s = suite_create("kernels_cuda");
    TCase *tc = tcase_create("twins");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_nf4_random);
    tcase_add_test(tc, test_nf4_oracles);
    tcase_add_test(tc, test_weight_group_fill);
    tcase_add_test(tc, test_gemm);
    tcase_add_test(tc, test_gemm_tune);
    tcase_add_test(tc, test_splitk_sum);
    tcase_add_test(tc, test_rmsnorm);
    tcase_add_test(tc, test_swiglu_embedding);
    tcase_add_test(tc, test_swiglu_lowrank);
    tcase_add_test(tc, test_rope);
    tcase_add_test(tc, test_attention);
    tcase_add_test(tc, test_lmhead_ce);
    tcase_add_test(tc, test_adamw_norm);
    tcase_add_test(tc, test_adapter_gather_scatter);
    tcase_add_test(tc, test_dropout);
    suite_add_tcase(s, tc);
    return s;
}

TEST_MAIN(kernels_suite)
