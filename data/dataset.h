// dataset.h: one data source as a stream of chat examples, and the data options and statistics
// shared with the batcher.
//
// A source is a path (file, directory, glob or URL) expanded into shards, read record by record
// (records.h) and turned into examples by its format (formats.h). A *pass* reads every shard once;
// example k of a pass has ordinal k, the same on every pass: templates and SuperNI sampling are keyed
// by (template_seed, source, record), so a pass always yields the same examples.
//
// Positions (dataset_pos) are exact: restoring one re-opens the shard at the saved byte offset (gzip
// and HTTP-gzip shards re-inflate from the start of the shard and discard; see source.h) and
// regenerates the examples of a partly consumed record (a SuperNI task file).
#ifndef MOSFT_DATA_DATASET_H
#define MOSFT_DATA_DATASET_H

#include <stdint.h>

#include "data/chat.h"
#include "data/formats.h"
#include "data/records.h"
#include "data/source.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *path;    // file, directory, glob or http(s) URL; .gz is inflated
    const char *format;  // codealpaca | superni | flan_v2 | messages | prompt_completion
    double weight;       // mixture weight (> 0)
    int64_t max_records; // records per pass (0 = all)
    const char *tasks;          // superni: split file of task names to use (NULL/"" = every task file)
    const char *exclude_tasks;  // superni: split file of task names to skip (NULL/"" = none)
    int zero_shot_per_task, few_shot_per_task, n_few_shot;  // superni: 60, 20, 2
} data_source_spec;

typedef struct {
    const data_source_spec *sources;
    int n_sources;
    const char *eos_text;    // appended to assistant turns (tokenizer_config.json's eos_token)
    int max_seq_len;         // truncation (keep the left part)
    int micro_batch_size;    // sequences per micro-batch
    int32_t pad_id;          // input_ids of padding (labels -100, attention_mask 0 there)
    int pad_to_multiple;     // the padded length S is rounded up to a multiple of this (1 = none)
    int eval_examples;       // held out from the start of the stream (0 = none)
    int shuffle_buffer;      // examples in the shuffle buffer (1 = stream order)
    int epochs;              // passes over every source; 0 = endless (each source cycles)
    int group_by_length;     // sort groups of group_size micro-batches by length before batching
    int group_size;          // micro-batches per length group (HF's megabatch: 50)
    int skip_bad_records;    // 1: skip and count malformed records; 0: the first one is fatal
    uint64_t seed;           // mixture draws, shuffle, eval selection, group order
    uint64_t template_seed;  // prompt templates and SuperNI sampling
    int prefetch;            // micro-batches prepared ahead by a loader thread (0 = no thread)
    source_http_opts http;
} data_options;

// Defaults of the paper's recipe (max_seq_len 512, eval 1024, buffer 10000, seeds 42, ...).
void data_options_default(data_options *o);

#define DATA_STATS_BAD_KEEP 5

typedef struct {
    int64_t records;         // records read: JSONL lines, array elements, task files
    int64_t bad_records;     // malformed records skipped (data.on_bad_record = skip)
    int64_t bad_instances;   // SuperNI instances without a usable input/output
    char bad_first[DATA_STATS_BAD_KEEP][320];  // the first "file:line: reason" messages
    int n_bad_first;
    int64_t tasks_skipped;   // SuperNI task files not in the split list, excluded, or _mmmlu_
    int64_t examples;        // examples formatted (before encoding)
    int64_t dropped_empty;   // nothing to train on (no assistant turn, or truncation cut it all)
    int64_t kept;            // examples encoded and kept (training + eval)
    int64_t truncated;       // kept examples that were longer than max_seq_len
    int64_t eval;            // kept examples held out for eval
    int64_t tokens;          // tokens of kept examples
    int64_t supervised;      // of which with a label (loss)
    int64_t max_len;
    int64_t *len_hist;       // (hist_n) kept examples by token count
    int hist_n;
} data_stats;

void data_stats_init(data_stats *st, int max_seq_len);
void data_stats_free(data_stats *st);
void data_stats_copy(data_stats *dst, const data_stats *src);  // dst initialized (or zeroed)
void data_stats_merge(data_stats *dst, const data_stats *src);
void data_stats_add_kept(data_stats *st, const chat_tokens *t);
void data_stats_add_bad(data_stats *st, const char *msg);
int64_t data_stats_percentile(const data_stats *st, double q);  // token count at quantile q of kept

// ---- one source -------------------------------------------------------------------------------

typedef struct dataset dataset;

// Where a dataset stands (serialized into the data cursor).
typedef struct {
    int64_t pass;          // completed passes
    int32_t shard;         // current shard index
    int32_t done;          // this pass has ended
    record_pos rec;        // next record of the shard
    int64_t record_ord;    // records read in this pass
    int64_t example_ord;   // ordinal of the next example
    // A record whose examples are partly consumed (SuperNI task): re-read and skip on restore.
    int32_t has_pending;
    int32_t pending_used;
    record_pos pending_rec;
    int64_t pending_record_ord;
} dataset_pos;

// One example out of a dataset.
typedef struct {
    chat_example *ex;      // borrowed: valid until the next dataset_next
    uint64_t ordinal;      // example number within the pass
    const char *file;      // shard it came from (borrowed)
    int64_t line;          // line of its record
} dataset_item;

// Expand the path, load split files, check every shard exists (a missing file, a bad URL or a 404
// is an input error here, before anything is read). `index` keys the templates; stats may be NULL.
int dataset_open(dataset **out, int index, const data_source_spec *spec, const data_options *o, data_stats *stats);
// The next example of this pass: MOSFT_OK with *got = 1, or *got = 0 at the end of the pass.
// Malformed records are skipped (counted in stats) or fatal, as the options say.
int dataset_next(dataset *d, dataset_item *out, int *got);
// Start the next pass from the first shard.
void dataset_rewind(dataset *d);
void dataset_tell(const dataset *d, dataset_pos *pos);
int dataset_seek(dataset *d, const dataset_pos *pos);
// Count into `stats` from now on (NULL: count nothing; the eval scan reads without counting).
void dataset_set_stats(dataset *d, data_stats *stats);
const char *dataset_path(const dataset *d);
int dataset_format(const dataset *d);
void dataset_close(dataset *d);

// ---- one pass over everything (mosft data) ----------------------------------------------------

// Called for every example of one pass over each source in order (t == NULL: dropped, nothing to
// train on). Return nonzero to stop early.
typedef int (*data_scan_fn)(void *ctx, int source, const dataset_item *item, const chat_tokens *t);
// Encodes every example of one pass of every source (at most max_examples per source, 0 = all),
// filling per_source[i] (initialized by the caller) for source i. Returns MOSFT_OK or the first
// fatal error.
int data_scan(const data_options *o, tokenizer *tok, int64_t max_examples, data_scan_fn fn, void *ctx,
              data_stats *per_source);

#ifdef __cplusplus
}
#endif
#endif
