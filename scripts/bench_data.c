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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    printf("encode   %10.0f tokens/s    (%.0f examples/s, %.1f tokens/example, %.1f%% supervised)\n", (double)toks / t,
           (double)ex / t, (double)toks / (double)ex, 100.0 * (double)sup / (double)toks);
    chat_tokens_free(&ct);
    chat_encoder_free(&enc);
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
    printf("batches  %10.0f tokens/s    (%.0f padded cells/s, %.1f%% padding, %lld micro-batches of 16, %.1f s)\n",
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
    bench_encode(&o, tok);
    bench_batches(&o, tok);
    tokenizer_free(tok);
    return 0;
}
