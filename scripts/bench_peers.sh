#!/usr/bin/env bash
# Loss after N steps at an equal parameter budget: LoRA, MoS and every peer adapter, on the bundled demo
# (stories260K, CodeAlpaca 2k sample, configs/demo.json), CPU. Writes runs/bench_peers/<name>/ and
# prints a Markdown table (the "Peer adapters" section of docs/BENCHMARKS.md).
#
#   make && bash scripts/bench_peers.sh [STEPS]        # default 300, as configs/demo.json
#
# Every run uses the demo config as it is (seed, data order, lr, schedule, batch, dropout 0.05), only the
# adapter changes. The budget is LoRA r = 4 on the 7 linear types of stories260K: 4 * 5 * 1156 = 23,120
# trainable parameters; each peer takes its setting closest to it. "train loss" is the mean of the
# last 10 steps' losses (one step's loss is a noisy 8-example batch), "first" the mean of the first 10.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}
OUT=runs/bench_peers
MOSFT=./build/mosft
CFG=configs/demo.json
mkdir -p "$OUT"

# name | --set overrides (space-separated key=value)
RUNS=(
  "lora r4|adapter.method=lora adapter.r=4"
  "mos R_v4 r8 R_p1 l2|adapter.method=mos adapter.r=8 adapter.equiv_rank=4 adapter.private_rank=1 adapter.shards=2"
  "prolora r8 u0 m2 n2|adapter.method=prolora adapter.r=8 adapter.prolora_unshared_r=0 adapter.prolora_reduce_a=2 adapter.prolora_reduce_b=2"
  "vera r575|adapter.method=vera adapter.r=575"
  "vera r256|adapter.method=vera adapter.r=256"
  "tied_lora r17 vBuA|adapter.method=tied_lora adapter.r=17 adapter.tied_lora_trainable=vBuA"
  "sharelora A r7|adapter.method=sharelora adapter.r=7 adapter.sharelora_share=A"
  "sharelora B r7|adapter.method=sharelora adapter.r=7 adapter.sharelora_share=B"
  "sharelora AB r20|adapter.method=sharelora adapter.r=20 adapter.sharelora_share=AB"
  "sharelora qkv r7|adapter.method=sharelora adapter.r=7 adapter.sharelora_share=qkv"
  "sira E3 k2 r1|adapter.method=sira adapter.r=1 adapter.sira_experts=3 adapter.sira_top_k=2"
)

sets() {  # "a=1 b=2" -> --set a=1 --set b=2
  local out=()
  for kv in $1; do out+=(--set "$kv"); done
  printf '%s\n' "${out[@]}"
}

# The base model's held-out loss (every adapter starts at Delta W = 0).
base_eval=$("$MOSFT" eval "$CFG" 2>/dev/null | sed -n 's/.*"eval_loss": \([0-9.]*\).*/\1/p' | head -1)

echo "| adapter | trainable | first 10 steps | last 10 steps | eval loss (base ${base_eval:-?}) | s/step |"
echo "|---|---|---|---|---|---|"
for run in "${RUNS[@]}"; do
  name=${run%%|*}
  args=${run#*|}
  dir="$OUT/$(echo "$name" | tr ' ' '_')"
  mapfile -t S < <(sets "$args")
  params=$("$MOSFT" info "$CFG" "${S[@]}" | sed -n 's/^trainable *\([0-9,]*\) parameters.*/\1/p')
  rm -rf "$dir"
  if ! "$MOSFT" train "$CFG" "${S[@]}" --set output.dir="$dir" --set train.steps="$STEPS" \
       --set train.eval_every="$STEPS" > "$dir.log" 2>&1; then
    echo "| $name | $params | failed: see $dir.log | | | |"
    continue
  fi
  python3 - "$dir/metrics.jsonl" "$name" "$params" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tr = [r for r in rows if "loss" in r]
ev = [r for r in rows if "eval_loss" in r]
first = sum(r["loss"] for r in tr[:10]) / len(tr[:10])
last = sum(r["loss"] for r in tr[-10:]) / len(tr[-10:])
sps = sum(r["step_s"] for r in tr) / len(tr)
flag = "" if last < first else " (NOT decreasing)"
print(f"| {sys.argv[2]} | {sys.argv[3]} | {first:.4f} | {last:.4f}{flag} | {ev[-1]['eval_loss']:.4f} | {sps:.2f} |")
EOF
done
