// backend.c: what both backends share (the micro-batch check), and the backend selection defaults for a
// CPU-only build. A CUDA build (MOSFT_WITH_CUDA) gets those from cuda/backend_cuda.cu instead: a weak
// definition here would not do, because the linker takes the first archive member that defines a symbol
// (weak or not) and never pulls another one to replace it, so the stub would shadow the real backend in
// programs that reach it only through libmosft.a.
#include "core/backend.h"

#include <stdio.h>

#include "core/common.h"
#include "core/ops_cpu.h"

int backend_check_batch(const backend *be, const micro_batch *mb) {
    int64_t T = (int64_t)mb->B * mb->S;
    int V = be->cfg.vocab;
    for (int64_t i = 0; i < T; i++) {
        if (mb->input_ids[i] < 0 || mb->input_ids[i] >= V)
            return mosft_fail(MOSFT_ERR_INPUT, "batch: token id %d at row %lld is outside the vocabulary (%d)",
                              mb->input_ids[i], (long long)i, V);
        if (mb->labels[i] != OPS_IGNORE_INDEX && (mb->labels[i] < 0 || mb->labels[i] >= V))
            return mosft_fail(MOSFT_ERR_INPUT, "batch: label %d at row %lld is outside the vocabulary (%d)", mb->labels[i],
                              (long long)i, V);
    }
    return MOSFT_OK;
}

#ifndef MOSFT_WITH_CUDA

__attribute__((weak)) int backend_cuda_available(char *name, size_t n) {
    if (name && n) snprintf(name, n, "none");
    return 0;
}

__attribute__((weak)) int backend_cuda_supports(const adapter *ad, const llama_config *cfg) {
    (void)ad;
    (void)cfg;
    return mosft_fail(MOSFT_ERR_INPUT, "this mosft was built without CUDA");
}

__attribute__((weak)) int backend_cuda_create_random(backend **out, const llama_config *cfg, const char *quantization,
                                                     int double_quant, uint64_t seed, adapter *ad,
                                                     const backend_opts *opt) {
    (void)cfg;
    (void)seed;
    return backend_cuda_create(out, "", quantization, double_quant, ad, opt);
}

__attribute__((weak)) int backend_cuda_create(backend **out, const char *model_dir, const char *quantization,
                                              int double_quant, adapter *ad, const backend_opts *opt) {
    (void)model_dir;
    (void)quantization;
    (void)double_quant;
    (void)ad;
    (void)opt;
    *out = NULL;
    return mosft_fail_hint(MOSFT_ERR_INPUT, "rebuild with the CUDA toolkit (nvcc on PATH), or --set device=cpu",
                           "device: \"cuda\" requested, but this mosft was built without CUDA");
}
#endif
