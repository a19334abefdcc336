// bench_flash.c: times the flash attention kernels alone at real shapes (Llama-2-7B: 32 heads, Llama-3.2-3B:
// 24 query / 8 kv heads; B 16, S 512, D 128, causal, no padding) with CUDA events, median of N runs, and
// checks that the backward is bitwise deterministic (first run against last) and writes every element.
// The hashes of the forward's output and lse and of the backward's gradient (FNV-1a over the bytes, fixed
// inputs) tell whether two builds give the same bits. The forward is RoPE's pass over the token-major q and
// k, then the kernel; the pass is also timed alone.
//   build/tests/gpu/bench_flash [reps]        BENCH_FA_ONCE=1: one run of each (for ncu);
//   BENCH_FA_SHAPE=7b|3b: one shape only
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/rng.h"
#include "cuda/ops_cuda.h"
#include "tests/gpu/probe_util.h"


static void *dalloc(size_t n) {
    void *p;
    CK(cudaMalloc(&p, n));
    CK(cudaMemset(p, 0xff, n));
    CK(cudaDeviceSynchronize());  // the kernels run on a non-blocking stream: no implicit order
    return p;
}
static void *drand_bf16(rng_state *r, size_t n, float sd) {
    uint16_t *h = malloc(2 * n);
    for (size_t i = 0; i < n; i++) {
        double u1 = rng_next_double(r) + 1e-12, u2 = rng_next_double(r);
        h[i] = f32_to_bf16((float)(sd * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2)));
    }
    void *d = dalloc(2 * n);
    CK(cudaMemcpy(d, h, 2 * n, cudaMemcpyHostToDevice));
    free(h);
    return d;
}
static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++) h = (h ^ c[i]) * 1099511628211ull;
    return h;
}
static uint64_t dhash(uint64_t h, const void *d, size_t n) {
    void *x = malloc(n);
    CK(cudaMemcpy(x, d, n, cudaMemcpyDeviceToHost));
    h = fnv1a(h, x, n);
    free(x);
    return h;
}

static void shape(const char *name, int B, int S, int Hq, int Hkv, int D, int reps, int once) {
    cuda_ctx *ctx = cuda_ctx_create();
    if (!ctx) {
        fprintf(stderr, "bench_flash: no CUDA device\n");
        exit(1);
    }
    cudaStream_t st = cuda_ctx_stream(ctx);
    rng_state r;
    rng_seed(&r, 1234);
    int64_t T = (int64_t)B * S, nq = T * Hq * D, W = (int64_t)(Hq + 2 * Hkv) * D;
    void *qkv0 = drand_bf16(&r, T * W, 1.0f), *qkv = dalloc(2 * T * W);  // before RoPE, token-major
    void *dO = drand_bf16(&r, nq, 0.01f);
    int32_t *hm = malloc(4 * T);
    for (int64_t i = 0; i < T; i++) hm[i] = 1;
    int32_t *mask = dalloc(4 * T);
    CK(cudaMemcpy(mask, hm, 4 * T, cudaMemcpyHostToDevice));
    float *inv = malloc(4 * (D / 2)), *cs = malloc(4 * (size_t)S * D);
    for (int i = 0; i < D / 2; i++) inv[i] = (float)(1.0 / pow(10000.0, 2.0 * i / D));
    rope_table_host(cs, inv, S, D);
    float *dcs = dalloc(4 * (size_t)S * D);
    CK(cudaMemcpy(dcs, cs, 4 * (size_t)S * D, cudaMemcpyHostToDevice));
    void *out = dalloc(2 * nq);
    float *lse = dalloc(4 * T * Hq), *delta = dalloc(4 * T * Hq);
    void *g = dalloc(2 * T * W), *scratch = dalloc(flash_attention_scratch_bytes(B, S, Hq));
    uint16_t *h1 = malloc(2 * T * W), *h2 = malloc(2 * T * W);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float *ms = malloc(sizeof(float) * (reps + 1));
    CK(cudaDeviceSynchronize());
    // the RoPE pass alone
    if (!once) {
        for (int i = 0; i < reps + 2; i++) {
            CK(cudaMemcpyAsync(qkv, qkv0, 2 * T * W, cudaMemcpyDeviceToDevice, st));
            CK(cudaEventRecord(e0, st));
            rope_qk_cuda(ctx, qkv, W, dcs, B, S, Hq, Hkv, D);
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            if (i >= 2) CK(cudaEventElapsedTime(&ms[i - 2], e0, e1));
        }
        qsort(ms, reps, sizeof(float), probe_cmp_float);
        printf("%-6s rope pass       %8.3f ms (min %.3f)\n", name, ms[reps / 2], ms[0]);
    }
    // forward (its q|k|v, rotated, is what the backward reads)
    for (int i = 0; i < (once ? 1 : reps + 2); i++) {
        CK(cudaMemcpyAsync(qkv, qkv0, 2 * T * W, cudaMemcpyDeviceToDevice, st));
        CK(cudaEventRecord(e0, st));
        rope_qk_cuda(ctx, qkv, W, dcs, B, S, Hq, Hkv, D);
        flash_attention_forward_cuda(ctx, out, Hq * D, lse, qkv, W, mask, B, S, Hq, Hkv, D);
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        if (i >= 2) CK(cudaEventElapsedTime(&ms[i - 2], e0, e1));
    }
    if (!once) {
        qsort(ms, reps, sizeof(float), probe_cmp_float);
        uint64_t hf = dhash(dhash(1469598103934665603ull, out, 2 * nq), lse, 4 * T * Hq);
        printf("%-6s fwd (with rope) %7.3f ms (min %.3f)  hash %016llx\n", name, ms[reps / 2], ms[0], (unsigned long long)hf);
    }
    {
        int n = once ? 1 : reps + 2;
        for (int i = 0; i < n; i++) {
            if (i == n - 1 && !once) CK(cudaMemsetAsync(g, 0xff, 2 * T * W, st));  // poison before the checked run
            CK(cudaEventRecord(e0, st));
            flash_attention_backward_cuda(ctx, g, W, delta, dO, Hq * D, out, Hq * D, lse, qkv, W, mask, dcs, B, S, Hq, Hkv,
                                          D, scratch, B);
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            CK(cudaGetLastError());
            if (i >= 2) CK(cudaEventElapsedTime(&ms[i - 2], e0, e1));
            if (i == 0) CK(cudaMemcpy(h1, g, 2 * T * W, cudaMemcpyDeviceToHost));
        }
        if (!once) {
            CK(cudaMemcpy(h2, g, 2 * T * W, cudaMemcpyDeviceToHost));
            int det = !memcmp(h1, h2, 2 * T * W);
            int64_t nan = 0;
            for (int64_t i = 0; i < T * W; i++) nan += bf16_to_f32(h2[i]) != bf16_to_f32(h2[i]);  // poison left
            qsort(ms, reps, sizeof(float), probe_cmp_float);
            printf("%-6s bwd            %8.3f ms (min %.3f)  deterministic %s  unwritten/nan %lld  hash %016llx\n", name,
                   ms[reps / 2], ms[0], det ? "yes" : "NO", (long long)nan,
                   (unsigned long long)fnv1a(1469598103934665603ull, h2, 2 * T * W));
        }
    }
    cudaFree(qkv0), cudaFree(qkv), cudaFree(dO), cudaFree(mask), cudaFree(dcs), cudaFree(out), cudaFree(lse);
    cudaFree(delta), cudaFree(g), cudaFree(scratch);
    free(hm), free(inv), free(cs), free(h1), free(h2), free(ms);
    cuda_ctx_free(ctx);
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 20;
    int once = getenv("BENCH_FA_ONCE") != NULL;
    const char *only = getenv("BENCH_FA_SHAPE");
    if (!only || !strcmp(only, "7b")) shape("7b", 16, 512, 32, 32, 128, reps, once);
    if (!only || !strcmp(only, "3b")) shape("3b", 16, 512, 24, 8, 128, reps, once);
    return 0;
}
