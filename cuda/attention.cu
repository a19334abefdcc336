// attention.cu: rotary embedding (in place on the q|k|v projection's output, which attention reads
// token-major) and causal grouped-query attention with a key padding mask, forward and backward (twins
// of rope_*_cpu and attention_*_cpu). Head sizes 16, 32, 64 and 128 go to the FlashAttention-style
// kernels of flash_attention.cu; the others (stories260K's 8), or MOSFT_ATTENTION=gemm, take the path
// below.
//
// That path is "batched GEMMs + a fused masked softmax", the simple correct version: per chunk of
// sequences, q, k, v are copied head-major, scores = scale * Q K^T (fp32, cuBLASLt strided-batched), a
// softmax kernel applies the causal and padding masks and writes the probabilities (bf16) and each row's
// log-sum-exp, and O = P V. GQA needs no further copies: query head h = kv*group + g, so for each g the
// query heads {kv*group + g} are one strided batch against the kv heads. Backward recomputes the probabilities
// from the saved log-sum-exp (nothing of size S^2 is kept between forward and backward) and follows
// FlashAttention's equations: dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = scale dS K,
// dK = scale dS^T Q, dV = P^T dO (dK, dV summed over a kv head's query heads by GEMM accumulation),
// then RoPE's backward merges them into the q|k|v projection's gradient. The full S x S products are
// computed; the masked half is zero.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda_util.cuh"

// ---- CUDA kernels ----------------------------------------------------------------------------------

// RoPE in place on the NH = Hq + Hkv q and k heads of the token-major projection qkv[B*S][ld] (the v heads
// after them are not touched): one thread per rotated pair.
__global__ void rope_qk_kernel(bf16 *qkv, int64_t ld, const float2 *__restrict__ cs, int S, int NH, int D, int64_t total) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    int half = D / 2;
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    int i = (int)(e % half);
    int64_t r = e / half;
    int hh = (int)(r % NH);
    int64_t t = r / NH;
    int s = (int)(t % S);
    bf16 *x = qkv + t * ld + (int64_t)hh * D;
    float x1 = __bfloat162float(x[i]), x2 = __bfloat162float(x[i + half]);
    float2 c = cs[(int64_t)s * half + i];
    x[i] = __float2bfloat16_rn(x1 * c.x - x2 * c.y);
    x[i + half] = __float2bfloat16_rn(x2 * c.x + x1 * c.y);
}

// RoPE on 8 pairs held as two 16-byte vectors: lo = x[i .. i+8), hi = x[i + D/2 .. i + D/2 + 8) of a head,
// c4[4] = (cos, sin) of pairs i .. i+8 (float2 each): lo' = lo cos - hi sin, hi' = hi cos + lo sin, in fp32,
// rounded to bf16 (rope_forward_cpu's arithmetic). In place.
__device__ __forceinline__ void rope8(uint4 &lo, uint4 &hi, const float4 *c4) {
    const bf16 *h1 = (const bf16 *)&lo, *h2 = (const bf16 *)&hi;
    __align__(16) bf16 o1[8], o2[8];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float4 c = c4[j];  // (cos, sin) of pairs i + 2j, i + 2j + 1
        float a0 = __bfloat162float(h1[2 * j]), b0 = __bfloat162float(h2[2 * j]);
        float a1 = __bfloat162float(h1[2 * j + 1]), b1 = __bfloat162float(h2[2 * j + 1]);
        o1[2 * j] = __float2bfloat16_rn(a0 * c.x - b0 * c.y);
        o2[2 * j] = __float2bfloat16_rn(b0 * c.x + a0 * c.y);
        o1[2 * j + 1] = __float2bfloat16_rn(a1 * c.z - b1 * c.w);
        o2[2 * j + 1] = __float2bfloat16_rn(b1 * c.z + a1 * c.w);
    }
    lo = *(const uint4 *)o1;
    hi = *(const uint4 *)o2;
}

// 8 consecutive pairs (two 16-byte loads, two 16-byte stores) per thread when D % 16 == 0.
__global__ void rope_qk8_kernel(bf16 *qkv, int64_t ld, const float2 *__restrict__ cs, int S, int NH, int D,
                                int64_t total) {
    pdl_wait();  // launched by launch_pdl (cuda/cuda_util.cuh)
    int half = D / 2, per = half / 8;
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    int i = (int)(e % per) * 8;
    int64_t r = e / per;
    int hh = (int)(r % NH);
    int64_t t = r / NH;
    int s = (int)(t % S);
    bf16 *x = qkv + t * ld + (int64_t)hh * D;
    uint4 u1 = *(const uint4 *)(x + i), u2 = *(const uint4 *)(x + i + half);
    rope8(u1, u2, (const float4 *)(cs + (int64_t)s * half + i));
    *(uint4 *)(x + i) = u1;
    *(uint4 *)(x + i + half) = u2;
}

__global__ void rope_merge_backward_kernel(bf16 *gqkv, int64_t ldg, const float *__restrict__ gq, const float *__restrict__ gk,
                                           const float *__restrict__ gv, const float2 *__restrict__ cs, int B, int S,
                                           int Hq, int Hkv, int D) {
    int half = D / 2, NH = Hq + 2 * Hkv;
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, total = (int64_t)B * S * NH * half;
    if (e >= total) return;
    int i = (int)(e % half);
    int64_t r = e / half;
    int hh = (int)(r % NH);
    int64_t t = r / NH;
    int b = (int)(t / S), s = (int)(t % S);
    bf16 *dst = gqkv + t * ldg + (int64_t)hh * D;
    const float *src;
    if (hh < Hq) {
        src = gq + (((int64_t)b * Hq + hh) * S + s) * D;
    } else if (hh < Hq + Hkv) {
        src = gk + (((int64_t)b * Hkv + (hh - Hq)) * S + s) * D;
    } else {
        src = gv + (((int64_t)b * Hkv + (hh - Hq - Hkv)) * S + s) * D;
        dst[i] = __float2bfloat16_rn(src[i]);
        dst[i + half] = __float2bfloat16_rn(src[i + half]);
        return;
    }
    float g1 = src[i], g2 = src[i + half];
    float2 c = cs[(int64_t)s * half + i];
    dst[i] = __float2bfloat16_rn(g1 * c.x + g2 * c.y);
    dst[i + half] = __float2bfloat16_rn(g2 * c.x - g1 * c.y);
}

// head-major [B][H][S][D] <-> token-major [B*S][H*D], 8 elements per thread (D % 8 == 0).
__global__ void heads_tokens_kernel(bf16 *tok, int64_t ldt, bf16 *heads, int B, int S, int H, int D, int to_tokens) {
    int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, per = D / 8, total = (int64_t)B * S * H * per;
    if (e >= total) return;
    int d = (int)(e % per) * 8;
    int64_t r = e / per;
    int h = (int)(r % H);
    int64_t t = r / H;
    int b = (int)(t / S), s = (int)(t % S);
    uint4 *pt = (uint4 *)(tok + t * ldt + (int64_t)h * D + d);
    uint4 *ph = (uint4 *)(heads + (((int64_t)b * H + h) * S + s) * D + d);
    if (to_tokens)
        *pt = *ph;
    else
        *ph = *pt;
}

// One warp per score row (b, h, i) of a chunk: p_j = softmax over the allowed keys j <= i with
// mask[j] != 0; a key more than 46 below the row's maximum gets exactly 0 (attention_forward_cpu).
__global__ void attn_softmax_kernel(bf16 *P, float *lse, const float *__restrict__ Sc, const int32_t *__restrict__ mask,
                                    int b0, int bc, int Hq, int S) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (row >= (int64_t)bc * Hq * S) return;
    int i = (int)(row % S);
    int64_t bh = row / S;
    int b = b0 + (int)(bh / Hq), h = (int)(bh % Hq);
    const float *s = Sc + row * S;
    const int32_t *mk = mask + (int64_t)b * S;
    float mx = -INFINITY;
    for (int j = lane; j <= i; j += 32)
        if (mk[j]) mx = fmaxf(mx, s[j]);
    mx = warp_max(mx);
    float sum = 0.0f;
    if (mx != -INFINITY)
        for (int j = lane; j <= i; j += 32)
            if (mk[j]) {
                float e = s[j] - mx;
                sum += e < -46.0f ? 0.0f : expf(e);
            }
    sum = warp_sum(sum);
    bf16 *p = P + row * S;
    float inv = mx == -INFINITY ? 0.0f : 1.0f / sum;
    for (int j = lane; j < S; j += 32) {
        float v = 0.0f;
        if (j <= i && mk[j]) {
            float e = s[j] - mx;
            v = e < -46.0f ? 0.0f : expf(e) * inv;
        }
        p[j] = __float2bfloat16_rn(v);
    }
    if (lane == 0) lse[((int64_t)b * Hq + h) * S + i] = mx == -INFINITY ? INFINITY : mx + logf(sum);
}

// Backward: P = exp(s - lse) on the allowed keys (0 elsewhere and for rows without keys).
__global__ void attn_probs_kernel(bf16 *P, const float *__restrict__ Sc, const float *__restrict__ lse,
                                  const int32_t *__restrict__ mask, int b0, int bc, int Hq, int S) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (row >= (int64_t)bc * Hq * S) return;
    int i = (int)(row % S);
    int64_t bh = row / S;
    int b = b0 + (int)(bh / Hq), h = (int)(bh % Hq);
    float L = lse[((int64_t)b * Hq + h) * S + i];
    const float *s = Sc + row * S;
    const int32_t *mk = mask + (int64_t)b * S;
    bf16 *p = P + row * S;
    for (int j = lane; j < S; j += 32) {
        float v = 0.0f;
        if (j <= i && mk[j]) {
            float e = s[j] - L;
            v = e < -46.0f ? 0.0f : expf(e);
        }
        p[j] = __float2bfloat16_rn(v);
    }
}

// dS = P (dP - delta), in place over P; dP (fp32) in Sc.
__global__ void attn_dscores_kernel(bf16 *P, const float *__restrict__ dP, const float *__restrict__ delta, int b0,
                                    int bc, int Hq, int S) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (row >= (int64_t)bc * Hq * S) return;
    int i = (int)(row % S);
    int64_t bh = row / S;
    int b = b0 + (int)(bh / Hq), h = (int)(bh % Hq);
    float dl = delta[((int64_t)b * Hq + h) * S + i];
    bf16 *p = P + row * S;
    const float *dp = dP + row * S;
    for (int j = lane; j <= i && j < S; j += 32) {
        float pv = __bfloat162float(p[j]);
        p[j] = __float2bfloat16_rn(pv * (dp[j] - dl));
    }
}

// delta[b][h][s] = sum_d gout[t][h*D + d] * out[t][h*D + d]: one warp per (t, h).
__global__ void attn_delta_kernel(float *delta, const bf16 *__restrict__ gout, const bf16 *__restrict__ out, int64_t ldo,
                                  int B, int S, int Hq, int D) {
    int64_t w = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (w >= (int64_t)B * S * Hq) return;
    int h = (int)(w % Hq);
    int64_t t = w / Hq;
    int b = (int)(t / S), s = (int)(t % S);
    const bf16 *g = gout + t * (int64_t)Hq * D + (int64_t)h * D, *o = out + t * ldo + (int64_t)h * D;
    float acc = 0.0f;
    for (int d = lane; d < D; d += 32) acc += __bfloat162float(g[d]) * __bfloat162float(o[d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[((int64_t)b * Hq + h) * S + s] = acc;
}

// ---- kernel launchers ---------------------------------------------------------------------------------

extern "C" void rope_table_host(float *cs, const float *inv_freq, int S, int D) {
    int half = D / 2;
    for (int s = 0; s < S; s++)
        for (int i = 0; i < half; i++) {
            float a = (float)s * inv_freq[i];
            cs[((int64_t)s * half + i) * 2] = (float)cos((double)a);
            cs[((int64_t)s * half + i) * 2 + 1] = (float)sin((double)a);
        }
}

extern "C" void rope_qk_cuda(cuda_ctx *ctx, bf16 *qkv, int64_t ld, const float *cs, int B, int S, int Hq, int Hkv, int D) {
    MOSFT_ASSERT(D % 2 == 0);
    int NH = Hq + Hkv;
    int64_t total = (int64_t)B * S * NH * (D / 2);
    if (total == 0) return;
    if (D % 16 == 0 && ld % 8 == 0 && (uintptr_t)qkv % 16 == 0)
        launch_pdl(rope_qk8_kernel, dim3(ceil_div_i(total / 8, 256)), dim3(256), 0, ctx->stream, qkv, ld,
                   (const float2 *)cs, S, NH, D, total / 8);
    else
        launch_pdl(rope_qk_kernel, dim3(ceil_div_i(total, 256)), dim3(256), 0, ctx->stream, qkv, ld, (const float2 *)cs,
                   S, NH, D, total);
    CUDA_LAUNCH_CHECK();
}

extern "C" void rope_merge_backward_cuda(cuda_ctx *ctx, bf16 *gqkv, int64_t ldg, const float *gq, const float *gk,
                                         const float *gv, const float *cs, int B, int S, int Hq, int Hkv, int D) {
    int64_t total = (int64_t)B * S * (Hq + 2 * Hkv) * (D / 2);
    if (total == 0) return;
    rope_merge_backward_kernel<<<ceil_div_i(total, 256), 256, 0, ctx->stream>>>(gqkv, ldg, gq, gk, gv, (const float2 *)cs, B,
                                                                                S, Hq, Hkv, D);
    CUDA_LAUNCH_CHECK();
}

static void heads_tokens(cuda_ctx *ctx, bf16 *tok, int64_t ldt, bf16 *heads, int B, int S, int H, int D, int to_tokens) {
    MOSFT_ASSERT(D % 8 == 0 && ldt % 8 == 0);
    int64_t total = (int64_t)B * S * H * (D / 8);
    if (total == 0) return;
    heads_tokens_kernel<<<ceil_div_i(total, 256), 256, 0, ctx->stream>>>(tok, ldt, heads, B, S, H, D, to_tokens);
    CUDA_LAUNCH_CHECK();
}

// Scores (fp32) and probabilities (bf16) of a chunk, then its q, k, v head-major (bf16).
extern "C" size_t attention_scratch_bytes(int bc, int S, int Hq, int Hkv, int D) {
    size_t n = (size_t)bc * Hq * S * S;
    return cuda_align(n * 4) + cuda_align(n * 2) + cuda_align((size_t)bc * S * (Hq + 2 * Hkv) * D * 2);
}

extern "C" int attention_chunk(size_t budget, int B, int S, int Hq, int Hkv, int D) {
    int bc = B;
    while (bc > 1 && attention_scratch_bytes(bc, S, Hq, Hkv, D) > budget) bc--;
    return bc;
}

// The chunk's q, k, v (sequences b0 .. b0+n-1 of the token-major qkv) head-major into the scratch after its
// scores and probabilities: [n][Hq][S][D], [n][Hkv][S][D], [n][Hkv][S][D].
static void chunk_heads(cuda_ctx *ctx, bf16 **qh, bf16 **kh, bf16 **vh, void *scratch, int bc, const bf16 *qkv,
                        int64_t ldqkv, int b0, int n, int S, int Hq, int Hkv, int D) {
    size_t sc = (size_t)bc * Hq * S * S;
    *qh = (bf16 *)((char *)scratch + cuda_align(sc * 4) + cuda_align(sc * 2));
    *kh = *qh + (int64_t)n * Hq * S * D;
    *vh = *kh + (int64_t)n * Hkv * S * D;
    const bf16 *src = qkv + (int64_t)b0 * S * ldqkv;
    heads_tokens(ctx, (bf16 *)src, ldqkv, *qh, n, S, Hq, D, 0);
    heads_tokens(ctx, (bf16 *)src + (int64_t)Hq * D, ldqkv, *kh, n, S, Hkv, D, 0);
    heads_tokens(ctx, (bf16 *)src + (int64_t)(Hq + Hkv) * D, ldqkv, *vh, n, S, Hkv, D, 0);
}

// scores[bc][Hq][S][S] = scale * Q K^T for a chunk of bc sequences (its head-major q, k).
static void attn_scores(cuda_ctx *ctx, float *Sc, const bf16 *q, const bf16 *k, int bc, int S, int Hq, int Hkv, int D,
                        float scale) {
    int group = Hq / Hkv;
    int64_t SD = (int64_t)S * D, SS = (int64_t)S * S;
    for (int g = 0; g < group; g++)
        gemm_batched_cuda(ctx, 0, 1, S, S, D, scale, q + g * SD, D, group * SD, k, D, SD, 0.0f, Sc + g * SS, S, group * SS,
                          GEMM_F32, bc * Hkv);
}

static void warp_rows_launch_dims(int64_t rows, unsigned *grid, unsigned *block) {
    *block = 256;
    *grid = (unsigned)((rows + 7) / 8);
}

static int g_use_flash = -1;  // -1: from MOSFT_ATTENTION (default on)

extern "C" void attention_use_flash(int on) { g_use_flash = on ? 1 : 0; }

static int use_flash(int D) {
    if (g_use_flash < 0) {
        const char *e = getenv("MOSFT_ATTENTION");
        g_use_flash = !(e && !strcmp(e, "gemm"));
    }
    return g_use_flash && flash_attention_supported(D);
}

extern "C" void attention_forward_cuda(cuda_ctx *ctx, bf16 *out, int64_t ldo, float *lse, const bf16 *qkv,
                                       int64_t ldqkv, const int32_t *mask, int B, int S, int Hq, int Hkv, int D,
                                       void *scratch, int bc, bf16 *o_tmp) {
    MOSFT_ASSERT(Hkv > 0 && Hq % Hkv == 0 && bc >= 1);
    if (use_flash(D)) {
        flash_attention_forward_cuda(ctx, out, ldo, lse, qkv, ldqkv, mask, B, S, Hq, Hkv, D);
        return;
    }
    int group = Hq / Hkv;
    float scale = (float)(1.0 / sqrt((double)D));
    int64_t SD = (int64_t)S * D, SS = (int64_t)S * S;
    float *Sc = (float *)scratch;
    bf16 *P = (bf16 *)((char *)scratch + cuda_align((size_t)bc * Hq * SS * 4));
    for (int b0 = 0; b0 < B; b0 += bc) {
        int n = B - b0 < bc ? B - b0 : bc;
        bf16 *q, *k, *v;
        chunk_heads(ctx, &q, &k, &v, scratch, bc, qkv, ldqkv, b0, n, S, Hq, Hkv, D);
        attn_scores(ctx, Sc, q, k, n, S, Hq, Hkv, D, scale);
        unsigned grid, block;
        warp_rows_launch_dims((int64_t)n * Hq * S, &grid, &block);
        attn_softmax_kernel<<<grid, block, 0, ctx->stream>>>(P, lse, Sc, mask, b0, n, Hq, S);
        CUDA_LAUNCH_CHECK();
        for (int g = 0; g < group; g++)
            gemm_batched_cuda(ctx, 0, 0, S, D, S, 1.0f, P + g * SS, S, group * SS, v, D, SD, 0.0f,
                              o_tmp + ((int64_t)b0 * Hq + g) * SD, D, group * SD, GEMM_BF16, n * Hkv);
    }
    heads_tokens(ctx, out, ldo, o_tmp, B, S, Hq, D, 1);
}

extern "C" int attention_uses_flash(int D) { return use_flash(D); }

extern "C" void attention_backward_cuda(cuda_ctx *ctx, bf16 *gqkv, int64_t ldg, const float *cs, const bf16 *gout,
                                        const bf16 *out, int64_t ldo, const float *lse, const bf16 *qkv, int64_t ldqkv,
                                        const int32_t *mask, int B, int S, int Hq, int Hkv, int D, float *delta,
                                        void *scratch, int bc, bf16 *do_tmp, float *gq, float *gk, float *gv) {
    MOSFT_ASSERT(Hkv > 0 && Hq % Hkv == 0 && bc >= 1);
    if (use_flash(D)) {
        flash_attention_backward_cuda(ctx, gqkv, ldg, delta, gout, (int64_t)Hq * D, out, ldo, lse, qkv, ldqkv, mask, cs, B,
                                      S, Hq, Hkv, D, scratch, bc);
        return;
    }
    int group = Hq / Hkv;
    float scale = (float)(1.0 / sqrt((double)D));
    int64_t SD = (int64_t)S * D, SS = (int64_t)S * S;
    float *Sc = (float *)scratch;
    bf16 *P = (bf16 *)((char *)scratch + cuda_align((size_t)bc * Hq * SS * 4));
    heads_tokens(ctx, (bf16 *)gout, (int64_t)Hq * D, do_tmp, B, S, Hq, D, 0);
    {
        int64_t w = (int64_t)B * S * Hq;
        attn_delta_kernel<<<ceil_div_i(w, 8), 256, 0, ctx->stream>>>(delta, gout, out, ldo, B, S, Hq, D);
        CUDA_LAUNCH_CHECK();
    }
    for (int b0 = 0; b0 < B; b0 += bc) {
        int n = B - b0 < bc ? B - b0 : bc;
        unsigned grid, block;
        warp_rows_launch_dims((int64_t)n * Hq * S, &grid, &block);
        bf16 *q, *k, *v;
        chunk_heads(ctx, &q, &k, &v, scratch, bc, qkv, ldqkv, b0, n, S, Hq, Hkv, D);
        attn_scores(ctx, Sc, q, k, n, S, Hq, Hkv, D, scale);
        attn_probs_kernel<<<grid, block, 0, ctx->stream>>>(P, Sc, lse, mask, b0, n, Hq, S);
        CUDA_LAUNCH_CHECK();
        const bf16 *dO = do_tmp + (int64_t)b0 * Hq * SD;
        // dP = dO V^T (into the scores buffer)
        for (int g = 0; g < group; g++)
            gemm_batched_cuda(ctx, 0, 1, S, S, D, 1.0f, dO + g * SD, D, group * SD, v, D, SD, 0.0f, Sc + g * SS, S,
                              group * SS, GEMM_F32, n * Hkv);
        // dV = sum over the group of P^T dO
        for (int g = 0; g < group; g++)
            gemm_batched_cuda(ctx, 1, 0, S, D, S, 1.0f, P + g * SS, S, group * SS, dO + g * SD, D, group * SD,
                              g ? 1.0f : 0.0f, gv + (int64_t)b0 * Hkv * SD, D, SD, GEMM_F32, n * Hkv);
        attn_dscores_kernel<<<grid, block, 0, ctx->stream>>>(P, Sc, delta, b0, n, Hq, S);
        CUDA_LAUNCH_CHECK();
        // dQ = scale dS K;  dK = scale sum over the group of dS^T Q
        for (int g = 0; g < group; g++)
            gemm_batched_cuda(ctx, 0, 0, S, D, S, scale, P + g * SS, S, group * SS, k, D, SD, 0.0f,
                              gq + ((int64_t)b0 * Hq + g) * SD, D, group * SD, GEMM_F32, n * Hkv);
        for (int g = 0; g < group; g++)
            gemm_batched_cuda(ctx, 1, 0, S, D, S, scale, P + g * SS, S, group * SS, q + g * SD, D, group * SD,
                              g ? 1.0f : 0.0f, gk + (int64_t)b0 * Hkv * SD, D, SD, GEMM_F32, n * Hkv);
    }
    rope_merge_backward_cuda(ctx, gqkv, ldg, gq, gk, gv, cs, B, S, Hq, Hkv, D);
}
