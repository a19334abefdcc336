// dtype.h: element types of tensors on disk and in memory, and exact conversions between them.
// bf16 and fp16 are stored as uint16_t bit patterns on the host.
#ifndef MOSFT_DTYPE_H
#define MOSFT_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    MOSFT_F32 = 0,
    MOSFT_F16,
    MOSFT_BF16,
    MOSFT_F64,
    MOSFT_I64,
    MOSFT_I32,
    MOSFT_I16,
    MOSFT_I8,
    MOSFT_U8,
    MOSFT_BOOL,
    MOSFT_DTYPE_COUNT
} mosft_dtype;

// safetensors spelling ("F32", "BF16", ...) and element size in bytes.
const char *dtype_name(mosft_dtype t);
size_t dtype_size(mosft_dtype t);
// Parse a safetensors dtype string; returns -1 if unknown.
int dtype_parse(const char *s);

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, as torch's .to(torch.bfloat16); NaN stays NaN.
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// Round a float to the nearest bf16 value and back.
static inline float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Convert n elements of type `t` at `src` to fp32. Only float types are allowed (F32, F16, BF16, F64).
void dtype_to_f32(mosft_dtype t, const void *src, float *dst, size_t n);

#ifdef __cplusplus
}
#endif
#endif
