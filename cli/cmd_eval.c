// cmd_eval.c: `mosft eval CONFIG.json [--adapter ADAPTER.mos]`: held-out loss and perplexity.
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli/cli.h"
#include "core/common.h"
#include "core/train.h"

static const char *k_help =
    "usage: mosft eval CONFIG.json [--adapter ADAPTER.mos] [--max-batches N] [--set key=value ...]\n"
    "\n"
    "Mean cross-entropy (loss on the answer tokens only, as in training) and perplexity on the held-out\n"
    "split of the config's data (data.eval_examples examples, the same split training never sees).\n"
    "Without --adapter it evaluates the base model with a fresh adapter (B = 0: the base model itself).\n"
    "Prints one human line and one JSON line on stdout.\n"
    "\n"
    "options:\n"
    "  --adapter PATH     adapter.mos to evaluate (e.g. RUN_DIR/adapter.mos)\n"
    "  --max-batches N    evaluate at most N micro-batches\n"
    "  --set key=value    override a config key (e.g. --set device=cpu)\n"
    "  -h, --help         this text\n";

int cmd_eval(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(k_help, stdout);
        return 0;
    }
    static const struct option opts[] = {{"set", required_argument, 0, 's'},
                                         {"adapter", required_argument, 0, 'a'},
                                         {"max-batches", required_argument, 0, 'm'},
                                         {0, 0, 0, 0}};
    char **sets = xcalloc((size_t)argc, sizeof(char *));
    int n_sets = 0, c;
    eval_args ea = {0};
    optind = 1;
    while ((c = getopt_long(argc, argv, "s:a:m:", opts, NULL)) != -1) {
        switch (c) {
        case 's': sets[n_sets++] = optarg; break;
        case 'a': ea.adapter_path = optarg; break;
        case 'm': ea.max_batches = atoi(optarg); break;
        default: free(sets); fprintf(stderr, "hint: mosft eval --help\n"); return 2;
        }
    }
    if (optind != argc - 1) {
        free(sets);
        fprintf(stderr, "error: eval: expected one CONFIG.json\nhint: mosft eval --help\n");
        return 2;
    }
    mosft_config cfg;
    int rc = cli_load_config(&cfg, argv[optind], sets, n_sets);
    if (rc == MOSFT_OK) rc = train_eval(&cfg, &ea);
    config_free(&cfg);
    free(sets);
    return cli_fail(rc);
}
