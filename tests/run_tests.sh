#!/usr/bin/env bash
# Runs every test program given, prints one summary line each, exits 1 if any failed.
set -u
fail=0; total=0; failed=()
export CK_DEFAULT_TIMEOUT=${CK_DEFAULT_TIMEOUT:-600}
# OpenMP threads must not spin between regions: tests share the cores with each other and the build.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
for t in "$@"; do
  total=$((total+1))
  start=$EPOCHREALTIME
  if out=$("$t" 2>&1); then
    status=ok
  else
    status=FAIL; fail=$((fail+1)); failed+=("$t")
  fi
  secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN{print b-a}')
  summary=$(printf '%s\n' "$out" | grep -E '^[0-9]+%: Checks' | tail -1)
  skipped=$(printf '%s\n' "$out" | grep -c '^SKIPPED' || true)
  [ "$skipped" -gt 0 ] && summary="$summary [$skipped SKIPPED: $(printf '%s\n' "$out" | grep -m1 '^SKIPPED' | sed 's/^SKIPPED [^:]*: //')]"
  name=${t#*/}; name=${name#tests/}  # build/tests/test_x -> test_x, build/asan/emu/test_y -> asan/emu/test_y
  printf '%-4s %-40s %s (%.1fs)\n' "$status" "$name" "$summary" "$secs"
  if [ "$status" = FAIL ] || [ -n "${VERBOSE:-}" ]; then printf '%s\n' "$out" | sed 's/^/    /' | tail -60; fi
done
echo "== $((total-fail))/$total test programs passed"
[ $fail -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
