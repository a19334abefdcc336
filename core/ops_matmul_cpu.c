// ops_matmul_cpu.c: the fp32 matrix products of the CPU reference backend (see ops_cpu.h).
//
// Most of the CPU's training time is spent here, so this one op is blocked for the caches (GotoBLAS
// style) while staying a plain sequential sum:
//  - C is cut into MC x NC tiles; each tile belongs to one thread (no two threads write one element).
//  - For each KC-slice of k, the thread packs the rows of op(A) into panels [kc][MR] and the columns
//    of op(B) into panels [kc][NR] (contiguous, zero-padded at the edges), then a register-blocked
//    micro-kernel adds MR x NR outer products: one broadcast A value times a vector of NR B values.
//  - SIMD runs across j (columns of C), never across k, and the accumulators are stored between
//    KC-slices (exact in fp32), so every C[i][j] receives its products one at a time in ascending k.
//    Without fused multiply-add (C11 mode: -ffp-contract=off) the result is bit-identical to the
//    naive triple loop, whatever the blocking, SIMD width or thread count.
// Two micro-kernels: 6x8 with SSE vectors (the x86-64-v2 baseline of the build) and 6x16 with AVX2
// vectors, chosen at run time when the CPU has AVX2; both compute exactly the same sums.
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/ops_cpu.h"

#define MR 6     // rows of the micro-kernel
#define KC 256   // depth of a packed slice: an A panel (6 KiB) and a B panel (8-16 KiB) stay in L1
#define MC 96    // rows of a C tile: its packed A block (96 KiB) stays in L2
#define NC 256   // columns of a C tile: its packed B block (256 KiB) stays in L2

typedef float v4sf __attribute__((vector_size(16)));
typedef float v8sf __attribute__((vector_size(32)));

// ---- micro-kernels ----
// c[MR][nr] (row stride ldc) = (load ? c : 0) + sum over k ascending of a[k][0..MR) (x) b[k][0..nr).
static void kernel_6x8_sse(int64_t kc, const float *restrict a, const float *restrict b, float *restrict c,
                           int64_t ldc, int load) {
    v4sf acc[MR][2];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        if (load) {
            memcpy(&acc[i][0], c + i * ldc, 16);
            memcpy(&acc[i][1], c + i * ldc + 4, 16);
        } else {
            acc[i][0] = (v4sf){0};
            acc[i][1] = (v4sf){0};
        }
    }
    for (int64_t k = 0; k < kc; k++) {
        v4sf b0, b1;
        memcpy(&b0, b + k * 8, 16);
        memcpy(&b1, b + k * 8 + 4, 16);
#pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            float ai = a[k * MR + i];
            acc[i][0] += b0 * ai;
            acc[i][1] += b1 * ai;
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        memcpy(c + i * ldc, &acc[i][0], 16);
        memcpy(c + i * ldc + 4, &acc[i][1], 16);
    }
}

__attribute__((target("avx2"))) static void kernel_6x16_avx2(int64_t kc, const float *restrict a,
                                                              const float *restrict b, float *restrict c,
                                                              int64_t ldc, int load) {
    v8sf acc[MR][2];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        if (load) {
            memcpy(&acc[i][0], c + i * ldc, 32);
            memcpy(&acc[i][1], c + i * ldc + 8, 32);
        } else {
            acc[i][0] = (v8sf){0};
            acc[i][1] = (v8sf){0};
        }
    }
    for (int64_t k = 0; k < kc; k++) {
        v8sf b0, b1;
        memcpy(&b0, b + k * 16, 32);
        memcpy(&b1, b + k * 16 + 8, 32);
#pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            float ai = a[k * MR + i];
            acc[i][0] += b0 * ai;
            acc[i][1] += b1 * ai;
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        memcpy(c + i * ldc, &acc[i][0], 32);
        memcpy(c + i * ldc + 8, &acc[i][1], 32);
    }
}

typedef void (*gemm_kernel)(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int load);

// ---- packing ----
// Ap[p][kc][MR] = op(A)[i0 + p*MR + r][k0 + k], 0 past row i0 + mc.
static void pack_a(int trans_a, const float *A, int64_t lda, int64_t i0, int64_t mc, int64_t k0, int64_t kc,
                   float *Ap) {
    for (int64_t p = 0; p * MR < mc; p++) {
        float *dst = Ap + p * kc * MR;
        int64_t rows = mc - p * MR < MR ? mc - p * MR : MR;
        for (int64_t r = 0; r < MR; r++) {
            int64_t i = i0 + p * MR + r;
            if (r >= rows) {
                for (int64_t k = 0; k < kc; k++) dst[k * MR + r] = 0.0f;
            } else if (!trans_a) {
                const float *src = A + i * lda + k0;
                for (int64_t k = 0; k < kc; k++) dst[k * MR + r] = src[k];
            } else {
                const float *src = A + k0 * lda + i;
                for (int64_t k = 0; k < kc; k++) dst[k * MR + r] = src[k * lda];
            }
        }
    }
}

// Bp[p][kc][nr] = op(B)[k0 + k][j0 + p*nr + c], 0 past column j0 + nc.
static void pack_b(int trans_b, const float *B, int64_t ldb, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int nr,
                   float *Bp) {
    for (int64_t p = 0; p * nr < nc; p++) {
        float *dst = Bp + p * kc * nr;
        int64_t cols = nc - p * nr < nr ? nc - p * nr : nr;
        if (!trans_b) {  // B[k][j]: rows of nr contiguous values
            for (int64_t k = 0; k < kc; k++) {
                const float *src = B + (k0 + k) * ldb + j0 + p * nr;
                int64_t c = 0;
                for (; c < cols; c++) dst[k * nr + c] = src[c];
                for (; c < nr; c++) dst[k * nr + c] = 0.0f;
            }
        } else {  // B[j][k]: each column is a contiguous run over k
            for (int64_t c = 0; c < nr; c++) {
                if (c >= cols) {
                    for (int64_t k = 0; k < kc; k++) dst[k * nr + c] = 0.0f;
                    continue;
                }
                const float *src = B + (j0 + p * nr + c) * ldb + k0;
                for (int64_t k = 0; k < kc; k++) dst[k * nr + c] = src[k];
            }
        }
    }
}

// One C tile [i0, i0+mc) x [j0, j0+nc), all of k.
static void gemm_tile(int trans_a, int trans_b, int64_t i0, int64_t mc, int64_t j0, int64_t nc, int64_t K,
                      const float *A, int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate,
                      gemm_kernel kernel, int nr, float *Ap, float *Bp) {
    float ct[MR * 16];  // an edge micro-tile of C, padded to MR x nr (nr <= 16)
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        int64_t kc = K - k0 < KC ? K - k0 : KC;
        int load = k0 > 0 || accumulate;
        pack_a(trans_a, A, lda, i0, mc, k0, kc, Ap);
        pack_b(trans_b, B, ldb, k0, kc, j0, nc, nr, Bp);
        for (int64_t jp = 0; jp * nr < nc; jp++) {
            int64_t cols = nc - jp * nr < nr ? nc - jp * nr : nr;
            for (int64_t ip = 0; ip * MR < mc; ip++) {
                int64_t rows = mc - ip * MR < MR ? mc - ip * MR : MR;
                float *c = C + (i0 + ip * MR) * ldc + j0 + jp * nr;
                const float *a = Ap + ip * kc * MR, *b = Bp + jp * kc * nr;
                if (rows == MR && cols == nr) {
                    kernel(kc, a, b, c, ldc, load);
                    continue;
                }
                memset(ct, 0, sizeof ct);
                if (load)
                    for (int64_t r = 0; r < rows; r++) memcpy(ct + r * nr, c + r * ldc, (size_t)cols * sizeof(float));
                kernel(kc, a, b, ct, nr, 1);
                for (int64_t r = 0; r < rows; r++) memcpy(c + r * ldc, ct + r * nr, (size_t)cols * sizeof(float));
            }
        }
    }
}

static int g_force_baseline = -1;  // -1: not decided yet (read MOSFT_GEMM_SSE)

void gemm_cpu_force_baseline(int on) { g_force_baseline = on ? 1 : 0; }

static int baseline_forced(void) {
    if (g_force_baseline < 0) {
        const char *e = getenv("MOSFT_GEMM_SSE");
        g_force_baseline = e && *e == '1';
    }
    return g_force_baseline;
}

static int cpu_has_avx2(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return known;
}

void gemm_cpu(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
              const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate) {
    MOSFT_ASSERT(M >= 0 && N >= 0 && K >= 0);
    if (M == 0 || N == 0) return;
    if (K == 0) {
        if (!accumulate)
            for (int64_t i = 0; i < M; i++) memset(C + i * ldc, 0, (size_t)N * sizeof(float));
        return;
    }
    int avx2 = cpu_has_avx2() && !baseline_forced();
    gemm_kernel kernel = avx2 ? kernel_6x16_avx2 : kernel_6x8_sse;
    int nr = avx2 ? 16 : 8;

    int64_t tiles_m = (M + MC - 1) / MC, tiles_n = (N + NC - 1) / NC, tiles = tiles_m * tiles_n;
    int nth = ops_cpu_threads();
    int parallel = nth > 1 && tiles > 1 && (double)M * (double)N * (double)K > 262144.0;
#pragma omp parallel num_threads(nth) if (parallel)
    {
        float *Ap = xmalloc_aligned((size_t)MC * KC * sizeof(float));
        float *Bp = xmalloc_aligned((size_t)NC * KC * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t i0 = (t / tiles_n) * MC, j0 = (t % tiles_n) * NC;
            int64_t mc = M - i0 < MC ? M - i0 : MC, nc = N - j0 < NC ? N - j0 : NC;
            gemm_tile(trans_a, trans_b, i0, mc, j0, nc, K, A, lda, B, ldb, C, ldc, accumulate, kernel, nr, Ap, Bp);
        }
        free(Ap);
        free(Bp);
    }
}

void matmul_forward_cpu(float *out, const float *inp, const float *W, int64_t T, int K, int N, int accumulate) {
    // out[t][n] = sum_k inp[t][k] W[n][k]: op(A) = inp, op(B)[k][n] = W[n][k].
    gemm_cpu(0, 1, T, N, K, inp, K, W, K, out, N, accumulate);
}

void matmul_backward_input_cpu(float *ginp, const float *gout, const float *W, int64_t T, int K, int N) {
    // ginp[t][k] += sum_n gout[t][n] W[n][k]
    gemm_cpu(0, 0, T, K, N, gout, N, W, K, ginp, K, 1);
}

void matmul_backward_weight_cpu(float *gW, const float *gout, const float *inp, int64_t T, int K, int N) {
    // gW[n][k] += sum_t gout[t][n] inp[t][k]: op(A)[n][t] = gout[t][n].
    gemm_cpu(1, 0, N, K, T, gout, N, inp, K, gW, K, 1);
}
