// peer_cuda.cu: the low-rank methods other than MoS and LoRA (PRoLoRA, VeRA, Tied-LoRA, ShareLoRA) on the
// GPU through their own host code. Each defines its effective factors with adapter_ops.build and maps
// their gradients back with adapter_ops.scatter (core/adapter.h); rather than a device twin of every
// method, the CUDA backend runs exactly that code on the host at the two points where it is needed:
//
//   once per optimizer step (cuda_peer_build): the params come down, build() makes every (layer,
//     module)'s A [r][d_in] and B [d_out][r] in fp32, and they go up as bf16 (s * B for B, as the
//     gather kernels make them for MoS and LoRA) into the fused groups' factor buffers; from there the
//     step is the one MoS and LoRA take (K-augmented GEMMs, split-K factor gradients, dropout);
//   after each micro-batch's backward (cuda_peer_scatter): the dense dL/dA, dL/dB of every (layer,
//     module), copied to host memory in stream order as backward produced them (step_cuda.cu), go
//     through scatter() into the host gradient h_grad, as the CPU backend scatters each micro-batch.
//
// The fp32 params and the AdamW moments stay on the device (adamw_cuda, the norm): cuda_peer_flush
// uploads h_grad into the gradient buffer before anything reads it. The host work is proportional to
// the factors' size (r (d_in + d_out) per module), small beside a step's GEMMs for the usual ranks.
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "cuda/backend_cuda.cuh"

// The adapter as the host code must see it: the same layout and frozen buffers, params = the host copy.
static adapter peer_view(const backend *be) {
    const cuda_impl *c = (const cuda_impl *)be->impl;
    adapter v = *be->ad;
    v.params = c->h_params;
    return v;
}

void cuda_peer_build(backend *be) {
    cuda_impl *c = (cuda_impl *)be->impl;
    cudaStream_t st = c->ctx->stream;
    size_t np = be->ad->n_params;
    // the params of this step (the stream drains: earlier kernels may still read the old factors)
    CUDA_CHECK(cudaMemcpyAsync(c->h_params, c->params, sizeof(float) * np, cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    adapter v = peer_view(be);
    int r = c->rank;
    size_t amax = 0, bmax = 0, fmax = 0;
    for (int g = 0; g < GRP_COUNT; g++) {
        const cuda_adapter_group *ag = &c->grp[g];
        if (!ag->n) continue;
        size_t a = (size_t)ag->R * ag->d_in, b = (size_t)ag->d_out * ag->R;
        amax = a > amax ? a : amax;
        bmax = b > bmax ? b : bmax;
        for (int i = 0; i < ag->n; i++) {
            size_t f = (size_t)r * (size_t)(ag->d_in > ag->d_out_m[i] ? ag->d_in : ag->d_out_m[i]);
            fmax = f > fmax ? f : fmax;
        }
    }
    float *Af = (float *)xmalloc(sizeof(float) * (fmax ? fmax : 1)), *Bf = (float *)xmalloc(sizeof(float) * (fmax ? fmax : 1));
    uint16_t *Ah = (uint16_t *)xmalloc(2 * (amax ? amax : 1)), *Bh = (uint16_t *)xmalloc(2 * (bmax ? bmax : 1));
    for (int g = 0; g < GRP_COUNT; g++) {
        cuda_adapter_group *ag = &c->grp[g];
        if (!ag->n) continue;
        int di = ag->d_in, R = ag->R;
        for (int l = 0; l < be->cfg.n_layers; l++) {
            memset(Bh, 0, 2 * (size_t)ag->d_out * R);  // block-diagonal: other modules' blocks are 0
            for (int i = 0; i < ag->n; i++) {
                int mo = ag->d_out_m[i];
                be->ad->ops->build(&v, l, ag->mod[i], Af, Bf);
                for (size_t e = 0; e < (size_t)r * di; e++) Ah[(size_t)i * r * di + e] = f32_to_bf16(Af[e]);
                for (int o = 0; o < mo; o++)
                    for (int k = 0; k < r; k++)
                        Bh[(size_t)(ag->row_off[i] + o) * R + i * r + k] = f32_to_bf16(c->scaling * Bf[(size_t)o * r + k]);
            }
            // pageable sources: each call returns once its bytes are staged, so the buffers can be reused
            CUDA_CHECK(cudaMemcpyAsync(ag->A[l], Ah, 2 * (size_t)R * di, cudaMemcpyHostToDevice, st));
            CUDA_CHECK(cudaMemcpyAsync(ag->B[l], Bh, 2 * (size_t)ag->d_out * R, cudaMemcpyHostToDevice, st));
        }
    }
    CUDA_CHECK(cudaStreamSynchronize(st));
    free(Af);
    free(Bf);
    free(Ah);
    free(Bh);
}

void cuda_peer_scatter(backend *be) {
    cuda_impl *c = (cuda_impl *)be->impl;
    CUDA_CHECK(cudaStreamSynchronize(c->ctx->stream));  // the copies into h_dfac are done
    adapter v = peer_view(be);
    int r = c->rank;
    // backward's order on the CPU: last layer first, modules from down_proj back to q_proj
    for (int l = be->cfg.n_layers - 1; l >= 0; l--)
        for (int m = MOD_COUNT - 1; m >= 0; m--) {
            if (!adapter_targets(be->ad, m)) continue;
            int di, dout;
            llama_module_dims(&be->cfg, m, &di, &dout);
            const float *gA = c->h_dfac + c->dense_off[l * MOD_COUNT + m];
            be->ad->ops->scatter(&v, l, m, gA, gA + (size_t)r * di, c->h_grad);
        }
    c->grad_dirty = 1;
}

void cuda_peer_flush(backend *be) {
    cuda_impl *c = (cuda_impl *)be->impl;
    if (!c->peer || !c->grad_dirty) return;
    CUDA_CHECK(cudaMemcpyAsync(c->grad, c->h_grad, sizeof(float) * be->ad->n_params, cudaMemcpyHostToDevice,
                               c->ctx->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->ctx->stream));
    c->grad_dirty = 0;
}
