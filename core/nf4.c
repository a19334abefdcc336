// nf4.c: NF4 quantization, CPU reference (see nf4.h and shared/docs/NF4.md).
//
// Bit-identity with bitsandbytes (checked against the oracle files of bitsandbytes 0.50 in
// tests/test_nf4.c) rests on doing the same fp32 operations in the same order:
//   - a block's scale is applied as x * (1/absmax), not x / absmax (bnb multiplies by the reciprocal);
//   - the 4-bit code is chosen by comparing with the fp32 midpoints of neighbouring code values,
//     strictly: a value exactly on a midpoint gets the LOWER code;
//   - the 8-bit code of (absmax - offset) follows bnb's binary search over the sorted 256-value map,
//     whose tie rule depends on where the search ends (see nf4_dynamic_code);
//   - offset = fp32(sum of absmax) * fp32(1/n), as torch's CUDA mean (sum here in double: identical
//     on every oracle; torch's own fp32 tree sum can differ in the last bit on very long vectors);
//   - dequantization is code * absmax in fp32, and absmax = map[q] * nested_absmax + offset as two
//     separately rounded operations (no fused multiply-add: -std=c11 implies -ffp-contract=off).
#include "core/nf4.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"

const float k_nf4_code[16] = {-1.0f,
                              -0.6961928009986877f,
                              -0.5250730514526367f,
                              -0.39491748809814453f,
                              -0.28444138169288635f,
                              -0.18477343022823334f,
                              -0.09105003625154495f,
                              0.0f,
                              0.07958029955625534f,
                              0.16093020141124725f,
                              0.24611230194568634f,
                              0.33791524171829224f,
                              0.44070982933044434f,
                              0.5626170039176941f,
                              0.7229568362236023f,
                              1.0f};

double nf4_storage_bytes(int64_t numel, int double_quant) {
    int64_t blocks = (numel + NF4_BLOCK - 1) / NF4_BLOCK;
    double bytes = (double)((numel + 1) / 2);
    if (double_quant)
        bytes += (double)blocks + 4.0 * (double)((blocks + NF4_NESTED_BLOCK - 1) / NF4_NESTED_BLOCK) + 4.0 + 1024.0;
    else
        bytes += 4.0 * (double)blocks;
    return bytes;
}

// ---- the signed dynamic 8-bit map ----------------------------------------------------------------

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

// bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for each decade
// e = 1e-6 .. 1 (i = 0..6), the midpoints of torch.linspace(0.1, 1, 2^i + 1) scaled by e, with both
// signs; then 0 and 1; sorted. 127 + 127 + 2 = 256 values. Every step is the fp32 arithmetic torch
// does: linspace's step is (end - start) / (n - 1) and its elements are fused multiply-adds (torch's
// CPU kernel is compiled with contraction), start + step*k for the first half and end - step*(n-1-k)
// for the second; the decade is a double rounded to fp32 before multiplying.
void nf4_dynamic_map(float map[256]) {
    static const double decade[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
    int n = 0;
    for (int i = 0; i < 7; i++) {
        int items = (1 << i) + 1;
        const float start = 0.1f, end = 1.0f;
        float step = (end - start) / (float)(items - 1);
        float bound[65];  // [items]
        for (int k = 0; k < items; k++)
            bound[k] = k < items / 2 ? fmaf(step, (float)k, start) : fmaf(-step, (float)(items - 1 - k), end);
        float scale = (float)decade[i];
        for (int k = 0; k + 1 < items; k++) {
            float mean = (bound[k] + bound[k + 1]) / 2.0f;
            map[n++] = scale * mean;
            map[n++] = -(scale * mean);
        }
    }
    map[n++] = 0.0f;
    map[n++] = 1.0f;
    MOSFT_ASSERT(n == 256);
    qsort(map, 256, sizeof(float), cmp_float);
}

// ---- code selection ----------------------------------------------------------------------------

// The 15 decision thresholds: fp32 midpoints of neighbouring NF4 code values. They equal the
// constants of bitsandbytes' dQuantizeNF4 tree bit for bit.
static float nf4_threshold(int i) { return (k_nf4_code[i] + k_nf4_code[i + 1]) * 0.5f; }

// Index of the NF4 code for a normalized value: how many thresholds x is strictly above. The same
// answer as bnb's tree for every input, NaN included (every comparison false -> code 0).
static inline uint8_t quantize_nf4(float x, const float thr[15]) {
    int q = 0;
    for (int i = 0; i < 15; i++) q += x > thr[i];
    return (uint8_t)q;
}

// 8-bit code of x in the sorted 256-value `map`: bitsandbytes' dQuantize (non-stochastic). A binary
// search with steps 64, 32, ..., 1 from index 127 ends on a pivot p in [0, 254]; then x goes to p or
// to its neighbour on x's side, whichever midpoint test wins. A value exactly on the midpoint stays on
// p, so ties go up or down depending on where the search ended (always an even index); NaN descends
// to index 0.
uint8_t nf4_dynamic_code(const float map[256], float x) {
    int pivot = 127, lo = 0, hi = 255;
    for (int step = 64; step > 0; step >>= 1) {
        if (x > map[pivot]) {
            lo = pivot;
            pivot += step;
        } else {
            hi = pivot;
            pivot -= step;
        }
    }
    float val = map[pivot];
    if (x > val) {
        float mid = (map[hi] + val) * 0.5f;
        return (uint8_t)(x > mid ? hi : pivot);
    }
    float mid = (map[lo] + val) * 0.5f;
    return (uint8_t)(x < mid ? lo : pivot);
}

// ---- quantization --------------------------------------------------------------------------------

typedef struct {
    const float *w;  // [numel]
    int64_t numel;
    uint8_t *packed;
    float *absmax;
    int64_t b0, b1;  // block range
} quant_job;

// Blocks [b0, b1): absmax, then codes of x * (1/absmax), two per byte, even element in the high nibble.
// A partial last block is padded with zeros, as bnb's kernel loads it (their code fills an odd last
// byte's low nibble).
static void *quant_blocks(void *arg) {
    quant_job *j = arg;
    float thr[15];
    for (int i = 0; i < 15; i++) thr[i] = nf4_threshold(i);
    for (int64_t b = j->b0; b < j->b1; b++) {
        int64_t i0 = b * NF4_BLOCK;
        int n = (int)(j->numel - i0 < NF4_BLOCK ? j->numel - i0 : NF4_BLOCK);
        const float *x = j->w + i0;
        float amax = -3.402823466e38f;
        for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
        j->absmax[b] = amax;
        float inv = 1.0f / amax;  // all-zero block: inf, 0 * inf = NaN -> code 0, as in bnb
        uint8_t *out = j->packed + i0 / 2;
        int nbytes = (n + 1) / 2;
        for (int k = 0; k < nbytes; k++) {
            float a = x[2 * k], c = 2 * k + 1 < n ? x[2 * k + 1] : 0.0f;
            out[k] = (uint8_t)(quantize_nf4(a * inv, thr) << 4 | quantize_nf4(c * inv, thr));
        }
    }
    return NULL;
}

// Quantization is independent per block, so threads split the blocks; the bytes do not depend on the
// number of threads.
static void quant_all(const float *w, int64_t numel, int64_t n_blocks, uint8_t *packed, float *absmax) {
    int nt = mosft_num_threads();
    if (nt > 16) nt = 16;
    if (numel < (1 << 20)) nt = 1;
    quant_job jobs[16];
    pthread_t th[16];
    int started[16] = {0};
    int64_t per = (n_blocks + nt - 1) / nt;
    for (int t = 0; t < nt; t++) {
        int64_t b0 = t * per, b1 = b0 + per < n_blocks ? b0 + per : n_blocks;
        jobs[t] = (quant_job){w, numel, packed, absmax, b0 < n_blocks ? b0 : n_blocks, b1};
        if (t > 0) started[t] = pthread_create(&th[t], NULL, quant_blocks, &jobs[t]) == 0;
        if (t > 0 && !started[t]) quant_blocks(&jobs[t]);  // no thread: do it here
    }
    quant_blocks(&jobs[0]);
    for (int t = 1; t < nt; t++)
        if (started[t]) pthread_join(th[t], NULL);
}

// Double quantization of the block scales (bnb quantize_4bit with compress_statistics=True):
// offset = mean(absmax); (absmax - offset) blockwise-quantized (256) with the dynamic map.
static void quant_nested(nf4_tensor *t, const float *absmax) {
    int64_t nb = t->n_blocks, nn = (nb + NF4_NESTED_BLOCK - 1) / NF4_NESTED_BLOCK;
    nf4_dynamic_map(t->nested_code);
    double sum = 0;
    for (int64_t b = 0; b < nb; b++) sum += absmax[b];
    t->offset = (float)sum * (1.0f / (float)nb);
    t->absmax_q = xmalloc((size_t)nb);
    t->nested_absmax = xmalloc(sizeof(float) * (size_t)nn);
    for (int64_t j = 0; j < nn; j++) {
        int64_t b0 = j * NF4_NESTED_BLOCK, b1 = b0 + NF4_NESTED_BLOCK < nb ? b0 + NF4_NESTED_BLOCK : nb;
        float amax = -3.402823466e38f;
        for (int64_t b = b0; b < b1; b++) amax = fmaxf(amax, fabsf(absmax[b] - t->offset));
        t->nested_absmax[j] = amax;
        float inv = 1.0f / amax;  // one block only: 0 -> NaN -> code 0, dequantizing to the offset
        for (int64_t b = b0; b < b1; b++) t->absmax_q[b] = nf4_dynamic_code(t->nested_code, (absmax[b] - t->offset) * inv);
    }
}

void nf4_quantize(const float *w, int64_t rows, int64_t cols, int double_quant, nf4_tensor *out) {
    MOSFT_ASSERT(rows > 0 && cols > 0);
    memset(out, 0, sizeof *out);
    out->rows = rows;
    out->cols = cols;
    out->numel = rows * cols;
    out->n_blocks = (out->numel + NF4_BLOCK - 1) / NF4_BLOCK;
    out->double_quant = double_quant != 0;
    out->packed = xmalloc((size_t)((out->numel + 1) / 2));
    float *absmax = xmalloc(sizeof(float) * (size_t)out->n_blocks);
    quant_all(w, out->numel, out->n_blocks, out->packed, absmax);
    if (out->double_quant) {
        quant_nested(out, absmax);
        free(absmax);
    } else {
        out->absmax = absmax;
    }
}

// The fp32 scale of block b: bnb's dequantize_blockwise (map[q] * nested_absmax) then "+= offset".
static inline float block_scale(const nf4_tensor *t, int64_t b) {
    if (!t->double_quant) return t->absmax[b];
    float scaled = t->nested_code[t->absmax_q[b]] * t->nested_absmax[b / NF4_NESTED_BLOCK];
    return scaled + t->offset;
}

void nf4_block_absmax(const nf4_tensor *t, float *absmax) {
    for (int64_t b = 0; b < t->n_blocks; b++) absmax[b] = block_scale(t, b);
}

// Elements [i0, i1) into out[0 .. i1-i0); absmax of the blocks covering them.
static void dequant_range(const nf4_tensor *t, int64_t i0, int64_t i1, float *out) {
    int64_t b = -1;
    float scale = 0;
    for (int64_t i = i0; i < i1; i++) {
        if (i / NF4_BLOCK != b) {
            b = i / NF4_BLOCK;
            scale = block_scale(t, b);
        }
        uint8_t byte = t->packed[i >> 1];
        uint8_t q = (i & 1) ? (byte & 0x0f) : (byte >> 4);
        out[i - i0] = k_nf4_code[q] * scale;
    }
}

void nf4_dequantize(const nf4_tensor *t, float *out) { dequant_range(t, 0, t->numel, out); }

void nf4_dequantize_rows(const nf4_tensor *t, int64_t row0, int64_t nrows, float *out) {
    MOSFT_ASSERT(row0 >= 0 && nrows >= 0 && row0 + nrows <= t->rows);
    dequant_range(t, row0 * t->cols, (row0 + nrows) * t->cols, out);
}

void nf4_free(nf4_tensor *t) {
    if (!t) return;
    free(t->packed);
    free(t->absmax);
    free(t->absmax_q);
    free(t->nested_absmax);
    memset(t, 0, sizeof *t);
}

size_t nf4_bytes(const nf4_tensor *t) {
    size_t n = (size_t)((t->numel + 1) / 2);
    if (t->double_quant)
        n += (size_t)t->n_blocks + sizeof(float) * (size_t)((t->n_blocks + NF4_NESTED_BLOCK - 1) / NF4_NESTED_BLOCK) +
             sizeof(float) + sizeof t->nested_code;
    else
        n += sizeof(float) * (size_t)t->n_blocks;
    return n;
}
