// bench_stream: how fast a memory-bound kernel moves its bytes on this GPU, by read/write mix, by the
// values in the buffers and by the order in which the GPU's blocks walk a SwiGLU-shaped buffer. A probe,
// not a check (docs/BENCHMARKS.md, seventeenth session):
//
//   make build/tests/gpu/bench_stream && build/tests/gpu/bench_stream [I]     (I: 8192, a 3B layer)
//
// Every kernel reads gate | up of gu[T][2I + 64] (bf16, the step's gate|up output with its adapter
// columns) and writes silu(gate) * up into out[T][I + 32], T = 8192; times are the mean of 20 launches
// back to back (steady state, as in a training step), with the buffers zero and then random.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef __nv_bfloat16 bf16;

#define CHECK(x)                                                                         \
    do {                                                                                 \
        cudaError_t e_ = (x);                                                            \
        if (e_ != cudaSuccess) {                                                         \
            fprintf(stderr, "bench_stream: %s (line %d)\n", cudaGetErrorString(e_), __LINE__); \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

// 8 columns of silu(gate) * up
__device__ __forceinline__ uint4 swiglu8(uint4 g, uint4 u) {
    const __nv_bfloat162 *gg = (const __nv_bfloat162 *)&g, *uu = (const __nv_bfloat162 *)&u;
    uint4 o;
    __nv_bfloat162 *oo = (__nv_bfloat162 *)&o;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 a = __bfloat1622float2(gg[k]), b = __bfloat1622float2(uu[k]);
        a.x = a.x / (1.0f + __expf(-a.x)) * b.x;
        a.y = a.y / (1.0f + __expf(-a.y)) * b.y;
        oo[k] = __float22bfloat162_rn(a);
    }
    return o;
}

// One short pass: thread v takes columns 8 (v % (I/8)) .. of row v / (I/8) (the elementwise kernels'
// order: the blocks in flight read a window of consecutive rows).
__global__ void oneshot_kernel(bf16 *out, int64_t ldo, const bf16 *__restrict__ gu, int64_t ldgu, int64_t T, int I) {
    int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, per_row = I / 8;
    if (v >= T * per_row) return;
    int64_t t = v / per_row;
    int c = (int)(v % per_row) * 8;
    uint4 g = *(const uint4 *)(gu + t * ldgu + c), u = *(const uint4 *)(gu + t * ldgu + I + c);
    *(uint4 *)(out + t * ldo + c) = swiglu8(g, u);
}

// Tiles: block (tile of RB rows, split s) loops over its split's chunks of CK columns (the fused SwiGLU +
// product kernel's walk at RB = CK = 64 and 4 splits: every row of gu open at once).
template <int RB, int CK>
__global__ void __launch_bounds__(256) tiles_kernel(bf16 *out, int64_t ldo, const bf16 *__restrict__ gu, int64_t ldgu,
                                                    int I, int splits) {
    constexpr int PER = RB * CK / 8 / 256;
    int tile = blockIdx.x / splits, s = blockIdx.x % splits;
    for (int c0 = s * (I / splits); c0 < (s + 1) * (I / splits); c0 += CK) {
        uint4 g[PER], u[PER];
#pragma unroll
        for (int k = 0; k < PER; k++) {
            int i = threadIdx.x + 256 * k, r = i / (CK / 8), c = c0 + (i % (CK / 8)) * 8;
            const bf16 *p = gu + (int64_t)(tile * RB + r) * ldgu + c;
            g[k] = *(const uint4 *)p;
            u[k] = *(const uint4 *)(p + I);
        }
#pragma unroll
        for (int k = 0; k < PER; k++) {
            int i = threadIdx.x + 256 * k, r = i / (CK / 8), c = c0 + (i % (CK / 8)) * 8;
            *(uint4 *)(out + (int64_t)(tile * RB + r) * ldo + c) = swiglu8(g[k], u[k]);
        }
    }
}

// Bands: block (slice s of W columns, group gi) walks bands gi, gi + G, ... of RB rows over its slice,
// slices numbered fastest (the blocks in flight read a window of G bands of whole rows).
template <int RB, int W>
__global__ void __launch_bounds__(256) bands_kernel(bf16 *out, int64_t ldo, const bf16 *__restrict__ gu, int64_t ldgu,
                                                    int I, int64_t T, int S, int G) {
    constexpr int PER = RB * W / 8 / 256;
    int s = blockIdx.x % S, gi = blockIdx.x / S;
    for (int64_t band = gi; band < T / RB; band += G) {
        uint4 g[PER], u[PER];
#pragma unroll
        for (int k = 0; k < PER; k++) {
            int i = threadIdx.x + 256 * k, r = i / (W / 8), c = s * W + (i % (W / 8)) * 8;
            const bf16 *p = gu + (band * RB + r) * ldgu + c;
            g[k] = *(const uint4 *)p;
            u[k] = *(const uint4 *)(p + I);
        }
#pragma unroll
        for (int k = 0; k < PER; k++) {
            int i = threadIdx.x + 256 * k, r = i / (W / 8), c = s * W + (i % (W / 8)) * 8;
            *(uint4 *)(out + (band * RB + r) * ldo + c) = swiglu8(g[k], u[k]);
        }
    }
}

// Plain streams of 16-byte vectors: n reads, one write.
__global__ void read_kernel(const uint4 *a, int64_t n, unsigned *sink) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint4 v = a[i];
    if ((v.x ^ v.y ^ v.z ^ v.w) == 0x9e3779b9u) *sink = 1;  // keeps the load
}
__global__ void copy_kernel(uint4 *b, const uint4 *a, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) b[i] = a[i];
}
__global__ void add_kernel(uint4 *c, const uint4 *a, const uint4 *b, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint4 x = a[i], y = b[i];
    c[i] = make_uint4(x.x ^ y.x, x.y ^ y.y, x.z ^ y.z, x.w ^ y.w);
}

// bf16 values in [-3, 3) from a hash of the index (what a GEMM's output looks like to the memory).
__global__ void fill_random_kernel(bf16 *p, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint32_t x = (uint32_t)i * 2654435761u;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    p[i] = __float2bfloat16_rn(((float)(x & 0xffff) / 65536.0f - 0.5f) * 6.0f);
}

static cudaEvent_t e0, e1;

template <typename F>
static void timed(const char *name, double bytes, F launch) {
    for (int i = 0; i < 3; i++) launch();
    CHECK(cudaEventRecord(e0));
    for (int i = 0; i < 20; i++) launch();
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    CHECK(cudaGetLastError());
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    ms /= 20;
    printf("  %-44s %7.1f us  %5.0f GB/s\n", name, ms * 1e3, bytes / ms / 1e6);
}

int main(int argc, char **argv) {
    const int64_t T = 8192;
    int I = argc > 1 ? atoi(argv[1]) : 8192;
    if (I <= 0 || I % 2048) {
        fprintf(stderr, "bench_stream: I must be a positive multiple of 2048 (got %s)\n", argv[1]);
        return 2;
    }
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    int64_t ldgu = 2 * (int64_t)I + 64, ldo = I + 32, ngu = T * ldgu;
    bf16 *gu, *out;
    CHECK(cudaMalloc((void **)&gu, sizeof(bf16) * ngu));
    CHECK(cudaMalloc((void **)&out, sizeof(bf16) * T * ldo));
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    double bytes = (double)T * I * 2 * 3;  // gate and up read, out written
    for (int random = 0; random < 2; random++) {
        if (random)
            fill_random_kernel<<<(unsigned)((ngu + 255) / 256), 256>>>(gu, ngu);
        else
            CHECK(cudaMemset(gu, 0, sizeof(bf16) * ngu));
        CHECK(cudaDeviceSynchronize());
        printf("SwiGLU forward, T %lld, I %d, buffers %s:\n", (long long)T, I, random ? "random" : "zero");
        timed("one short pass (the elementwise kernel)", bytes, [&] {
            oneshot_kernel<<<(unsigned)((T * (I / 8) + 255) / 256), 256>>>(out, ldo, gu, ldgu, T, I);
        });
        timed("tiles 64 rows x 64 columns, 4 splits", bytes,
              [&] { tiles_kernel<64, 64><<<(unsigned)(T / 64 * 4), 256>>>(out, ldo, gu, ldgu, I, 4); });
        timed("tiles 8 rows x 1024 columns, 1 split", bytes,
              [&] { tiles_kernel<8, 1024><<<(unsigned)(T / 8), 256>>>(out, ldo, gu, ldgu, I, 1); });
        timed("tiles 16 rows x 512 columns, 1 split", bytes,
              [&] { tiles_kernel<16, 512><<<(unsigned)(T / 16), 256>>>(out, ldo, gu, ldgu, I, 1); });
        for (int per_sm = 1; per_sm <= 8; per_sm *= 2) {
            int S = I / 512, G = per_sm * sms / S;
            char name[64];
            snprintf(name, sizeof name, "bands of 16 rows x 512 columns, %d a SM", per_sm);
            timed(name, bytes,
                  [&] { bands_kernel<16, 512><<<(unsigned)(S * G), 256>>>(out, ldo, gu, ldgu, I, T, S, G); });
        }
    }
    // the same bytes as plain streams (random: gu's first third and its other two)
    int64_t n = T * I * 2 / 16;  // 16-byte vectors of a [T][I] bf16 array
    uint4 *a = (uint4 *)gu, *b = a + n, *c = (uint4 *)out;
    unsigned *sink;
    CHECK(cudaMalloc((void **)&sink, sizeof(unsigned)));
    unsigned grid = (unsigned)((n + 255) / 256);
    printf("plain streams of %lld MB arrays, random:\n", (long long)(n * 16 >> 20));
    timed("read", (double)n * 16, [&] { read_kernel<<<grid, 256>>>(a, n, sink); });
    timed("copy (1 read, 1 write)", 2.0 * n * 16, [&] { copy_kernel<<<grid, 256>>>(c, a, n); });
    timed("2 reads, 1 write", 3.0 * n * 16, [&] { add_kernel<<<grid, 256>>>(c, a, b, n); });
    CHECK(cudaFree(sink));
    CHECK(cudaFree(gu));
    CHECK(cudaFree(out));
    return 0;
}
