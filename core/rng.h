// rng.h: the random numbers of mosft, identical on CPU and GPU.
//
// Counter-based (Philox4x32-10, Salmon et al. 2011): a value is a pure function of (key, counter),
// so a dropout mask can be regenerated during recomputation or by the GPU kernel and be bit-identical
// to the CPU's. Keys are derived from (seed, purpose, ...) with splitmix64.
//
// Sequential generator for the host (data shuffling, template draws): splitmix64-seeded xoshiro256**,
// whose 4-word state serializes into checkpoints.
#ifndef MOSFT_RNG_H
#define MOSFT_RNG_H

#include <stdint.h>

#if defined(__CUDACC__)
#define MOSFT_HD __host__ __device__ __forceinline__
#else
#define MOSFT_HD static inline
#endif

// Purposes, so that streams for different uses never collide.
enum {
    RNG_DROPOUT = 1,      // adapter dropout: key(seed, step, micro, layer*8+module)
    RNG_INDEX = 2,        // MoS index tables: key(seed, module, layer, A|B)
    RNG_INIT = 3,         // adapter initialization: key(seed, tensor id, ...)
    RNG_SCALE = 4,        // random scaling ablation
    RNG_GATE_DROPOUT = 5  // SiRA expert dropout
};

MOSFT_HD uint64_t rng_splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// A 64-bit key from a purpose and up to four 64-bit fields.
MOSFT_HD uint64_t rng_key(uint64_t purpose, uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
    uint64_t k = rng_splitmix64(purpose * 0x632be59bd9b4e019ull);
    k = rng_splitmix64(k ^ a);
    k = rng_splitmix64(k ^ b);
    k = rng_splitmix64(k ^ c);
    k = rng_splitmix64(k ^ d);
    return k;
}

// Philox4x32-10: 4 outputs for a 128-bit counter (here the 64-bit `ctr` and 0) and a 64-bit key.
// On the device the products are 32-bit halves (__umulhi and a plain multiply): written as 64-bit
// products, nvcc kept the whole state in 64-bit registers (64-bit multiplies, xors and masks in the PTX
// of the dropout kernels, whose masks are mostly Philox). Same values either way.
MOSFT_HD void rng_philox4(uint64_t key, uint64_t ctr, uint32_t out[4]) {
    uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int r = 0; r < 10; r++) {
#if defined(__CUDA_ARCH__)
        uint32_t h0 = __umulhi(0xD2511F53u, c0), l0 = 0xD2511F53u * c0;
        uint32_t h1 = __umulhi(0xCD9E8D57u, c2), l1 = 0xCD9E8D57u * c2;
#else
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t h0 = (uint32_t)(p0 >> 32), l0 = (uint32_t)p0, h1 = (uint32_t)(p1 >> 32), l1 = (uint32_t)p1;
#endif
        uint32_t n0 = h1 ^ c1 ^ k0, n1 = l1, n2 = h0 ^ c3 ^ k1, n3 = l0;
        c0 = n0;
        c1 = n1;
        c2 = n2;
        c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

// One 32-bit value for element `i` of a stream: block i/4, lane i%4.
MOSFT_HD uint32_t rng_u32(uint64_t key, uint64_t i) {
    uint32_t o[4];
    rng_philox4(key, i >> 2, o);
    return o[i & 3];
}

// Uniform in [0, 1) with 24 bits.
MOSFT_HD float rng_uniform(uint64_t key, uint64_t i) { return (float)(rng_u32(key, i) >> 8) * (1.0f / 16777216.0f); }

// Dropout keep decision for element i: kept with probability 1 - p. The threshold is an integer so
// CPU and GPU agree exactly.
MOSFT_HD uint32_t rng_dropout_threshold(float p) {
    double t = (double)p * 4294967296.0;
    return t >= 4294967295.0 ? 0xffffffffu : (uint32_t)t;
}
MOSFT_HD int rng_keep(uint64_t key, uint64_t i, uint32_t threshold) { return rng_u32(key, i) >= threshold; }

// The adapter's dropout draws 16 bits a decision, so one Philox block serves eight elements: element i
// of a mask stream is half i % 2 (low half first) of word (i % 8) / 2 of block i / 8, kept when that
// half is >= rng_dropout_threshold16(p) (dropped with probability floor(p 65536) / 65536).
MOSFT_HD uint32_t rng_dropout_threshold16(float p) {
    double t = (double)p * 65536.0;
    return t >= 65535.0 ? 65535u : (uint32_t)t;
}
MOSFT_HD uint32_t rng_half16(const uint32_t o[4], int k) { return (o[k >> 1] >> (16 * (k & 1))) & 0xffffu; }
MOSFT_HD int rng_keep16(uint64_t key, uint64_t i, uint32_t threshold16) {
    uint32_t o[4];
    rng_philox4(key, i >> 3, o);
    return rng_half16(o, (int)(i & 7)) >= threshold16;
}

// Standard normal from two uniforms (Box-Muller); element i uses u32 lanes 2i, 2i+1 of the stream.
#if !defined(__CUDACC__)
#include <math.h>
static inline float rng_normal(uint64_t key, uint64_t i) {
    double u1 = ((double)rng_u32(key, 2 * i) + 1.0) / 4294967297.0;  // (0, 1)
    double u2 = (double)rng_u32(key, 2 * i + 1) / 4294967296.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// Unbiased integer in [0, n) from a counter stream (Lemire's multiply-and-reject); advances *ctr.
static inline uint32_t rng_below(uint64_t key, uint64_t *ctr, uint32_t n) {
    for (;;) {
        uint64_t m = (uint64_t)rng_u32(key, (*ctr)++) * n;
        uint32_t lo = (uint32_t)m;
        if (lo >= n || lo >= (uint32_t)(-n) % n) return (uint32_t)(m >> 32);
    }
}

// Sequential host generator (xoshiro256**), serializable as 4 words.
typedef struct {
    uint64_t s[4];
} rng_state;

static inline void rng_seed(rng_state *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) {
        x += 0x9e3779b97f4a7c15ull;
        uint64_t z = x;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        r->s[i] = z ^ (z >> 31);
    }
}
static inline uint64_t rng_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
static inline uint64_t rng_next(rng_state *r) {
    uint64_t *s = r->s, res = rng_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rng_rotl(s[3], 45);
    return res;
}
// Uniform double in [0, 1) with 53 bits.
static inline double rng_next_double(rng_state *r) { return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }
// Unbiased integer in [0, n).
static inline uint64_t rng_next_below(rng_state *r, uint64_t n) {
    if (n <= 1) return 0;
    uint64_t lim = UINT64_MAX - UINT64_MAX % n;
    for (;;) {
        uint64_t x = rng_next(r);
        if (x < lim) return x % n;
    }
}
#endif

#endif
