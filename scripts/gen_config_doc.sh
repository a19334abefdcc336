#!/usr/bin/env bash
# Regenerates docs/CONFIG.md from the schema table in core/config.c (the single source of truth).
# tests/test_docs.c fails when the committed doc is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build/mosft}
out=${2:-docs/CONFIG.md}
{
cat <<'HDR'
# mosft configuration

A run is described by one JSON file (`mosft train config.json`). Every key has a default; the defaults
are the MoS paper's recipe (LLaMA + NF4 QLoRA base, alpha 16, dropout 0.1, lr 2e-4, batch 16 x 512,
clip 0.3, linear schedule with 3% warmup, AdamW 0.9/0.999/1e-8, no weight decay, 10,000 steps).

- Override any key on the command line: `--set train.lr=1e-4`, `--set adapter.targets=q,v`,
  `--set data.sources[0].path=/data/flan.jsonl`, `--set model.path=/models/Llama-2-7b-hf` (values are
  parsed as JSON when they parse, else taken as strings).
- Unknown keys are errors, with a suggestion (`train.lrr: unknown key (did you mean "train.lr"?)`);
  HF/PEFT names such as `learning_rate` or `lora_alpha` point to ours. Keys starting with `_` are comments.
- Wrong types and out-of-range values name the file and the JSON path:
  `error: config.json: train.lr: expected a number > 0, got "fast"` (exit code 2).
- Relative paths are taken relative to the current directory.
- The resolved configuration (defaults filled, overrides applied) is saved as `config.json` in the run
  directory; `mosft train --dry-run` prints it.
- Ready configs for the paper's runs are in `configs/` (`llama2-7b-*`, `llama2-13b-*` on superni,
  flan_v2, cot, codealpaca; `llama3.2-3b-superni`) and the bundled demo (`configs/demo.json`).

HDR
"$bin" help config | tail -n +3
} > "$out"
