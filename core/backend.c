// backend.c: backend selection defaults. The CUDA backend (cuda/backend_cuda.cu) overrides these weak
// definitions when it is linked in; a CPU-only build keeps them.
#include "core/backend.h"

#include <stdio.h>

#include "core/common.h"

__attribute__((weak)) int backend_cuda_available(char *name, size_t n) {
    if (name && n) snprintf(name, n, "none");
    return 0;
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
#ifdef MOSFT_WITH_CUDA
    return mosft_fail_hint(MOSFT_ERR_INPUT, "use device \"cpu\" (--set device=cpu)",
                           "device: \"cuda\" is not available in this build yet");
#else
    return mosft_fail_hint(MOSFT_ERR_INPUT, "rebuild with the CUDA toolkit (nvcc on PATH), or --set device=cpu",
                           "device: \"cuda\" requested, but this mosft was built without CUDA");
#endif
}
