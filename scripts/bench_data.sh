#!/usr/bin/env bash
# Data pipeline benchmark (docs/BENCHMARKS.md, "Data pipeline"): records -> padded micro-batches on
# one core with the Llama 3 tokenizer on CodeAlpaca. Builds scripts/bench_data.c against the library.
#
#   bash scripts/bench_data.sh [SHARED_DATA_DIR] [MIN_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/data}
secs=${2:-5}
make -s -j2 build/libmosft.a
mkdir -p build/scripts
cc -std=c11 -D_GNU_SOURCE -O2 -march=x86-64-v2 -I. -pthread -o build/scripts/bench_data scripts/bench_data.c \
   build/libmosft.a -lcjson -lcurl -lz -lm
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//') (pinned to one core)"
for tok in llama3 llama2; do
  eos=$([ $tok = llama3 ] && echo '<|end_of_text|>' || echo '</s>')
  echo "== $tok, CodeAlpaca 2k (code_alpaca_2k.json)"
  taskset -c 0 build/scripts/bench_data "$shared/tokenizers/$tok/tokenizer.json" \
      "$shared/datasets/codealpaca/code_alpaca_2k.json" codealpaca "$eos" "$secs"
done
echo "== llama3, Flan v2 CoT fixture (tests/fixtures/data/flan_v2_cot.jsonl)"
taskset -c 0 build/scripts/bench_data "$shared/tokenizers/llama3/tokenizer.json" \
    tests/fixtures/data/flan_v2_cot.jsonl flan_v2 '<|end_of_text|>' "$secs"
