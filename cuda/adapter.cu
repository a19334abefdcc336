// adapter.cu: the adapter's kernels: gathering a layer's effective factors A^i, B^i (bf16) from the
// fp32 parameter buffer (MoS pools, LoRA matrices), scattering the factors' gradients back, and the
// adapter-input dropout (the mask regenerated from the Philox key, as adapter_dropout_mask does on the
// CPU, so forward, recomputation and backward see the same mask without storing it).
//
// The low-rank products themselves are GEMMs issued by the backend (cuda/backend_cuda.cu).
#include <string.h>

#include "core/rng.h"
#include "cuda/cuda_util.cuh"

// ---- CUDA kernels ----------------------------------------------------------------------------------

__global__ void gather_a_kernel(lowrank_map mp, const float *__restrict__ params, bf16 *A) {
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (int64_t)mp.r * mp.d_in) return;
    int k = (int)(e / mp.d_in), col = (int)(e % mp.d_in), sa = mp.d_in / mp.l;
    int j = col / sa, c = col % sa;
    float v = params[mp.offA[k * mp.l + j] + c];
    if (mp.scaleA) v = __fmul_rn(mp.scaleA[k], v);
    A[e] = __float2bfloat16_rn(v);
}

__global__ void gather_b_kernel(lowrank_map mp, const float *__restrict__ params, bf16 *B) {
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (int64_t)mp.d_out * mp.r) return;
    int d = (int)(e / mp.r), k = (int)(e % mp.r), sb = mp.d_out / mp.l;
    int j = d / sb, c = d % sb;
    B[(int64_t)d * mp.ldB + k] = __float2bfloat16_rn(__fmul_rn(mp.scaleB, params[mp.offB[k * mp.l + j] + (int64_t)c * mp.strideB]));
}

// Every target is written by exactly one thread (distinct indices within a layer): no atomics.
__global__ void scatter_a_kernel(lowrank_map mp, const float *__restrict__ gA, float *grad) {
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (int64_t)mp.r * mp.d_in) return;
    int k = (int)(e / mp.d_in), col = (int)(e % mp.d_in), sa = mp.d_in / mp.l;
    int j = col / sa, c = col % sa;
    float g = gA[e];
    if (mp.scaleA) g = __fmul_rn(mp.scaleA[k], g);
    float *dst = grad + mp.offA[k * mp.l + j] + c;
    *dst = __fadd_rn(*dst, g);
}

__global__ void scatter_b_kernel(lowrank_map mp, const float *__restrict__ gB, float *grad) {
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (int64_t)mp.d_out * mp.r) return;
    int d = (int)(e / mp.r), k = (int)(e % mp.r), sb = mp.d_out / mp.l;
    int j = d / sb, c = d % sb;
    float *dst = grad + mp.offB[k * mp.l + j] + (int64_t)c * mp.strideB;
    *dst = __fadd_rn(*dst, gB[(int64_t)d * mp.ldB + k]);
}

// Dropout kernels: a thread takes the four elements of one Philox block (elements 4j .. 4j+3 of the
// module's T x d_in stream are the four lanes of block j, as rng_u32 defines them), so one Philox
// evaluation serves four elements (the generator, not memory, bounded the one-element version).
// d_in % 4 == 0, so the four share a row.
// Four consecutive bf16 (8-byte aligned) to and from fp32.
__device__ __forceinline__ void load4(const bf16 *p, float *f) {
    uint2 u = *(const uint2 *)p;
    const bf16 *h = (const bf16 *)&u;
#pragma unroll
    for (int k = 0; k < 4; k++) f[k] = __bfloat162float(h[k]);
}
__device__ __forceinline__ void store4(bf16 *p, const float *f) {
    __align__(8) bf16 h[4];
#pragma unroll
    for (int k = 0; k < 4; k++) h[k] = __float2bfloat16_rn(f[k]);
    *(uint2 *)p = *(const uint2 *)h;
}

__device__ __forceinline__ void keep4(uint64_t key, int64_t j, uint32_t thr, float keep, float m[4]) {
    uint32_t o[4];
    rng_philox4(key, (uint64_t)j, o);
#pragma unroll
    for (int i = 0; i < 4; i++) m[i] = o[i] >= thr ? keep : 0.0f;
}

__global__ void dropout_apply_kernel(bf16 *xd, const bf16 *__restrict__ x, int64_t ldx, int64_t T, int d_in,
                                     uint64_t key, uint32_t thr, float keep) {
    int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, e = 4 * j;
    if (e >= T * d_in) return;
    int64_t t = e / d_in;
    int c = (int)(e % d_in);
    float m[4], v[4];
    keep4(key, j, thr, keep, m);
    load4(x + t * ldx + c, v);
#pragma unroll
    for (int k = 0; k < 4; k++) v[k] *= m[k];
    store4(xd + e, v);
}

// With dropout, a group's input gradient gx += sum_i mask_i * (gh_i A_i) in one pass over gx (instead
// of a GEMM into an fp32 scratch and a masked add per module). Block: 64 rows x 64 columns, 256
// threads; thread (ty, tx) owns rows 4ty .. 4ty+3 and the four columns 4tx .. 4tx+3, which are one
// Philox block of each row (d_in % 4 == 0). The rank is walked in chunks of 32 through shared memory;
// fp32 products (the ranks are small: CUDA cores, no tensor cores).
#define DX_TILE 64
#define DX_KC 32
typedef struct {
    uint64_t key[3];
} dx_keys;

__global__ void __launch_bounds__(256) lowrank_dropout_dx_kernel(void *gx, int gx_f32, int64_t ldgx, const bf16 *__restrict__ gh,
                                                                 int64_t ldgh, const bf16 *__restrict__ A, int n, int r,
                                                                 int64_t T, int d_in, dx_keys keys, uint32_t thr, float keep) {
    __shared__ float Gs[DX_TILE][DX_KC + 1];  // gh chunk [rows][k]
    __shared__ __align__(16) float As[DX_KC][DX_TILE];  // A chunk [k][cols]
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    int64_t r0 = (int64_t)blockIdx.y * DX_TILE;
    int c0 = blockIdx.x * DX_TILE, col = c0 + 4 * tx;
    float out[4][4] = {};
    for (int i = 0; i < n; i++) {
        float acc[4][4] = {};
        for (int k0 = 0; k0 < r; k0 += DX_KC) {
            int kc = r - k0 < DX_KC ? r - k0 : DX_KC;
            for (int e = threadIdx.x; e < DX_TILE * DX_KC; e += blockDim.x) {
                int row = e / DX_KC, k = e % DX_KC;
                Gs[row][k] = r0 + row < T && k < kc ? __bfloat162float(gh[(r0 + row) * ldgh + i * r + k0 + k]) : 0.0f;
                int kk = e / DX_TILE, cc = e % DX_TILE;
                As[kk][cc] = kk < kc && c0 + cc < d_in ? __bfloat162float(A[((int64_t)i * r + k0 + kk) * d_in + c0 + cc]) : 0.0f;
            }
            __syncthreads();
            for (int k = 0; k < kc; k++) {
                float4 b = *(const float4 *)&As[k][4 * tx];
#pragma unroll
                for (int a = 0; a < 4; a++) {
                    float g = Gs[4 * ty + a][k];
                    acc[a][0] = fmaf(g, b.x, acc[a][0]);
                    acc[a][1] = fmaf(g, b.y, acc[a][1]);
                    acc[a][2] = fmaf(g, b.z, acc[a][2]);
                    acc[a][3] = fmaf(g, b.w, acc[a][3]);
                }
            }
            __syncthreads();
        }
        if (col < d_in) {
#pragma unroll
            for (int a = 0; a < 4; a++) {
                int64_t t = r0 + 4 * ty + a;
                if (t >= T) continue;
                float m[4];
                keep4(keys.key[i], (t * d_in + col) / 4, thr, keep, m);
#pragma unroll
                for (int b = 0; b < 4; b++) out[a][b] += acc[a][b] * m[b];
            }
        }
    }
    if (col >= d_in) return;
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int64_t t = r0 + 4 * ty + a;
        if (t >= T) continue;
        if (gx_f32) {
            float4 *p = (float4 *)((float *)gx + t * ldgx + col);
            float4 v = *p;
            *p = make_float4(v.x + out[a][0], v.y + out[a][1], v.z + out[a][2], v.w + out[a][3]);
        } else {
            bf16 *p = (bf16 *)gx + t * ldgx + col;
            float v[4];
            load4(p, v);
#pragma unroll
            for (int b = 0; b < 4; b++) v[b] += out[a][b];
            store4(p, v);
        }
    }
}

// ---- the maps, on the host ------------------------------------------------------------------------

extern "C" int lowrank_map_shards(const adapter *ad) { return !strcmp(ad->spec.method, "mos") ? ad->spec.shards : 1; }

extern "C" int lowrank_map_host(const adapter *ad, int layer, int module, int64_t *offA, int64_t *offB, float *scale,
                                int *has_scale, int *l_out, int *strideB) {
    int r = ad->rank, di, dout;
    llama_module_dims(&ad->model, module, &di, &dout);
    char name[ADAPTER_NAME_MAX];
    const char *mn = k_module_names[module];
    *has_scale = 0;
    if (!strcmp(ad->spec.method, "mos")) {
        int l = ad->spec.shards, sa = di / l, sb = dout / l;
        snprintf(name, sizeof name, "mos.%s.pool_A", mn);
        const adapter_tensor *pa = adapter_find_tensor(ad, name);
        snprintf(name, sizeof name, "mos.%s.pool_B", mn);
        const adapter_tensor *pb = adapter_find_tensor(ad, name);
        snprintf(name, sizeof name, "mos.%s.index_A", mn);
        const adapter_buffer *ia = adapter_find_buffer(ad, name);
        snprintf(name, sizeof name, "mos.%s.index_B", mn);
        const adapter_buffer *ib = adapter_find_buffer(ad, name);
        snprintf(name, sizeof name, "mos.%s.scale", mn);
        const adapter_buffer *sc = adapter_find_buffer(ad, name);
        MOSFT_ASSERT(pa && pb && ia && ib);
        const int32_t *ta = (const int32_t *)ia->data + (size_t)layer * r * l;
        const int32_t *tb = (const int32_t *)ib->data + (size_t)layer * r * l;
        for (int e = 0; e < r * l; e++) {
            offA[e] = (int64_t)pa->offset + (int64_t)ta[e] * sa;
            offB[e] = (int64_t)pb->offset + (int64_t)tb[e] * sb;
        }
        if (sc) {
            memcpy(scale, (const float *)sc->data + (size_t)layer * r, sizeof(float) * (size_t)r);
            *has_scale = 1;
        }
        *l_out = l;
        *strideB = 1;
        return MOSFT_OK;
    }
    if (!strcmp(ad->spec.method, "lora")) {
        snprintf(name, sizeof name, "lora.layers.%d.%s.A", layer, mn);
        const adapter_tensor *A = adapter_find_tensor(ad, name);
        snprintf(name, sizeof name, "lora.layers.%d.%s.B", layer, mn);
        const adapter_tensor *B = adapter_find_tensor(ad, name);
        MOSFT_ASSERT(A && B);
        for (int k = 0; k < r; k++) {
            offA[k] = (int64_t)A->offset + (int64_t)k * di;
            offB[k] = (int64_t)B->offset + k;
        }
        *l_out = 1;
        *strideB = r;
        return MOSFT_OK;
    }
    return mosft_fail_hint(MOSFT_ERR_INPUT, "use device \"cpu\" (--set device=cpu) for this method",
                           "adapter.method: the CUDA backend trains \"mos\" and \"lora\", got \"%s\"", ad->spec.method);
}

// ---- kernel launchers ---------------------------------------------------------------------------------

extern "C" void lowrank_gather_cuda(cuda_ctx *ctx, const lowrank_map *mp, const float *params, bf16 *A, bf16 *B) {
    int64_t na = (int64_t)mp->r * mp->d_in, nb = (int64_t)mp->d_out * mp->r;
    gather_a_kernel<<<ceil_div_i(na, 256), 256, 0, ctx->stream>>>(*mp, params, A);
    CUDA_LAUNCH_CHECK();
    gather_b_kernel<<<ceil_div_i(nb, 256), 256, 0, ctx->stream>>>(*mp, params, B);
    CUDA_LAUNCH_CHECK();
}

extern "C" void lowrank_scatter_cuda(cuda_ctx *ctx, const lowrank_map *mp, const float *gA, const float *gB, float *grad) {
    int64_t na = (int64_t)mp->r * mp->d_in, nb = (int64_t)mp->d_out * mp->r;
    scatter_a_kernel<<<ceil_div_i(na, 256), 256, 0, ctx->stream>>>(*mp, gA, grad);
    CUDA_LAUNCH_CHECK();
    scatter_b_kernel<<<ceil_div_i(nb, 256), 256, 0, ctx->stream>>>(*mp, gB, grad);
    CUDA_LAUNCH_CHECK();
}

extern "C" void dropout_apply_cuda(cuda_ctx *ctx, bf16 *xd, const bf16 *x, int64_t ldx, int64_t T, int d_in, uint64_t key,
                                   uint32_t thr, float keep) {
    int64_t n = T * d_in;
    if (n == 0) return;
    MOSFT_ASSERT(d_in % 4 == 0 && ldx % 4 == 0);
    dropout_apply_kernel<<<ceil_div_i(n / 4, 256), 256, 0, ctx->stream>>>(xd, x, ldx, T, d_in, key, thr, keep);
    CUDA_LAUNCH_CHECK();
}

extern "C" void lowrank_dropout_dx_cuda(cuda_ctx *ctx, void *gx, int gx_f32, int64_t ldgx, const bf16 *gh, int64_t ldgh,
                                        const bf16 *A, int n, int r, int64_t T, int d_in, const uint64_t *keys,
                                        uint32_t thr, float keep) {
    if (T == 0 || n == 0) return;
    MOSFT_ASSERT(n >= 1 && n <= 3 && d_in % 4 == 0 && ldgx % 4 == 0);
    dx_keys k;
    memset(&k, 0, sizeof k);
    for (int i = 0; i < n; i++) k.key[i] = keys[i];
    dim3 grid((unsigned)ceil_div_i(d_in, DX_TILE), (unsigned)ceil_div_i(T, DX_TILE));
    lowrank_dropout_dx_kernel<<<grid, 256, 0, ctx->stream>>>(gx, gx_f32, ldgx, gh, ldgh, A, n, r, T, d_in, k, thr, keep);
    CUDA_LAUNCH_CHECK();
}
