// train.h: `mosft train` and `mosft eval`: the step loop on top of a backend (CPU or CUDA), the data
// stream, checkpoints and exact resume, progress lines and metrics.
#ifndef MOSFT_TRAIN_H
#define MOSFT_TRAIN_H

#include <stdint.h>
#include <stdio.h>

#include "core/backend.h"
#include "core/common.h"
#include "core/config.h"

#ifdef __cplusplus
extern "C" {
#endif

// The data the loop consumes: a stream of training micro-batches (B = train.micro_batch_size rows,
// right-padded to the longest), a fixed held-out eval set, and a cursor for exact resume.
typedef struct train_data train_data;
struct train_data {
    // Next training micro-batch (valid until the next call). Returns 1, 0 when the data is exhausted
    // (data.epochs passes done), or an error code (negative is never used: MOSFT_ERR_*) via *rc.
    int (*next)(train_data *d, micro_batch *mb, int *rc);
    int (*n_eval)(train_data *d);
    void (*eval_batch)(train_data *d, int i, micro_batch *mb);
    // Serialize / restore the reader position (everything needed for identical next batches).
    int (*save_cursor)(train_data *d, mosft_buf *out);
    int (*restore_cursor)(train_data *d, const void *bytes, size_t n);
    void (*print_stats)(train_data *d, FILE *f);
    void (*close)(train_data *d);
    void *impl;
};

// Open the configured data (core/data_glue.c): tokenizer, sources, batcher. pad_id fills padding.
int train_data_open(train_data **out, const mosft_config *cfg, int *pad_id);

typedef struct {
    const char *resume_dir;  // --resume RUN_DIR (NULL: a new run in cfg->output.dir)
    int dry_run;             // print the plan and stop before step 1
    int64_t stop_after;      // stop (with a checkpoint) after this many steps in this process (0 = no), for tests
} train_args;

// The whole `mosft train`. Returns MOSFT_OK or an error code with the message recorded.
int train_run(mosft_config *cfg, const train_args *args);

typedef struct {
    const char *adapter_path;  // NULL: a fresh (untrained) adapter of the config
    int max_batches;           // 0 = the whole eval set
} eval_args;
// `mosft eval`: held-out loss and perplexity of an adapter.
int train_eval(mosft_config *cfg, const eval_args *args);

// Learning rate of optimizer step `step` (0-based), HF-style schedules: linear warmup over
// ceil(warmup_ratio * total) steps, then linear (or cosine) decay to 0, or constant.
double train_lr_at(const mosft_config *cfg, int64_t step);
int64_t train_warmup_steps(const mosft_config *cfg);

// Pick the backend for cfg->device ("auto": CUDA when a GPU is there). *model receives the CPU model
// (NULL on CUDA, which loads its own).
int train_backend_open(const mosft_config *cfg, adapter *ad, backend **be, llama_model **model);

#ifdef __cplusplus
}
#endif
#endif
