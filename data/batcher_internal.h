// batcher_internal.h: the batcher's state, shared by batcher.c (the stream) and batcher_cursor.c
// (its serialization). Not a public header.
#ifndef MOSFT_DATA_BATCHER_INTERNAL_H
#define MOSFT_DATA_BATCHER_INTERNAL_H

#include <pthread.h>

#include "core/rng.h"
#include "data/batcher.h"

#define CURSOR_MAGIC "MOSFTDC1"
#define CURSOR_VERSION 1u

// One encoded example.
typedef struct {
    int32_t *ids, *labels;  // (n) each
    int32_t n, n_sup;
    uint32_t src;
    int32_t truncated;
    uint64_t ord;
} enc_ex;

struct batcher {
    data_options o;
    data_source_spec *specs;  // owned copies
    tokenizer *tok;
    chat_encoder enc;
    chat_tokens scratch;
    int n_src;
    dataset **ds;
    double *weight;       // (n_src)
    uint8_t *active;      // (n_src) epoch mode: the source still has data in this epoch
    int64_t *pass_yield;  // (n_src) training examples from the current pass
    int64_t epoch;
    int stream_ended;     // no more training examples (epochs done)
    int src_finished;     // and every batch was formed
    rng_state mix_rng, shuf_rng, group_rng;
    uint64_t fingerprint;
    enc_ex *buf;          // shuffle buffer (buf_n of cap)
    int buf_n, buf_cap;
    uint64_t *eval_ids;   // sorted (src << 48 | ordinal)
    int n_eval_ids;
    data_batch **eval_batches;
    int n_eval_batches;
    data_stats stats;     // the training stream's (guarded by state_mu)
    data_stats snap;      // snapshot after each production (guarded by q_mu)
    data_stats out_stats; // what batcher_stats returns
    // queue of prepared micro-batches (guarded by q_mu)
    data_batch **q;
    int q_head, q_len, q_cap;
    data_batch *current;  // handed to the caller
    int handed;           // batcher_next was called (no restore after)
    // loader thread
    int threaded, th_started, stop, q_finished, q_err;
    char q_errmsg[1024];
    pthread_t th;
    pthread_mutex_t state_mu, q_mu;
    pthread_cond_t q_cond, space_cond;
};

void enc_ex_free(enc_ex *e);
// Pad rows into a micro-batch with the batcher's pad id and multiple.
data_batch *batcher_make_batch(const batcher *b, enc_ex *const *rows, int n);
void batcher_q_push_locked(batcher *b, data_batch *x);
data_batch *batcher_q_at(const batcher *b, int i);

#endif
