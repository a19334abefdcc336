// export.h: writing an adapter as a Hugging Face PEFT LoRA folder (`mosft export`).
//
// DIR/adapter_config.json     peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules,
//                             base_model_name_or_path and PEFT's other LoraConfig keys
// DIR/adapter_model.safetensors
//   base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight  [r][d_in]
//   base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_B.weight  [d_out][r]
// with lora_A = A^i (frozen per-rank scales folded in) and lora_B = B^i as the adapter builds them
// for training, and lora_alpha / r = the adapter's scaling, so that PEFT's
// Delta W = (lora_alpha / r) B A is the trained Delta W exactly (F32; BF16 rounds A and B).
#ifndef MOSFT_EXPORT_H
#define MOSFT_EXPORT_H

#include "core/adapter.h"
#include "core/dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    mosft_dtype dtype;        // MOSFT_F32 (default) or MOSFT_BF16
    int force;                // write into a non-empty folder (replacing the two files)
    const char *base_model;   // base_model_name_or_path override (NULL: the adapter's)
} export_options;

// Write the PEFT folder. A folder that exists and holds anything is refused unless opts->force; each
// file is written atomically (temporary file, fsync, rename). MOSFT_ERR_INPUT for token-routed
// methods (no plain LoRA form) and bad options.
int export_peft(const adapter *a, const char *dir, const export_options *opts);

// The lora_alpha export writes: PEFT's lora_alpha / r is then the adapter's own scaling (alpha for the
// methods that scale by alpha / r, r for VeRA's 1).
double export_peft_lora_alpha(const adapter *a);

// PEFT's tensor name of a linear's factor: which = 'A' or 'B'.
void export_peft_tensor_name(char *out, size_t n, int layer, int module, char which);

#ifdef __cplusplus
}
#endif
#endif
