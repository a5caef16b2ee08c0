#!/usr/bin/env bash
# One-command GPU check for the H100 device machine (no network there, no nvidia-cutlass):
#   installs the carried wheels (.whl: nvidia-cutlass, liger-kernel), builds any kernel missing from the carried
#   cache (.fusedops_cache), runs the whole test suite (GPU tests included), compute-sanitizer on small cases of
#   every op, the kernel benchmarks and the model comparison, and prints a short table last.
# Usage (device tool): carry [".fusedops_cache", ".whl"], command `bash perf/gpu_check.sh [PARTS...] [--quick]`
#   PARTS: any of tests gputests sanitize bench parity parity32 e2e diag ablate (default: tests sanitize bench e2e);
#   gputests runs only the tests marked gpu (the CPU ones run in CI); parity checks Mistral and Qwen2 (8 layers)
#   against fp32, parity32 Llama, Mistral and Qwen2 at full depth (issue 8's yardstick); diag runs the
#   second-compile check, ablate the 32-layer per-pattern parity ablation.
#   SETUP=0 skips the wheel install and the build (a second gpu_check running beside a first one).
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=""; PARTS=()
for a in "$@"; do [ "$a" = "--quick" ] && QUICK=--quick || PARTS+=("$a"); done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests sanitize bench e2e)
want() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }
OUT=${OUT:-perf/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FUSEDOPS_CACHE=${FUSEDOPS_CACHE:-$PWD/.fusedops_cache} PYTHONPATH=$PWD:$PWD/perf:${PYTHONPATH:-}
if [ "${SETUP:-1}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
# Register the torch_dynamo_backends entry point (backend="fusedops" without importing fusedops).
[ "${SETUP:-1}" = 1 ] && { python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || echo "note: editable install failed; backend='fusedops' works only after 'import fusedops'"; }
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
summary=()
step() {  # step NAME LOGFILE COMMAND...: run, keep the log, remember pass/fail and duration
  local name=$1 log=$2; shift 2
  local t0=$(date +%s)
  "$@" >"$OUT/$log" 2>&1; local rc=$?
  summary+=("$(printf '| %-18s | %-4s | %4ss | %s |' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $(( $(date +%s) - t0 )) "$(grep -v '^\s*$' "$OUT/$log" | tail -n 1 | cut -c1-100)")")
  return $rc
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
[ "${SETUP:-1}" = 1 ] && step build build.log python3 -m fusedops build --arch sm_90a --jobs 16
if want tests; then
  step tests tests.log python3 -m pytest -q -p no:cacheprovider tests
fi
if want gputests; then
  step gpu_tests gpu_tests.log python3 -m pytest -q -p no:cacheprovider -m gpu tests
fi
if want sanitize; then
  san="compute-sanitizer --report-api-errors no --error-exitcode 1"
  step memcheck memcheck.log $san --tool memcheck python3 perf/sanitize.py
  step racecheck racecheck.log $san --tool racecheck python3 perf/sanitize.py
fi
if want bench; then
  step bench_kernels bench_kernels.log python3 perf/bench_kernels.py $QUICK
fi
if want parity; then
  for preset in mistral-7b qwen2-7b; do
    step "parity_$preset" "parity_$preset.log" python3 -m fusedops.perf --preset "$preset" --layers 8 --parity-only \
      --out "$OUT"
  done
fi
if want parity32; then
  for preset in llama3-8b mistral-7b qwen2-7b; do
    step "parity32_$preset" "parity32_$preset.log" python3 -m fusedops.perf --preset "$preset" --parity-only --out "$OUT"
  done
fi
if want diag; then
  step second_compile second_compile.log env FUSEDOPS_LOG=1 python3 perf/diag_second_compile.py
fi
if want ablate; then
  step ablate_32L ablate_32L.log python3 perf/ablate_parity.py --preset llama3-8b --layers 32 --prompts 2
fi
if want e2e; then
  step run_stage run_stage.log python3 perf/bench_run_stage.py
  step model_compare compare.log python3 -m fusedops.perf ${QUICK}
fi
echo; echo "## gpu_check summary ($(date -u +%F' '%H:%M) UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "| step | rc | time | last line |"; echo "|---|---|---|---|"
printf '%s\n' "${summary[@]}"
