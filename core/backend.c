// backend.c: backend selection defaults for a CPU-only build. A CUDA build (MOSFT_WITH_CUDA) gets these
// functions from cuda/backend_cuda.cu instead: a weak definition here would not do, because the linker
// takes the first archive member that defines a symbol (weak or not) and never pulls another one to
// replace it, so the stub would shadow the real backend in programs that reach it only through
// libmosft.a.
#include "core/backend.h"

#include <stdio.h>

#include "core/common.h"

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
