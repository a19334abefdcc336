// main.c: `mosft <command> [options]`: dispatch and top-level help.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/common.h"
#include "core/config.h"
#include "core/version.h"

static const char *k_usage =
    "mosft " MOSFT_VERSION ": finetune LLaMA-family models with Mixture-of-Shards (MoS) adapters on a 4-bit NF4 base\n"
    "\n"
    "usage: mosft <command> [options]\n"
    "\n"
    "commands:\n"
    "  train CONFIG.json        stream and tokenize the data, train the adapter, write checkpoints\n"
    "  export ADAPTER.mos -o D  write a plain PEFT LoRA folder that PEFT and vLLM load\n"
    "  info MODEL_DIR|ADAPTER   architecture, parameter counts, sizes; adapter config and fingerprint\n"
    "  data CONFIG.json         show formatted examples with the loss mask, and data statistics\n"
    "  eval CONFIG.json         held-out loss and perplexity of an adapter\n"
    "  tokenize                 encode or decode text with a tokenizer.json (debugging aid)\n"
    "  bench                    measure training speed and memory on random weights\n"
    "  version                  print the version and the build (CPU-only or CUDA)\n"
    "  help [TOPIC]             this text; `mosft help config` lists every config key, `mosft help env`\n"
    "                           the environment variables\n"
    "\n"
    "Run `mosft <command> --help` for the options of one command.\n"
    "Exit codes: 0 ok, 1 runtime failure, 2 bad input (config, file, record, URL, argument).\n"
    "\n"
    "quick start:\n"
    "  mosft train configs/demo.json                 # the bundled tiny model and data, on CPU\n"
    "  mosft train configs/llama2-7b-superni.json --set model.path=/models/Llama-2-7b-hf\n"
    "  mosft export runs/demo/adapter.mos -o runs/demo/peft\n";

static int cmd_version(int argc, char **argv) {
    (void)argc;
    (void)argv;
#ifdef MOSFT_WITH_CUDA
    printf("mosft %s (CUDA build)\n", MOSFT_VERSION);
#else
    printf("mosft %s (CPU-only build)\n", MOSFT_VERSION);
#endif
    return 0;
}

static const char *k_env =
    "Environment variables (all optional; for tuning, profiling and tests):\n"
    "\n"
    "  MOSFT_THREADS=N            CPU threads of the CPU backend's ops and of NF4 quantization at load\n"
    "                             (default: all cores)\n"
    "  MOSFT_GEMM_SSE=1           CPU backend: the SSE matrix micro-kernel even where AVX2 is there (testing)\n"
    "  MOSFT_PROFILE=1            CUDA: time each phase of every micro-batch with events; the table comes\n"
    "                             when the backend closes (costs a few ms a step)\n"
    "  MOSFT_CUDA_PROFILE_STEP=N  CUDA: run micro-batch N between cudaProfilerStart/Stop, for\n"
    "                             `ncu --profile-from-start off` (docs/CUDA.md)\n"
    "  MOSFT_GEMM_TUNE=0|1|2      CUDA: keep cuBLASLt's first choice for every product (0, default), or\n"
    "                             choose each large product's algorithm by timing its bit-identical\n"
    "                             candidates once, in the second step (1; ~8 s at 7B; on an H100 its\n"
    "                             choices ran slower in the step at 3B, no faster at 7B), or choose and\n"
    "                             print the choices (2)\n"
    "  MOSFT_WEIGHT_PREFETCH=0    CUDA: dequantize each NF4 weight group on the main stream instead of\n"
    "                             ahead on a second stream\n"
    "  MOSFT_WEIGHT_AHEAD=0       CUDA: dequantize one NF4 group ahead only, instead of up to a layer's\n"
    "                             groups started by each attention kernel\n"
    "  MOSFT_ADAPTER_OVERLAP=0    CUDA: the adapter's weight gradients on the main stream instead of a side\n"
    "                             stream (bit-identical either way)\n"
    "  MOSFT_SWIGLU_FUSED=0       CUDA: SwiGLU and the adapter products that read its output (the down\n"
    "                             adapter's h, the gate|up adapter's gh) as separate kernels and GEMMs\n"
    "  MOSFT_SWIGLU_ROWS=0        CUDA: the fused SwiGLU kernels as tiles of 64 tokens x 64 columns instead\n"
    "                             of blocks that stream bands of whole rows, and the gate|up adapter's dL/dB\n"
    "                             as its own product on the side stream (same values up to the sum order)\n"
    "  MOSFT_ATTENTION=gemm       CUDA: batched-GEMM attention instead of the flash kernels\n"
    "  MOSFT_FLASH_WGMMA=0        CUDA: the flash kernels on mma.sync (as on an A100) instead of Hopper's\n"
    "                             warpgroup products at head size 128 on an H100\n"
    "  MOSFT_PDL=0                CUDA: launch every kernel plainly, without Hopper's programmatic\n"
    "                             dependent launch (same results; ~0.8 ms slower a 3B step)\n"
    "  MOSFT_TEST_KILL_AT=P:S     tests only: kill the process at checkpoint point P of step S\n";

static int cmd_help(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "env")) {
        fputs(k_env, stdout);
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "config")) {
        char *doc = config_doc_markdown();
        printf("Config keys (JSON; override any with --set key=value):\n\n%s", doc);
        free(doc);
        return 0;
    }
    if (argc >= 2) {
        fprintf(stderr, "error: help: unknown topic \"%s\"\nhint: `mosft help config` lists every config key, `mosft help env` the environment variables; "
                        "`mosft <command> --help` explains one command\n", argv[1]);
        return 2;
    }
    fputs(k_usage, stdout);
    return 0;
}

typedef struct {
    const char *name;
    int (*fn)(int, char **);
} command;

static const command k_commands[] = {
    {"train", cmd_train},     {"export", cmd_export}, {"info", cmd_info},
    {"data", cmd_data},       {"eval", cmd_eval},     {"tokenize", cmd_tokenize},
    {"bench", cmd_bench},     {"version", cmd_version}, {"help", cmd_help},
};

int main(int argc, char **argv) {
    // OpenMP threads that spin between parallel regions steal the cores from the work when the machine
    // is shared; libgomp reads its policy once at load time, so set it and start over (once).
    if (!getenv("OMP_WAIT_POLICY")) {
        setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
        execv("/proc/self/exe", argv);  // on failure, carry on with the default policy
    }
    if (argc < 2) {
        fputs(k_usage, stderr);
        return 2;
    }
    const char *c = argv[1];
    if (!strcmp(c, "-h") || !strcmp(c, "--help")) return cmd_help(1, argv);
    if (!strcmp(c, "--version") || !strcmp(c, "-V")) return cmd_version(0, NULL);
    for (size_t i = 0; i < sizeof k_commands / sizeof k_commands[0]; i++)
        if (!strcmp(c, k_commands[i].name)) return k_commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "error: unknown command \"%s\"\nhint: run `mosft help` for the list of commands\n", c);
    return 2;
}
