// dtype.c: see dtype.h.
#include "core/dtype.h"

#include <math.h>

#include "core/common.h"

static const char *k_names[MOSFT_DTYPE_COUNT] = {"F32", "F16", "BF16", "F64", "I64",
                                                 "I32", "I16", "I8",   "U8",  "BOOL"};
static const size_t k_sizes[MOSFT_DTYPE_COUNT] = {4, 2, 2, 8, 8, 4, 2, 1, 1, 1};

const char *dtype_name(mosft_dtype t) { return (unsigned)t < MOSFT_DTYPE_COUNT ? k_names[t] : "?"; }
size_t dtype_size(mosft_dtype t) { return (unsigned)t < MOSFT_DTYPE_COUNT ? k_sizes[t] : 0; }

int dtype_parse(const char *s) {
    for (int i = 0; i < MOSFT_DTYPE_COUNT; i++)
        if (!strcmp(s, k_names[i])) return i;
    return -1;
}

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else {  // subnormal: value = mant * 2^-24
            float f = ldexpf((float)mant, -24);
            return sign ? -f : f;
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    float a = fabsf(f);
    if (isnan(f)) return sign | 0x7e00;
    if (a >= 65520.0f) return sign | 0x7c00;
    if (a < 6.103515625e-05f) {  // subnormal half: round(a / 2^-24) to nearest even
        float q = a * 16777216.0f;
        return sign | (uint16_t)lrintf(q);
    }
    uint32_t au;
    memcpy(&au, &a, 4);
    uint32_t exp = (au >> 23) - 112, mant = au & 0x7fffff;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return sign | (uint16_t)h;
}

// `src` may be unaligned (a tensor after an odd-sized U8 tensor in a safetensors file): elements are
// read with memcpy, which compiles to plain loads.
void dtype_to_f32(mosft_dtype t, const void *src, float *dst, size_t n) {
    const unsigned char *s = src;
    switch (t) {
    case MOSFT_F32: memcpy(dst, src, n * 4); break;
    case MOSFT_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = bf16_to_f32(h);
        }
        break;
    case MOSFT_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = f16_to_f32(h);
        }
        break;
    case MOSFT_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, s + 8 * i, 8);
            dst[i] = (float)d;
        }
        break;
    default: MOSFT_ASSERT(!"dtype_to_f32: not a float type");
    }
}
