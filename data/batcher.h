// batcher.h: the training data stream: a weighted mixture of sources, encoded (chat.h), shuffled,
// cut into padded micro-batches, with a held-out eval set and an exact, serializable cursor.
//
// Pipeline (all deterministic given data_options; see dataset.h for one source):
//   sources --mixture draw (weights, data.seed)--> examples --skip eval ids--> encode (drop: nothing
//   to train on) --> shuffle buffer (shuffle_buffer examples, random pick) --> [length groups:
//   group_size micro-batches' worth sorted by length, cut, the batches in random order] -->
//   micro-batches of micro_batch_size rows padded to the longest row --> prefetch queue --> trainer.
//
// Mixture: a draw picks a source with probability weight / (sum of the weights still in play); that
// source is read until it yields a kept example, so weights are shares of *training* examples
// whatever each source loses to eval, bad records or empty targets.
// Epochs: with epochs = N every source is read N times; a source whose pass ended leaves the draw
// until all have ended (the weights set the interleaving; every example is used once per epoch).
// With epochs = 0 (endless) each source restarts on its own when its pass ends, so the weights are
// the long-run mixture proportions. The last micro-batch of a finite stream may have B < micro.
//
// Eval: before training, examples are scanned from the start of the mixture stream and one in
// eight (by a hash of the seed, the source and the example's ordinal) is held out, until
// eval_examples are collected or one pass ends. So at most 1/8 of a small data set becomes eval. Held-
// out examples are skipped by the training stream in every pass. The eval set is a fixed list of
// micro-batches sorted by length (less padding; the mean loss does not depend on the order).
//
// Resume: batcher_cursor_save() serializes the reader positions of every source (shard, byte offset,
// line, pass), the PRNG states, the shuffle buffer's examples (as token ids + mask runs), and the
// micro-batches prepared but not yet handed out; zlib-compressed. A batcher opened with the same
// options and restored with it yields the same micro-batches as the uninterrupted run. Cost: gzip
// shards (local or HTTP) are re-inflated from their start up to the saved offset on restore.
//
// Threads: with prefetch > 0 a loader thread prepares micro-batches ahead (started by the first
// batcher_next). The tokenizer must not be used by anyone else while the batcher is open.
#ifndef MOSFT_DATA_BATCHER_H
#define MOSFT_DATA_BATCHER_H

#include <stdint.h>

#include "data/dataset.h"
#include "data/tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

// One micro-batch. Row b holds lengths[b] real tokens, then padding.
typedef struct {
    int B;                    // rows (micro_batch_size; fewer only at the end of a finite stream)
    int S;                    // padded length: longest row, rounded up to pad_to_multiple
    int32_t *input_ids;       // (B, S) token ids; pad_id on padding
    int32_t *labels;          // (B, S) = input_ids where trained, -100 elsewhere (prompt, padding);
                              //        NOT shifted: position t's loss predicts labels[t] from t-1
    int32_t *attention_mask;  // (B, S) 1 on real tokens, 0 on padding
    int32_t *lengths;         // (B) real tokens per row
    int64_t n_tokens;         // sum of lengths
    int64_t n_supervised;     // labels != -100
} data_batch;

typedef struct batcher batcher;

// Open every source (missing files, bad URLs, 404s fail here with an input error), then build the
// eval set (which reads and encodes the start of the stream). `tok` is borrowed.
int batcher_open(batcher **out, const data_options *o, tokenizer *tok);
// The next training micro-batch: MOSFT_OK with *out valid until the next call, or *out = NULL when
// a finite stream (epochs > 0) has ended; an error code (message recorded) on a fatal data error.
int batcher_next(batcher *b, const data_batch **out);
// The fixed eval set: batcher_eval_count() micro-batches (0 when eval_examples = 0).
int batcher_eval_count(const batcher *b);
const data_batch *batcher_eval_batch(const batcher *b, int i);
// Serialize the position after the batches handed out so far (malloc'd bytes).
int batcher_cursor_save(batcher *b, uint8_t **bytes, size_t *len);
// Restore a saved position; only before the first batcher_next. Input error if the cursor was
// saved with other data options (sources, seeds, lengths, batch size, tokenizer).
int batcher_cursor_restore(batcher *b, const uint8_t *bytes, size_t len);
// Statistics of the training stream so far (a snapshot owned by the batcher, valid until the next call).
const data_stats *batcher_stats(batcher *b);
int batcher_epoch(const batcher *b);  // completed epochs (epochs > 0) or passes of source 0 (endless)
void batcher_close(batcher *b);

// Pad `n` encoded rows into a new batch (shared with tests and tools). rows[i] = (ids, labels, len).
data_batch *data_batch_make(int n, int32_t *const *ids, int32_t *const *labels, const int32_t *lens, int32_t pad_id,
                            int pad_to_multiple);
void data_batch_free(data_batch *b);

#ifdef __cplusplus
}
#endif
#endif
