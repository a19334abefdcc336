// cmd_bench.c: `mosft bench`: training speed and memory on random weights (core/bench.c).
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli/cli.h"
#include "core/bench.h"
#include "core/common.h"

static const char *k_help =
    "usage: mosft bench [--model NAME|CONFIG] [--adapter mos|lora] [--recompute none|partial|full]\n"
    "                   [--quantization nf4|none] [--dropout P] [--supervised F] [--batch N] [--seq N]\n"
    "                   [--keep-dequantized] [--steps N] [--warmup N] [--seed N]\n"
    "\n"
    "Times training steps of the CUDA backend (forward, backward, gradient norm, AdamW) on random weights\n"
    "of a real model's shapes, generated on the GPU. Prints the median ms/step, tokens/s, MFU and GPU\n"
    "memory as one human line and one JSON line.\n"
    "\n"
    "options:\n"
    "  --model M          llama2-7b (default), llama3.2-3b, llama2-13b, or a HF config.json / model folder\n"
    "  --adapter A        mos (R_v 8, r 32, l 4, R_p 2; default) or lora (r 64), on all 7 linears\n"
    "  --recompute R      none (default), partial or full\n"
    "  --quantization Q   nf4 (default: NF4 base with double quantization) or none (bf16 base)\n"
    "  --keep-dequantized the NF4 base dequantized to bf16 once at load instead of where each weight is used\n"
    "                     (model.keep_dequantized: the same results, faster, 2 bytes a weight more memory)\n"
    "  --dropout P        the adapter's input dropout (default 0; the paper's configs train with 0.1)\n"
    "  --supervised F     share of each sequence with a loss, its last F (default 1: every token). Chat\n"
    "                     data has less (`mosft data` reports it: ~0.6 for CodeAlpaca, ~0.03 for SuperNI), and\n"
    "                     lm_head + cross-entropy run on those rows alone; MFU counts them alone\n"
    "  --batch N          sequences per step (default 16)\n"
    "  --seq N            tokens per sequence (default 512)\n"
    "  --steps N          timed steps (default 10), after --warmup N (default 3)\n"
    "  --seed N           random weights, data and adapter (default 1)\n"
    "  -h, --help         this text\n";

int cmd_bench(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(k_help, stdout);
        return 0;
    }
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},     {"adapter", required_argument, 0, 'a'},
                                         {"recompute", required_argument, 0, 'r'}, {"quantization", required_argument, 0, 'q'},
                                         {"batch", required_argument, 0, 'b'},     {"seq", required_argument, 0, 'S'},
                                         {"steps", required_argument, 0, 'n'},     {"warmup", required_argument, 0, 'w'},
                                         {"seed", required_argument, 0, 'e'},      {"dropout", required_argument, 0, 'p'},
                                         {"supervised", required_argument, 0, 'u'}, {"keep-dequantized", no_argument, 0, 'k'},
                                         {0, 0, 0, 0}};
    bench_args a = {"llama2-7b", "mos", "none", "nf4", 16, 512, 10, 3, 1, 0.0, 1.0, 0};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:a:r:q:b:S:n:w:e:p:u:k", opts, NULL)) != -1) {
        switch (c) {
        case 'm': a.model = optarg; break;
        case 'a': a.adapter = optarg; break;
        case 'r': a.recompute = optarg; break;
        case 'q': a.quantization = optarg; break;
        case 'b': a.batch = atoi(optarg); break;
        case 'S': a.seq = atoi(optarg); break;
        case 'n': a.steps = atoi(optarg); break;
        case 'w': a.warmup = atoi(optarg); break;
        case 'e': a.seed = strtoull(optarg, NULL, 10); break;
        case 'p': a.dropout = atof(optarg); break;
        case 'u': a.supervised = atof(optarg); break;
        case 'k': a.keep_dequantized = 1; break;
        default: fprintf(stderr, "hint: mosft bench --help\n"); return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "error: bench: unexpected argument \"%s\"\nhint: mosft bench --help\n", argv[optind]);
        return 2;
    }
    return cli_fail(bench_run(&a));
}
