#!/usr/bin/env bash
# gpu_check.sh: the CUDA backend's checks and benchmarks on a GPU machine, in one go (the device time
# is scarce). Run from a folder holding build/ (built elsewhere), tests/fixtures/stories260K, scripts/
# and shared/ (copies of ../shared/data/nf4 and reference).
#   scripts/gpu_check.sh [tests] [sanitize] [hf] [train] [bench] [peer] [benchall] [peerall] [profile]
#                        [probes] [kernels]
set -u
# Logs go to a scratch folder; $OUT receives only logs.tgz, bench.jsonl and summary.txt (a device
# call returns at most 8 files).
FINAL=${OUT:-gpu_logs}; OUT=$(mktemp -d); mkdir -p "$FINAL"
export LD_LIBRARY_PATH=$PWD/build/lib:${LD_LIBRARY_PATH:-}
export MOSFT_SHARED_DATA=${MOSFT_SHARED_DATA:-$PWD/shared} OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
want() { for w in "${SEL[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }
SEL=("$@"); [ ${#SEL[@]} -eq 0 ] && SEL=(tests sanitize hf bench)
summary=()
note() { summary+=("$1"); echo "== $1"; }
run() {  # name timeout cmd...
  local name=$1 to=$2; shift 2
  local t0=$SECONDS
  timeout "$to" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  note "$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS-t0))" "$(grep -E '^[0-9]+%: Checks' "$OUT/$name.log" | tail -1)")"
  return $rc
}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if want tests; then
  run test_kernels 240 build/tests/gpu/test_kernels
  run test_step 400 build/tests/gpu/test_step
fi
if want hf; then
  run ref_gpu_step 180 python3 scripts/ref_gpu_step.py hfref --device cuda --stories tests/fixtures/stories260K --stories-ref shared/reference/stories260K_lora_ref.safetensors
  MOSFT_HF_REF=hfref run test_hf_ref 120 build/tests/gpu/test_hf_ref
fi
if want sanitize_step; then
  CK_FORK=no MOSFT_TEST_QUICK=1 run memcheck_step 400 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 build/tests/gpu/test_step
fi
if want sanitize; then
  CK_FORK=no run memcheck_kernels 300 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 build/tests/gpu/test_kernels
  CK_FORK=no MOSFT_TEST_QUICK=1 run memcheck_step 400 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 build/tests/gpu/test_step
fi
B=(build/mosft bench --steps ${BENCH_STEPS:-6} --warmup 2)
if want bench; then
  run bench_7b_mos_none 180 "${B[@]}" --model llama2-7b --adapter mos --recompute none
  run bench_7b_mos_full 180 "${B[@]}" --model llama2-7b --adapter mos --recompute full
  run bench_3b_mos_none 180 "${B[@]}" --model llama3.2-3b --adapter mos --recompute none
fi
if want profile; then
  for m in ${PROF_MODELS:-llama2-7b llama3.2-3b}; do for r in none full; do
    MOSFT_PROFILE=1 run "prof_${m}_mos_${r}" 240 "${B[@]}" --model $m --adapter mos --recompute $r
  done; done
fi
if want benchall; then
  for m in llama2-7b llama3.2-3b llama2-13b; do for a in mos lora; do for r in none full; do
    run "bench_${m}_${a}_${r}" 240 "${B[@]}" --model $m --adapter $a --recompute $r
  done; done; done
  run bench_llama2-7b_mos_partial 240 "${B[@]}" --model llama2-7b --adapter mos --recompute partial
  run bench_llama2-7b_mos_none_bf16 240 "${B[@]}" --model llama2-7b --adapter mos --recompute none --quantization none
  for m in llama2-7b llama3.2-3b; do for r in none full; do  # model.keep_dequantized: faster, more memory
    run "bench_${m}_mos_${r}_kept" 240 "${B[@]}" --model $m --adapter mos --recompute $r --keep-dequantized
  done; done
  for m in llama2-7b llama3.2-3b; do for r in none full; do  # the paper's configs train with dropout 0.1
    run "bench_${m}_mos_${r}_dropout" 240 "${B[@]}" --model $m --adapter mos --recompute $r --dropout 0.1
  done; done
  for m in llama2-7b llama3.2-3b; do for f in 0.6 0.03; do  # chat data: a loss on the answer alone
    run "bench_${m}_mos_none_sup$f" 240 "${B[@]}" --model $m --adapter mos --recompute none --supervised $f
  done; done
fi
if want probes; then  # the standalone timing probes (docs/CUDA.md)
  run probe_flash 120 build/tests/gpu/bench_flash 20
  BENCH_GEMM_SUSTAINED=1 BENCH_GEMM_DATA=nf4 run probe_gemm_sustained 300 build/tests/gpu/bench_gemm 30
  run probe_overlap 120 build/tests/gpu/bench_overlap 100 4
  cat "$OUT"/probe_*.log
fi
if want kernels; then  # per-kernel times of one step of a 6-layer model at 7B shapes (ncu), without and with dropout
  L6=$(mktemp -d)
  cat > "$L6/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
 "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 6, "vocab_size": 32000,
 "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false,
 "torch_dtype": "bfloat16", "hidden_act": "silu"}
JSON
  for dr in 0 0.1; do
    # step 3: the GEMM algorithm choice times its candidates at a product's second run (step 2)
    MOSFT_CUDA_PROFILE_STEP=3 timeout 300 ncu --profile-from-start off --clock-control none \
      --metrics gpu__time_duration.sum --csv build/mosft bench --model "$L6" --adapter mos --steps 2 --warmup 1 \
      --dropout $dr > "$OUT/ncu_l6_dropout$dr.csv" 2>"$OUT/ncu_l6_dropout$dr.err"
    note "ncu 6-layer 7B dropout $dr: rc=$?"
    python3 scripts/ncu_by_kernel.py "$OUT/ncu_l6_dropout$dr.csv" 25 | tee "$OUT/kernels_dropout$dr.log"
  done
fi
if want peer; then run peer_7b 300 python3 scripts/bench_peer_hf.py --models llama2-7b --ckpt 1 --steps 3 --warmup 1; fi
if want peerall; then run peer_all 900 python3 scripts/bench_peer_hf.py --steps 4 --warmup 1; fi
if want train; then  # `mosft train` on the GPU: the demo, exact resume, export checked by PEFT
  T=$(mktemp -d)
  D=(build/mosft train configs/demo.json --set device=cuda --set train.steps=60 --set output.save_every=30 -q)
  run train_straight 300 "${D[@]}" --set output.dir=$T/straight
  run train_stop 300 "${D[@]}" --set output.dir=$T/resumed --stop-after 30
  run train_resume 300 build/mosft train --resume $T/resumed -q
  if cmp -s $T/straight/adapter.mos $T/resumed/adapter.mos && \
     diff <(grep -o '"loss": [0-9.e+-]*' $T/straight/metrics.jsonl) <(grep -o '"loss": [0-9.e+-]*' $T/resumed/metrics.jsonl) >/dev/null
  then note "resume on cuda: identical losses and byte-identical adapter.mos"
  else note "resume on cuda: DIFFERENT"; fi
  run train_kept 300 "${D[@]}" --set output.dir=$T/kept --set model.keep_dequantized=true
  if cmp -s $T/straight/adapter.mos $T/kept/adapter.mos; then note "model.keep_dequantized: byte-identical adapter.mos"
  else note "model.keep_dequantized: DIFFERENT adapter.mos"; fi
  run train_demo_cuda 600 build/mosft train configs/demo.json --set device=cuda --set output.dir=$T/demo
  cp $T/demo/metrics.jsonl "$FINAL/demo_cuda_metrics.jsonl" 2>/dev/null
  run export_peft_check 300 python3 scripts/check_peft_export.py $T/demo/adapter.mos --model tests/fixtures/stories260K
fi
echo; echo "==== summary"; printf '%s\n' "${summary[@]}"
for f in "$OUT"/prof_*.log; do [ -f "$f" ] && { echo "-- $f"; grep -A12 "^profile" "$f"; }; done
grep -h '"bench"' "$OUT"/bench_*.log "$OUT"/peer*.log 2>/dev/null | tee "$OUT/bench.jsonl" | sed 's/, "device.*//' | cut -c1-400
grep -hE "^bench |^llama|^model " "$OUT"/bench_*.log "$OUT"/peer*.log 2>/dev/null
printf '%s\n' "${summary[@]}" > "$FINAL/summary.txt"
cp "$OUT/bench.jsonl" "$FINAL/" 2>/dev/null
tar -C "$OUT" -czf "$FINAL/logs.tgz" . 2>/dev/null
