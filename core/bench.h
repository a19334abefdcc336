// bench.h: `mosft bench`: training speed and memory of the CUDA backend on random weights at a real
// model's shapes (generated on the device: no multi-gigabyte files), one optimizer step at a time.
#ifndef MOSFT_BENCH_H
#define MOSFT_BENCH_H

#include <stdint.h>

#include "core/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *model;         // llama2-7b | llama3.2-3b | llama2-13b | a config.json (or its folder)
    const char *adapter;       // mos (R_v 8, r 32, l 4, R_p 2) | lora (r 64)
    const char *recompute;     // none | partial | full
    const char *quantization;  // nf4 | none
    int batch, seq;            // micro-batch shape (one micro-batch per step)
    int steps, warmup;         // timed steps (median reported) after warm-up steps
    uint64_t seed;
    double dropout;            // the adapter's input dropout, in [0, 1)
    double supervised;         // share of each sequence with a loss (its end), in (0, 1]
    int keep_dequantized;      // NF4: the base kept as bf16 (model.keep_dequantized)
} bench_args;

// The HF config of a known model name; MOSFT_ERR_INPUT listing the names otherwise.
int bench_model_config(const char *name, llama_config *out);
// Run the benchmark; prints one human line and one JSON line on stdout.
int bench_run(const bench_args *a);

#ifdef __cplusplus
}
#endif
#endif
