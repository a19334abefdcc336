// cmd_train.c: `mosft train CONFIG.json [--resume RUN_DIR] [--set k=v ...] [--dry-run]`.
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/common.h"
#include "core/fileio.h"
#include "core/train.h"

static const char *k_help =
    "usage: mosft train CONFIG.json [--set key=value ...] [--dry-run]\n"
    "       mosft train --resume RUN_DIR [--set key=value ...]\n"
    "\n"
    "Train an adapter (MoS by default) on a frozen base model, as the config describes: stream and\n"
    "tokenize the data sources, run train.steps optimizer steps, evaluate on the held-out split every\n"
    "train.eval_every steps, and write checkpoints every output.save_every steps into output.dir:\n"
    "  RUN_DIR/config.json                      the resolved configuration (defaults filled)\n"
    "  RUN_DIR/metrics.jsonl                    one JSON line per step (loss, grad_norm, lr, tokens, time) and eval\n"
    "  RUN_DIR/checkpoint-NNNNNN/adapter.mos    the adapter at step N (keep_last are kept)\n"
    "  RUN_DIR/checkpoint-NNNNNN/trainer_state.safetensors   AdamW moments, step, data cursor\n"
    "  RUN_DIR/adapter.mos                      the latest adapter: `mosft export RUN_DIR/adapter.mos -o DIR`\n"
    "\n"
    "Before step 1 it prints the configuration, the trainable parameter count and the memory plan; then one\n"
    "line per train.log_every steps: step, loss, gradient norm, learning rate, step time, tokens/s, memory,\n"
    "elapsed time and ETA. Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and\n"
    "exits; a second Ctrl-C stops at once (checkpoints are written atomically, the last one stays whole).\n"
    "\n"
    "options:\n"
    "  --set key=value   override a config key, e.g. --set train.lr=1e-4 --set model.path=/models/x\n"
    "                    (`mosft help config` lists every key)\n"
    "  --resume RUN_DIR  continue a run from its newest checkpoint, exactly as if it had not stopped\n"
    "                    (uses RUN_DIR/config.json; --set may still change e.g. train.steps)\n"
    "  --dry-run         load everything, print the plan, stop before step 1\n"
    "  --stop-after N    stop with a checkpoint after N steps of this process (for tests and time slices)\n"
    "  -q, --quiet       errors only      -v, --verbose   more detail\n"
    "  -h, --help        this text\n"
    "\n"
    "examples:\n"
    "  mosft train configs/demo.json\n"
    "  mosft train configs/llama2-7b-superni.json --set model.path=/models/Llama-2-7b-hf \\\n"
    "      --set data.sources[0].path=/data/superni/tasks\n"
    "  mosft train --resume runs/llama2-7b-superni --set train.steps=20000\n";

int cmd_train(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(k_help, stdout);
        return 0;
    }
    static const struct option opts[] = {{"set", required_argument, 0, 's'},    {"resume", required_argument, 0, 'r'},
                                         {"dry-run", no_argument, 0, 'n'},      {"stop-after", required_argument, 0, 'S'},
                                         {"quiet", no_argument, 0, 'q'},        {"verbose", no_argument, 0, 'v'},
                                         {0, 0, 0, 0}};
    char **sets = xcalloc((size_t)argc, sizeof(char *));
    int n_sets = 0, c;
    train_args ta = {0};
    optind = 1;
    while ((c = getopt_long(argc, argv, "s:r:qv", opts, NULL)) != -1) {
        switch (c) {
        case 's': sets[n_sets++] = optarg; break;
        case 'r': ta.resume_dir = optarg; break;
        case 'n': ta.dry_run = 1; break;
        case 'S': ta.stop_after = atoll(optarg); break;
        case 'q': mosft_verbosity = 0; break;
        case 'v': mosft_verbosity = 2; break;
        default: free(sets); fprintf(stderr, "hint: mosft train --help\n"); return 2;
        }
    }
    const char *cfg_path = NULL;
    char *resume_cfg = NULL;
    if (ta.resume_dir) {
        if (optind != argc) {
            free(sets);
            fprintf(stderr, "error: train: with --resume the config comes from RUN_DIR/config.json; drop %s\n", argv[optind]);
            return 2;
        }
        resume_cfg = path_join(ta.resume_dir, "config.json");
        if (!file_exists(resume_cfg)) {
            fprintf(stderr, "error: %s: not found: expected a run directory made by mosft train\n", resume_cfg);
            free(resume_cfg);
            free(sets);
            return 2;
        }
        cfg_path = resume_cfg;
    } else {
        if (optind != argc - 1) {
            free(sets);
            fprintf(stderr, "error: train: expected one CONFIG.json\nhint: mosft train --help\n");
            return 2;
        }
        cfg_path = argv[optind];
    }
    mosft_config cfg;
    int rc = cli_load_config(&cfg, cfg_path, sets, n_sets);
    if (rc == MOSFT_OK) rc = train_run(&cfg, &ta);
    config_free(&cfg);
    free(resume_cfg);
    free(sets);
    return cli_fail(rc);
}
