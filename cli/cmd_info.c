// cmd_info.c: `mosft info MODEL_DIR`: what a model folder holds, and what it costs in memory.
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/common.h"
#include "core/fileio.h"
#include "core/info.h"

static const char *k_help =
    "usage: mosft info MODEL_DIR\n"
    "       mosft info ADAPTER.mos\n"
    "       mosft info CONFIG.json [--set key=value ...]\n"
    "\n"
    "MODEL_DIR: a Hugging Face LLaMA folder (config.json, model.safetensors or sharded with\n"
    "  model.safetensors.index.json, tokenizer.json): architecture, parameter count, the weights'\n"
    "  size as bf16 and as NF4 (what mosft keeps on the GPU), and whether a tokenizer was found.\n"
    "ADAPTER.mos: the adapter's method, ranks, targets, trainable parameters, step and the base model\n"
    "  it was trained on.\n"
    "CONFIG.json: the model of the config and the adapter it describes: trainable parameters per\n"
    "  module type and in total (also printed by `mosft train --dry-run`).\n"
    "\n"
    "options:\n"
    "  --set key=value   override a config key (CONFIG.json form only)\n"
    "  -h, --help        this text\n";

int cmd_info(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(k_help, stdout);
        return 0;
    }
    static const struct option opts[] = {{"set", required_argument, 0, 's'}, {0, 0, 0, 0}};
    char **sets = xcalloc((size_t)argc, sizeof(char *));
    int n_sets = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "s:", opts, NULL)) != -1) {
        if (c == 's')
            sets[n_sets++] = optarg;
        else {
            free(sets);
            fputs(k_help, stderr);
            return 2;
        }
    }
    if (optind != argc - 1) {
        free(sets);
        fprintf(stderr, "error: info: expected one MODEL_DIR, ADAPTER.mos or CONFIG.json\n%s", k_help);
        return 2;
    }
    const char *path = argv[optind];
    int rc;
    size_t n = strlen(path);
    if (n > 4 && !strcmp(path + n - 4, ".mos"))
        rc = info_adapter(path, stdout);
    else if (n > 5 && !strcmp(path + n - 5, ".json") && file_exists(path)) {
        mosft_config cfg;
        rc = cli_load_config(&cfg, path, sets, n_sets);
        if (rc == MOSFT_OK) rc = info_config(&cfg, stdout);
        config_free(&cfg);
    } else
        rc = info_model(path, stdout);
    free(sets);
    return cli_fail(rc);
}
