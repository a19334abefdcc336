// adapter_init.h: the seeded initializers the peer adapters share (static inline, header only).
//
// Every value is element `first + e` of a Philox stream (core/rng.h), so a tensor's values depend
// only on (key, position), never on what else was drawn before: one seed gives the same adapter on
// every machine, and two methods that draw "the same" tensor from the same stream agree bit for bit
// (PRoLoRA with m = n = 1, ShareLoRA's per-layer A and SiRA with one expert reproduce LoRA's A).
#ifndef MOSFT_ADAPTER_INIT_H
#define MOSFT_ADAPTER_INIT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "core/rng.h"

// LoRA's A init, as adapter_lora.c draws it: U(-bound, +bound), each value rounded to the nearest
// bf16 (the references hold their adapters in bf16 at init). bound = 1/sqrt(fan_in) is torch's
// kaiming_uniform_(a = sqrt(5)).
static inline void adapter_init_lora_uniform(float *out, size_t n, uint64_t key, uint64_t first, double bound) {
    for (size_t e = 0; e < n; e++)
        out[e] = bf16_round((float)((2.0 * rng_uniform(key, first + e) - 1.0) * bound));
}

// U(-bound, +bound) in fp32 (VeRA's frozen projections: PEFT keeps them fp32).
static inline void adapter_init_uniform(float *out, size_t n, uint64_t key, uint64_t first, double bound) {
    for (size_t e = 0; e < n; e++) out[e] = (float)((2.0 * rng_uniform(key, first + e) - 1.0) * bound);
}

// N(0, std^2) in fp32 (ShareLoRA's shared A).
static inline void adapter_init_normal(float *out, size_t n, uint64_t key, uint64_t first, double std) {
    for (size_t e = 0; e < n; e++) out[e] = (float)(std * rng_normal(key, first + e));
}

static inline void adapter_init_fill(float *out, size_t n, float v) {
    for (size_t e = 0; e < n; e++) out[e] = v;
}

#endif
