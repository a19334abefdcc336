// bench_gemm.c: the base GEMMs of one Llama-2-7B layer exactly as the CUDA step issues them (bs 16 x 512,
// MoS r 32 on all 7 linears: K-augmented by the adapter's R columns, the same row strides, output types
// and beta), timed for every algorithm cuBLASLt's heuristic offers (up to 16), each checked bitwise
// against the heuristic's first choice. A probe for choosing algorithms by measurement: it shows what the
// first choice leaves on the table and whether another choice would change any result bit.
//   build/tests/gpu/bench_gemm [reps]
// BENCH_GEMM_SUSTAINED=1: each algorithm runs ~150 ms first and is then timed over `reps` products back
// to back (one event pair), as in a step, where the clocks settle under the power limit; isolated
// products run at higher clocks and can rank the algorithms differently. BENCH_GEMM_DATA=nf4: the weight
// operand holds dequantized-NF4-like values (a random absmax per 64 times one of the 16 NF4 levels) and
// the activations are normal, as in the step (the power a product draws depends on its operands' bits).
// BENCH_GEMM_MODEL=3b: Llama-3.2-3B's layer. BENCH_GEMM_SET=skinny: the adapter's skinny products instead. BENCH_GEMM_LD_ALIGN=n: every row stride rounded up to a
// multiple of n elements (64: 128-byte rows), the shapes unchanged, to see what rows that start off a
// 128-byte line cost. BENCH_GEMM_ALGOS=n: the first n candidates only.
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/nf4.h"
#include "tests/gpu/probe_util.h"

// One product D[M][N] = op(A) op(B) (+ C), row-major, as gemm_cuda sees it.
typedef struct {
    const char *name;
    int ta, tb;
    int64_t M, N, K, lda, ldb, ldd;
    int f32_out, beta1;
} shape;

// n bf16 of N(0, sd) (Box-Muller on the same xorshift stream).
static uint16_t *host_normal_bf16(size_t n, uint64_t seed, float sd) {
    uint16_t *h = malloc(2 * n);
    uint64_t s = probe_seed(seed);
    for (size_t i = 0; i < n; i++) {
        double u1 = 1.0 - probe_uniform(&s), u2 = probe_uniform(&s);  // u1 in (0, 1]
        h[i] = f32_to_bf16((float)(sd * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2)));
    }
    return h;
}

// n bf16 laid out as rows of NF4 blocks of 64: absmax in [0.02, 0.06) per block times a random level.
static uint16_t *host_nf4_bf16(size_t n, uint64_t seed) {
    uint16_t *h = malloc(2 * n);
    uint64_t s = probe_seed(seed);
    float amax = 0.0f;
    for (size_t i = 0; i < n; i++) {
        double u = probe_uniform(&s);
        if (i % NF4_BLOCK == 0) amax = 0.02f + 0.04f * (float)probe_uniform(&s);
        h[i] = f32_to_bf16(amax * k_nf4_code[(int)(u * 16)]);
    }
    return h;
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 10;
    const char *mdl = getenv("BENCH_GEMM_MODEL");  // "3b": Llama-3.2-3B's shapes instead of Llama-2-7B's
    int m3b = mdl && !strcmp(mdl, "3b");
    const int64_t T = 16 * 512, C = m3b ? 3072 : 4096, I = m3b ? 8192 : 11008, W = m3b ? 3072 + 2 * 1024 : 3 * 4096;
    const int Rq = 96, Ro = 32, Rg = 64, Rd = 32;  // q|k|v, o, gate|up, down: n modules x r 32
    shape sh[] = {
        {"fwd qkv ", 0, 1, T, W, C + Rq, C + Rq, C + Rq, W + Rq, 0, 0},
        {"fwd o   ", 0, 1, T, C, C + Ro, C + Ro, C + Ro, C, 0, 1},
        {"fwd gu  ", 0, 1, T, 2 * I, C + Rg, C + Rg, C + Rg, 2 * I + Rg, 0, 0},
        {"fwd down", 0, 1, T, C, I + Rd, I + Rd, I + Rd, C, 0, 1},
        {"bwd down", 0, 0, T, I, C + Rd, C + Rd, I + Rd, I, 0, 0},
        {"bwd gu  ", 0, 0, T, C, 2 * I + Rg, 2 * I + Rg, C + Rg, C, 1, 0},
        {"bwd o   ", 0, 0, T, C, C + Ro, C + Ro, C + Ro, C, 0, 0},
        {"bwd qkv ", 0, 0, T, C, W + Rq, W + Rq, C + Rq, C, 1, 0},
        // without the adapter's columns, and with K padded to a multiple of 128, for comparison
        {"fwd qkv  K=4096", 0, 1, T, W, C, C, C, W, 0, 0},
        {"fwd qkv  K=4224", 0, 1, T, W, C + 128, C + 128, C + 128, W + 128, 0, 0},
        {"fwd gu   K=4096", 0, 1, T, 2 * I, C, C, C, 2 * I, 0, 0},
        {"fwd gu   K=4224", 0, 1, T, 2 * I, C + 128, C + 128, C + 128, 2 * I + 128, 0, 0},
    };
    // BENCH_GEMM_SET=skinny: the adapter's skinny products on the main stream instead: the forward's h = x A^T
    // (into x's extra columns: lda = ldd = d_in + R) and the backward's gh = gy sB, plus two other ways to
    // make the o group's h (R 32): A padded to 64 rows, and h^T = A x^T
    shape sk[] = {
        {"h qkv   ", 0, 1, T, Rq, C, C + Rq, C, C + Rq, 0, 0},
        {"h o     ", 0, 1, T, Ro, C, C + Ro, C, C + Ro, 0, 0},
        {"h gu    ", 0, 1, T, Rg, C, C + Rg, C, C + Rg, 0, 0},
        {"h o N64 ", 0, 1, T, 64, C, C + Ro, C, C + 64, 0, 0},
        {"h o ^T  ", 0, 1, Ro, T, C, C, C + Ro, T, 0, 0},
        {"gh qkv  ", 0, 0, T, Rq, W, W + Rq, Rq, W + Rq, 0, 0},
        {"gh o    ", 0, 0, T, Ro, C, C + Ro, Ro, C + Ro, 0, 0},
        {"gh down ", 0, 0, T, Rd, C, C + Rd, Rd, C + Rd, 0, 0},
    };
    const char *set = getenv("BENCH_GEMM_SET");
    int n_sh = (int)(sizeof sh / sizeof sh[0]);
    if (set && !strcmp(set, "skinny")) {
        memcpy(sh, sk, sizeof sk);
        n_sh = (int)(sizeof sk / sizeof sk[0]);
    }
    const char *al = getenv("BENCH_GEMM_LD_ALIGN"), *na = getenv("BENCH_GEMM_ALGOS");
    int64_t align = al && atoi(al) > 1 ? atoi(al) : 1;
    int max_algos = na && atoi(na) > 0 ? atoi(na) : 16;
    for (int i = 0; i < n_sh; i++) {
        sh[i].lda = (sh[i].lda + align - 1) / align * align;
        sh[i].ldb = (sh[i].ldb + align - 1) / align * align;
        sh[i].ldd = (sh[i].ldd + align - 1) / align * align;
    }
    size_t a_max = 0, b_max = 0, d_max = 0;
    for (int i = 0; i < n_sh; i++) {
        size_t a = (size_t)sh[i].M * sh[i].lda, b = (size_t)(sh[i].tb ? sh[i].N : sh[i].K) * sh[i].ldb,
               d = (size_t)sh[i].M * sh[i].ldd * (sh[i].f32_out ? 2 : 1);
        if (a > a_max) a_max = a;
        if (b > b_max) b_max = b;
        if (d > d_max) d_max = d;
    }
    const char *sus = getenv("BENCH_GEMM_SUSTAINED"), *dat = getenv("BENCH_GEMM_DATA");
    int sustained = sus && atoi(sus) > 0, nf4 = dat && !strcmp(dat, "nf4");
    uint16_t *ha = nf4 ? host_normal_bf16(a_max, 1, 1.0f) : probe_uniform_bf16(a_max, 1, 0.05f);
    uint16_t *hb = nf4 ? host_nf4_bf16(b_max, 2) : probe_uniform_bf16(b_max, 2, 0.05f), *hc = probe_uniform_bf16((size_t)T * C, 3, 0.05f);
    printf("%s products; operands: %s; row strides a multiple of %lld\n", sustained ? "sustained" : "isolated",
           nf4 ? "NF4-like weights, normal activations" : "uniform in [-0.05, 0.05)", (long long)align);
    void *A, *B, *Cm, *D, *ws;
    size_t ws_bytes = (size_t)32 << 20;
    CK(cudaMalloc(&A, 2 * a_max));
    CK(cudaMalloc(&B, 2 * b_max));
    CK(cudaMalloc(&Cm, 2 * (size_t)T * C));
    CK(cudaMalloc(&D, 2 * d_max));
    CK(cudaMalloc(&ws, ws_bytes));
    CK(cudaMemcpy(A, ha, 2 * a_max, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(B, hb, 2 * b_max, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(Cm, hc, 2 * (size_t)T * C, cudaMemcpyHostToDevice));
    void *ref = malloc(2 * d_max), *out = malloc(2 * d_max);
    cublasLtHandle_t lt;
    CB(cublasLtCreate(&lt));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float *times = malloc(sizeof(float) * (size_t)reps);
    double total_first = 0, total_best = 0;
    for (int s = 0; s < n_sh; s++) {
        shape *p = &sh[s];
        cublasLtMatmulDesc_t desc;
        CB(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t op1 = p->tb ? CUBLAS_OP_T : CUBLAS_OP_N, op2 = p->ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        CB(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op1, sizeof op1));
        CB(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op2, sizeof op2));
        cublasLtMatrixLayout_t la, lb, lc, ld;
        CB(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, p->tb ? p->K : p->N, p->tb ? p->N : p->K, p->ldb));
        CB(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, p->ta ? p->M : p->K, p->ta ? p->K : p->M, p->lda));
        cudaDataType_t ct = p->f32_out ? CUDA_R_32F : CUDA_R_16BF;
        CB(cublasLtMatrixLayoutCreate(&lc, p->beta1 ? CUDA_R_16BF : ct, p->N, p->M, p->beta1 ? p->N : p->ldd));
        CB(cublasLtMatrixLayoutCreate(&ld, ct, p->N, p->M, p->ldd));
        cublasLtMatmulPreference_t pref;
        CB(cublasLtMatmulPreferenceCreate(&pref));
        uint64_t wsb = ws_bytes;
        CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb));
        cublasLtMatmulHeuristicResult_t res[16];
        int found = 0;
        CB(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, ld, pref, 16, res, &found));
        double flop = 2.0 * (double)p->M * (double)p->N * (double)p->K;
        float alpha = 1.0f, beta = p->beta1 ? 1.0f : 0.0f;
        size_t out_bytes = (size_t)p->M * p->ldd * (p->f32_out ? 4 : 2);
        printf("%s  M %lld N %lld K %lld  lda %lld ldb %lld ldd %lld  %s%s: %d algorithms\n", p->name, (long long)p->M,
               (long long)p->N, (long long)p->K, (long long)p->lda, (long long)p->ldb, (long long)p->ldd,
               p->f32_out ? "f32 out" : "bf16 out", p->beta1 ? " +C" : "", found);
        float first = 0, best = 1e30f;
        for (int a = 0; a < found && a < max_algos; a++) {
            if (res[a].state != CUBLAS_STATUS_SUCCESS) continue;
            int ok = 1;
            if (sustained) {  // heat up for ~150 ms, then time reps products back to back
                CK(cudaEventRecord(e0, st));
                for (int r = 0; r < 1000; r++) {
                    if (cublasLtMatmul(lt, desc, &alpha, B, la, A, lb, &beta, p->beta1 ? Cm : D, lc, D, ld, &res[a].algo, ws,
                                       ws_bytes, st) != CUBLAS_STATUS_SUCCESS) {
                        ok = 0;
                        break;
                    }
                    if (r % 8 == 7) {
                        float ms;
                        CK(cudaEventRecord(e1, st));
                        CK(cudaEventSynchronize(e1));
                        CK(cudaEventElapsedTime(&ms, e0, e1));
                        if (ms > 150.0f) break;
                    }
                }
                CK(cudaEventRecord(e0, st));
                for (int r = 0; ok && r < reps; r++)
                    ok = cublasLtMatmul(lt, desc, &alpha, B, la, A, lb, &beta, p->beta1 ? Cm : D, lc, D, ld, &res[a].algo, ws,
                                        ws_bytes, st) == CUBLAS_STATUS_SUCCESS;
                CK(cudaEventRecord(e1, st));
                CK(cudaEventSynchronize(e1));
                float ms = 0;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                for (int r = 0; r < reps; r++) times[r] = ms / (float)reps;
            }
            for (int r = -2; !sustained && r < reps; r++) {
                CK(cudaEventRecord(e0, st));
                cublasStatus_t x = cublasLtMatmul(lt, desc, &alpha, B, la, A, lb, &beta, p->beta1 ? Cm : D, lc, D, ld,
                                                  &res[a].algo, ws, ws_bytes, st);
                CK(cudaEventRecord(e1, st));
                if (x != CUBLAS_STATUS_SUCCESS) {
                    ok = 0;
                    break;
                }
                CK(cudaEventSynchronize(e1));
                if (r >= 0) CK(cudaEventElapsedTime(&times[r], e0, e1));
            }
            if (!ok) {
                printf("  algo %2d: failed\n", a);
                continue;
            }
            qsort(times, (size_t)reps, sizeof(float), probe_cmp_float);
            float med = times[reps / 2];
            CK(cudaMemcpy(a == 0 ? ref : out, D, out_bytes, cudaMemcpyDeviceToHost));
            int same = a == 0 || !memcmp(ref, out, out_bytes);
            int id = -1, tile = -1, splitk = -1, red = -1, stages = -1;
            size_t w;
            cublasLtMatmulAlgoConfigGetAttribute(&res[a].algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id, &w);
            cublasLtMatmulAlgoConfigGetAttribute(&res[a].algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &w);
            cublasLtMatmulAlgoConfigGetAttribute(&res[a].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &w);
            cublasLtMatmulAlgoConfigGetAttribute(&res[a].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof red, &w);
            cublasLtMatmulAlgoConfigGetAttribute(&res[a].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &w);
            printf("  algo %2d: %7.3f ms %6.1f TFLOP/s  id %d tile %d stages %d splitK %d red %d  ws %zu  %s\n", a, med,
                   flop / (med * 1e-3) / 1e12, id, tile, stages, splitk, red, res[a].workspaceSize,
                   same ? "bit-identical to algo 0" : "DIFFERENT bits");
            if (a == 0) first = med;
            if (med < best) best = med;
        }
        if (s < 8) {
            total_first += first;
            total_best += best;
        }
        cublasLtMatmulPreferenceDestroy(pref);
        cublasLtMatrixLayoutDestroy(la);
        cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc);
        cublasLtMatrixLayoutDestroy(ld);
        cublasLtMatmulDescDestroy(desc);
    }
    printf("one layer's 8 products: heuristic first choice %.3f ms, best measured %.3f ms (x 32 layers: %.1f / %.1f)\n",
           total_first, total_best, 32 * total_first, 32 * total_best);
    return 0;
}
