// nf4.h: 4-bit NormalFloat quantization with double quantization, bit-identical to bitsandbytes
// (shared/docs/NF4.md). CPU reference; the CUDA kernels (cuda/nf4.cu) must give the same bytes.
//
// Layout (bitsandbytes): the weight [out][in] is flattened row-major into blocks of 64 elements.
//   absmax[b] = max |x| of block b; code = nearest NF4 value of x / absmax[b] (bnb's threshold tree);
//   two codes per byte, the even element in the HIGH nibble.
// Double quantization: offset = mean(absmax); (absmax - offset) quantized blockwise (256) with
//   bnb's signed 8-bit dynamic map: nested_absmax[j] = max |absmax - offset| over block j,
//   absmax_q[b] = index of the nearest map value to (absmax[b] - offset) / nested_absmax[b / 256].
//   Dequant: absmax[b] = map[absmax_q[b]] * nested_absmax[b / 256] + offset.
#ifndef MOSFT_NF4_H
#define MOSFT_NF4_H

#include <stddef.h>
#include <stdint.h>

#include "core/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NF4_BLOCK 64
#define NF4_NESTED_BLOCK 256

extern const float k_nf4_code[16];

// bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)), 256 values.
void nf4_dynamic_map(float map[256]);
// The 8-bit code of x in the sorted map, as bnb's dQuantize: the nearest value; a value exactly on the
// fp32 midpoint of two neighbours goes to the EVEN index (where bnb's binary search ends); NaN -> 0.
uint8_t nf4_dynamic_code(const float map[256], float x);

typedef struct {
    int64_t numel;         // elements of the original tensor
    int64_t rows, cols;    // its 2-D shape (rows * cols == numel)
    int64_t n_blocks;      // ceil(numel / 64)
    uint8_t *packed;       // [ceil(numel / 2)] two codes per byte
    int double_quant;
    float *absmax;         // [n_blocks] fp32 scales (double_quant == 0)
    uint8_t *absmax_q;     // [n_blocks] 8-bit codes (double_quant == 1)
    float *nested_absmax;  // [ceil(n_blocks / 256)]
    float offset;          // mean of absmax
    float nested_code[256];
} nf4_tensor;

// Quantize `w` (numel floats, row-major [rows][cols]); the caller frees with nf4_free.
void nf4_quantize(const float *w, int64_t rows, int64_t cols, int double_quant, nf4_tensor *out);
// The per-block fp32 scales (undoing the double quantization when present).
void nf4_block_absmax(const nf4_tensor *t, float *absmax /*[n_blocks]*/);
// Dequantize the whole tensor into out[numel].
void nf4_dequantize(const nf4_tensor *t, float *out);
// Dequantize rows [row0, row0 + nrows) into out[nrows][cols].
void nf4_dequantize_rows(const nf4_tensor *t, int64_t row0, int64_t nrows, float *out);
void nf4_free(nf4_tensor *t);
size_t nf4_bytes(const nf4_tensor *t);  // storage size

// Bytes of an NF4 tensor of `numel` elements with/without double quantization (for memory plans).
double nf4_storage_bytes(int64_t numel, int double_quant);

// Write / read the HF bnb-4bit layout of one weight: <name> (U8 packed), <name>.absmax,
// <name>.quant_map, <name>.nested_absmax, <name>.nested_quant_map,
// <name>.quant_state.bitsandbytes__nf4 (U8 bytes of a JSON object). Names are referenced by the writer
// until it has written, so they are kept in `t`'s storage; keep t alive until st_writer_write.
void nf4_write_bnb(st_writer *w, const char *name, const nf4_tensor *t, char *json_buf, size_t json_cap);
// Read a pre-quantized weight `name` from a checkpoint set. Returns MOSFT_OK, or MOSFT_ERR_INPUT naming
// the file and tensor when something is missing or inconsistent. *found = 0 (and OK) if `name` is not
// stored as bnb-4bit.
int nf4_read_bnb(const st_set *s, const char *name, nf4_tensor *out, int *found);

#ifdef __cplusplus
}
#endif
#endif
