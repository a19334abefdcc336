#!/usr/bin/env bash
# `make demo`: the main job on the bundled tiny model and data: MoS on stories260K (a real pretrained
# LLaMA, NF4 base) with 2k CodeAlpaca records, on CPU, then the export to a PEFT LoRA folder.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${DEMO_RUN_DIR:-runs/demo}
rm -rf "$run"
echo "== mosft train configs/demo.json --set output.dir=$run"
./build/mosft train configs/demo.json --set output.dir="$run"
echo
echo "== mosft export $run/adapter.mos -o $run/peft"
./build/mosft export "$run/adapter.mos" -o "$run/peft" --force
ls -l "$run/peft"
echo
# The held-out loss before and after training (metrics.jsonl has one JSON line per step and per eval).
first=$(grep -m1 eval_loss "$run/metrics.jsonl" | sed 's/.*"eval_loss": \([0-9.]*\).*/\1/')
last=$(grep eval_loss "$run/metrics.jsonl" | tail -1 | sed 's/.*"eval_loss": \([0-9.]*\).*/\1/')
echo "held-out loss: $first before training -> $last after (metrics: $run/metrics.jsonl)"
