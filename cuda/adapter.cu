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

__global__ void dropout_apply_kernel(bf16 *xd, const bf16 *__restrict__ x, int64_t ldx, int64_t T, int d_in,
                                     uint64_t key, uint32_t thr, float keep) {
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= T * d_in) return;
    int64_t t = e / d_in;
    int c = (int)(e % d_in);
    float m = rng_keep(key, (uint64_t)e, thr) ? keep : 0.0f;
    xd[e] = __float2bfloat16_rn(__bfloat162float(x[t * ldx + c]) * m);
}

__global__ void dropout_backward_kernel(void *gx, int gx_f32, int64_t ldgx, const float *__restrict__ g, int64_t T,
                                        int d_in, uint64_t key, uint32_t thr, float keep) {
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= T * d_in) return;
    int64_t t = e / d_in;
    int c = (int)(e % d_in);
    float m = rng_keep(key, (uint64_t)e, thr) ? keep : 0.0f;
    float add = g[e] * m;
    if (gx_f32) {
        float *p = (float *)gx + t * ldgx + c;
        *p += add;
    } else {
        bf16 *p = (bf16 *)gx + t * ldgx + c;
        *p = __float2bfloat16_rn(__bfloat162float(*p) + add);
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
    dropout_apply_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(xd, x, ldx, T, d_in, key, thr, keep);
    CUDA_LAUNCH_CHECK();
}

extern "C" void dropout_backward_add_cuda(cuda_ctx *ctx, void *gx, int gx_f32, int64_t ldgx, const float *g, int64_t T,
                                          int d_in, uint64_t key, uint32_t thr, float keep) {
    int64_t n = T * d_in;
    if (n == 0) return;
    dropout_backward_kernel<<<ceil_div_i(n, 256), 256, 0, ctx->stream>>>(gx, gx_f32, ldgx, g, T, d_in, key, thr, keep);
    CUDA_LAUNCH_CHECK();
}
