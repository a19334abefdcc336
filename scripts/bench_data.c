// bench_data.c: throughput of the data pipeline on one core: records -> chat examples -> tokens +
// masks -> shuffled, length-grouped, padded micro-batches. Built and run by scripts/bench_data.sh.
//
//   bench_data TOKENIZER_JSON DATA_FILE FORMAT EOS_TEXT [MIN_SECONDS]
//
// Stages, each timed on its own:
//   parse    read + JSON + format into chat examples (no tokenizer)
//   encode   + chat template, one tokenization of the whole text, prefix tokenizations for the mask
//   batches  the batcher end to end (prefetch 0: everything on the calling thread), micro-batch 16,
//            max_seq_len 2048, shuffle buffer 10000, length grouping on, no eval split, endless
// Tokens are real (unpadded) tokens; "padded" counts B*S cells.
//
// The tokenizer caches pre-tokens, and the stored CodeAlpaca file is only 2k records, so a loop over it
// measures a warm cache. "cold" rows reload the tokenizer before each timed pass (load not timed):
// every pre-token is seen for the first time, the conservative figure for a large data set.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/common.h"
#include "data/batcher.h"

static double g_min_s = 5.0;

static void bench_parse(const data_options *o) {
    double t0 = mosft_now(), t;
    int64_t ex = 0, bytes_passes = 0;
    do {
        dataset *d;
        if (dataset_open(&d, 0, &o->sources[0], o, NULL) != MOSFT_OK) {
            fprintf(stderr, "error: %s\n", mosft_error());
            exit(2);
        }
        dataset_item it;
        int got;
        while (dataset_next(d, &it, &got) == MOSFT_OK && got) ex++;
        dataset_close(d);
        bytes_passes++;
    } while ((t = mosft_now() - t0) < g_min_s);
    printf("parse    %10.0f examples/s  (%lld passes, %.1f s)\n", (double)ex / t, (long long)bytes_passes, t);
}

static void bench_encode(const data_options *o, tokenizer *tok) {
    chat_encoder enc;
    chat_encoder_init(&enc, tok, o->eos_text, o->max_seq_len);
    chat_tokens ct = {0};
    double t0 = mosft_now(), t;
    int64_t ex = 0, toks = 0, sup = 0;
    do {
        dataset *d;
        if (dataset_open(&d, 0, &o->sources[0], o, NULL) != MOSFT_OK) exit(2);
        dataset_item it;
        int got;
        while (dataset_next(d, &it, &got) == MOSFT_OK && got) {
            chat_encode(&enc, it.ex, &ct);
            ex++;
            toks += ct.n;
            sup += ct.n_supervised;
        }
        dataset_close(d);
    } while ((t = mosft_now() - t0) < g_min_s);
    printf("encode   %10.0f tokens/s    warm cache (%.0f examples/s, %.1f tokens/example, %.1f%% supervised)\n", (double)toks / t,
           (double)ex / t, (double)toks / (double)ex, 100.0 * (double)sup / (double)toks);
    chat_tokens_free(&ct);
    chat_encoder_free(&enc);
}

static tokenizer *load_tok(const char *path) {
    tokenizer *t;
    if (tokenizer_load(&t, path) != MOSFT_OK) {
        fprintf(stderr, "error: %s\n", mosft_error());
        exit(2);
    }
    return t;
}

// One pass with a fresh tokenizer per repetition: encode only, then the whole batcher (epochs 1).
static void bench_cold(const data_options *base, const char *tok_path) {
    double te = 0, tb = 0;
    int64_t toks_e = 0, toks_b = 0;
    int reps = 0;
    double wall0 = mosft_now();  // loads are not timed but bound the repetitions
    while ((te + tb < g_min_s || reps < 3) && (reps < 3 || mosft_now() - wall0 < 6 * g_min_s)) {
        tokenizer *tok = load_tok(tok_path);
        chat_encoder enc;
        chat_encoder_init(&enc, tok, base->eos_text, base->max_seq_len);
        chat_tokens ct = {0};
        double t0 = mosft_now();
        dataset *d;
        if (dataset_open(&d, 0, &base->sources[0], base, NULL) != MOSFT_OK) exit(2);
        dataset_item it;
        int got;
        while (dataset_next(d, &it, &got) == MOSFT_OK && got) {
            chat_encode(&enc, it.ex, &ct);
            toks_e += ct.n;
        }
        dataset_close(d);
        te += mosft_now() - t0;
        chat_tokens_free(&ct);
        chat_encoder_free(&enc);
        tokenizer_free(tok);
        tok = load_tok(tok_path);
        data_options o = *base;
        o.micro_batch_size = 16;
        o.eval_examples = 0;
        o.epochs = 1;
        o.prefetch = 0;
        t0 = mosft_now();
        batcher *b;
        if (batcher_open(&b, &o, tok) != MOSFT_OK) exit(2);
        const data_batch *x;
        while (batcher_next(b, &x) == MOSFT_OK && x) toks_b += x->n_tokens;
        batcher_close(b);
        tb += mosft_now() - t0;
        tokenizer_free(tok);
        reps++;
    }
    printf("encode   %10.0f tokens/s    cold cache (%d fresh tokenizers, one pass each)\n", (double)toks_e / te, reps);
    printf("batches  %10.0f tokens/s    cold cache, one epoch, micro-batch 16, length groups\n", (double)toks_b / tb);
}

static void bench_batches(const data_options *base, tokenizer *tok) {
    data_options o = *base;
    o.micro_batch_size = 16;
    o.eval_examples = 0;
    o.shuffle_buffer = 10000;
    o.group_by_length = 1;
    o.epochs = 0;
    o.prefetch = 0;
    double t0 = mosft_now(), t;
    batcher *b;
    if (batcher_open(&b, &o, tok) != MOSFT_OK) {
        fprintf(stderr, "error: %s\n", mosft_error());
        exit(2);
    }
    int64_t toks = 0, cells = 0, nb = 0;
    do {
        const data_batch *x;
        if (batcher_next(b, &x) != MOSFT_OK || !x) break;
        toks += x->n_tokens;
        cells += (int64_t)x->B * x->S;
        nb++;
    } while ((t = mosft_now() - t0) < g_min_s);
    printf("batches  %10.0f tokens/s    warm cache, endless (%.0f padded cells/s, %.1f%% padding, %lld micro-batches of 16, %.1f s)\n",
           (double)toks / t, (double)cells / t, 100.0 * (double)(cells - toks) / (double)cells, (long long)nb, t);
    // The cursor holds the shuffle buffer's examples: its size and cost matter for checkpoints.
    uint8_t *cur;
    size_t n;
    double c0 = mosft_now();
    batcher_cursor_save(b, &cur, &n);
    double c1 = mosft_now();
    batcher *r;
    batcher_open(&r, &o, tok);
    double c2 = mosft_now();
    int rc = batcher_cursor_restore(r, cur, n);
    double c3 = mosft_now();
    printf("cursor   %.2f MB (shuffle buffer of %d examples), save %.0f ms, restore %.0f ms%s\n", (double)n / 1e6,
           o.shuffle_buffer, (c1 - c0) * 1e3, (c3 - c2) * 1e3, rc == MOSFT_OK ? "" : " (FAILED)");
    free(cur);
    batcher_close(r);
    batcher_close(b);
}

// The loader thread against a trainer that consumes 20k tokens/s (sleeps in proportion): how long
// does batcher_next block after the first batch?
static void bench_prefetch(const data_options *base, tokenizer *tok) {
    data_options o = *base;
    o.micro_batch_size = 16;
    o.eval_examples = 0;
    o.prefetch = 4;
    batcher *b;
    if (batcher_open(&b, &o, tok) != MOSFT_OK) exit(2);
    const data_batch *x;
    double waited = 0, t0 = mosft_now(), first = 0;
    int64_t toks = 0;
    for (int k = 0; k < 60; k++) {
        double w0 = mosft_now();
        if (batcher_next(b, &x) != MOSFT_OK || !x) break;
        double w = mosft_now() - w0;
        if (k == 0) first = w;
        else waited += w;
        toks += x->n_tokens;
        struct timespec ts = {0, (long)((double)x->n_tokens / 20000.0 * 1e9)};
        nanosleep(&ts, NULL);
    }
    printf("prefetch first batch %.0f ms (fills the shuffle buffer), then blocked %.2f ms in total over 59 "
           "batches (%.1f s of a 20k tok/s trainer)\n", first * 1e3, waited * 1e3, mosft_now() - t0);
    batcher_close(b);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: bench_data TOKENIZER_JSON DATA_FILE FORMAT EOS_TEXT [MIN_SECONDS]\n");
        return 2;
    }
    if (argc > 5) g_min_s = atof(argv[5]);
    double t0 = mosft_now();
    tokenizer *tok;
    if (tokenizer_load(&tok, argv[1]) != MOSFT_OK) {
        fprintf(stderr, "error: %s\n", mosft_error());
        return 2;
    }
    printf("tokenizer load %.2f s: %s\n", mosft_now() - t0, argv[1]);
    data_source_spec spec = {argv[2], argv[3], 1.0, 0, NULL, NULL, 60, 20, 2};
    data_options o;
    data_options_default(&o);
    o.sources = &spec;
    o.n_sources = 1;
    o.eos_text = argv[4];
    o.max_seq_len = 2048;
    bench_parse(&o);
    bench_cold(&o, argv[1]);
    bench_encode(&o, tok);
    bench_batches(&o, tok);
    bench_prefetch(&o, tok);
    tokenizer_free(tok);
    return 0;
}
