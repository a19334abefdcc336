// checkpoint.h: run-directory checkpoints, written crash-safe and read back for exact resume.
//
//   RUN_DIR/checkpoint-NNNNNN/adapter.mos                the adapter (params, index tables, metadata)
//   RUN_DIR/checkpoint-NNNNNN/trainer_state.safetensors  AdamW moments, step, counters, data cursor
//   RUN_DIR/adapter.mos                                  the latest adapter (what `mosft export` takes)
//
// A checkpoint is written into checkpoint-NNNNNN.tmp/ (each file fsynced), then the folder is renamed
// and RUN_DIR fsynced: a crash at any moment leaves the previous checkpoint whole. Older checkpoints
// beyond keep_last are removed after the new one is in place.
#ifndef MOSFT_CHECKPOINT_H
#define MOSFT_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "core/adapter.h"
#include "core/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t step;          // completed optimizer steps
    int64_t tokens_seen;   // non-padding tokens processed
    double elapsed_s;      // training time so far (for the ETA after resume)
    int nonfinite_streak;  // consecutive skipped steps
} trainer_meta;

// Save checkpoint `meta->step` of a run. m, v: AdamW moments [ad->n_params].
int checkpoint_save(const char *run_dir, const adapter *ad, const float *m, const float *v, const void *cursor,
                    size_t cursor_len, const trainer_meta *meta, int keep_last);
// The newest complete checkpoint folder of a run (malloc'd path) and its step; removes stale *.tmp
// folders. MOSFT_ERR_INPUT when the run has none.
int checkpoint_find_latest(const char *run_dir, char **ckpt_dir, int64_t *step);
// Read trainer_state.safetensors of a checkpoint folder: moments (n_params each), cursor bytes, meta.
int checkpoint_load_state(const char *ckpt_dir, size_t n_params, float *m, float *v, mosft_buf *cursor,
                          trainer_meta *meta);

#ifdef __cplusplus
}
#endif
#endif
