// cmd_export.c: `mosft export ADAPTER.mos -o DIR`: an adapter as a PEFT LoRA folder.
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/adapter.h"
#include "core/common.h"
#include "core/export.h"
#include "core/fileio.h"

static const char *k_help =
    "usage: mosft export ADAPTER.mos -o DIR [--dtype f32|bf16] [--base-model NAME] [--force]\n"
    "\n"
    "Write the adapter as a Hugging Face PEFT LoRA folder that PEFT, vLLM and friends load as it is:\n"
    "  DIR/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, ...\n"
    "  DIR/adapter_model.safetensors  base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight\n"
    "                                 [r, d_in] and .lora_B.weight [d_out, r]\n"
    "Each layer's A and B are the MoS factors assembled from the pools exactly as in training, so\n"
    "PEFT's delta (lora_alpha / r) * B @ A is the trained one. A MoS adapter of rank r exports to a\n"
    "per-layer LoRA of rank r: its size is that of LoRA rank r (the pool savings are native only).\n"
    "\n"
    "ADAPTER.mos may also be a run or checkpoint folder holding adapter.mos.\n"
    "\n"
    "options:\n"
    "  -o, --output DIR     the folder to write (created; must be new or empty unless --force)\n"
    "  --dtype f32|bf16     tensor type (default f32: exact; bf16 halves the size, rounding A and B)\n"
    "  --base-model NAME    base_model_name_or_path in adapter_config.json (default: the one recorded\n"
    "                       in the adapter, i.e. model.name or model.path of the training config)\n"
    "  --force              write into a non-empty folder, replacing adapter_config.json and\n"
    "                       adapter_model.safetensors (other files there are left alone)\n"
    "  -h, --help           this text\n"
    "\n"
    "exit status: 0 written, 1 runtime failure (disk), 2 bad input (arguments, adapter file)\n";

static int usage_error(const char *msg, const char *arg) {
    fprintf(stderr, "error: export: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
    fputs("usage: mosft export ADAPTER.mos -o DIR [--dtype f32|bf16] [--base-model NAME] [--force]\n"
          "(mosft export --help for more)\n",
          stderr);
    return MOSFT_ERR_INPUT;
}

int cmd_export(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(k_help, stdout);
        return 0;
    }
    static const struct option opts[] = {{"output", required_argument, 0, 'o'},
                                         {"dtype", required_argument, 0, 'd'},
                                         {"base-model", required_argument, 0, 'b'},
                                         {"force", no_argument, 0, 'f'},
                                         {0, 0, 0, 0}};
    export_options eo = {MOSFT_F32, 0, NULL};
    const char *out = NULL;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "o:", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case 'd':
            if (!strcmp(optarg, "f32") || !strcmp(optarg, "F32") || !strcmp(optarg, "float32"))
                eo.dtype = MOSFT_F32;
            else if (!strcmp(optarg, "bf16") || !strcmp(optarg, "BF16") || !strcmp(optarg, "bfloat16"))
                eo.dtype = MOSFT_BF16;
            else
                return usage_error("--dtype: expected f32 or bf16, got", optarg);
            break;
        case 'b': eo.base_model = optarg; break;
        case 'f': eo.force = 1; break;
        default: return usage_error("unknown or incomplete option", argv[optind - 1]);
        }
    }
    if (optind != argc - 1) return usage_error(optind < argc ? "expected one ADAPTER.mos, got several" : "expected an ADAPTER.mos", NULL);
    if (!out || !*out) return usage_error("expected -o DIR (the PEFT folder to write)", NULL);
    const char *in = argv[optind];
    char *path = dir_exists(in) ? path_join(in, "adapter.mos") : xstrdup(in);
    if (!file_exists(path)) {
        int rc = mosft_fail(MOSFT_ERR_INPUT, "%s: no such adapter file", path);
        free(path);
        return cli_fail(rc);
    }
    adapter *a = NULL;
    int rc = adapter_load(&a, path, NULL);
    if (rc == MOSFT_OK) rc = export_peft(a, out, &eo);
    if (rc == MOSFT_OK) {
        int n_mod = 0;
        for (int t = 0; t < MOD_COUNT; t++) n_mod += a->spec.targets[t] != 0;
        char targets[128];
        adapter_targets_str(&a->spec, targets, sizeof targets);
        fprintf(stdout, "wrote %s: PEFT LoRA, r %d, lora_alpha %g, %d layers x %d modules (%s), %s, from %s (%s, step %lld)\n",
                out, a->rank, export_peft_lora_alpha(a), a->model.n_layers, n_mod, targets, eo.dtype == MOSFT_BF16 ? "bf16" : "f32",
                path, a->spec.method, (long long)a->step);
    }
    adapter_free(a);
    free(path);
    return cli_fail(rc);
}
