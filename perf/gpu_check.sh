#!/usr/bin/env bash
# One-command GPU check for the H100 device machine (no network there, no nvidia-cutlass):
#   installs the carried wheels (.whl: nvidia-cutlass, liger-kernel), builds any kernel missing from the carried
#   cache (.fusedops_cache), runs the whole test suite (GPU tests included), compute-sanitizer on small cases,
#   the kernel benchmarks and the model comparison, and prints a short table last.
# Usage (device tool): carry [".fusedops_cache", ".whl"], command `bash perf/gpu_check.sh [--quick]`.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=${1:-}
OUT=${OUT:-perf/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FUSEDOPS_CACHE=${FUSEDOPS_CACHE:-$PWD/.fusedops_cache} PYTHONPATH=$PWD:${PYTHONPATH:-}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
summary=()
step() {  # step NAME LOGFILE COMMAND...: run, keep the log, remember pass/fail and duration
  local name=$1 log=$2; shift 2
  local t0=$(date +%s)
  "$@" >"$OUT/$log" 2>&1; local rc=$?
  summary+=("$(printf '| %-26s | %-4s | %5ss | %s |' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $(( $(date +%s) - t0 )) "$(tail -n 1 "$OUT/$log" | cut -c1-90)")")
  return $rc
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
step build        build.log   python3 -m fusedops build --arch sm_90a --jobs 16
step tests        tests.log   python3 -m pytest -q -p no:cacheprovider tests
if [ -f perf/sanitize.py ]; then
  step memcheck   memcheck.log  compute-sanitizer --tool memcheck --error-exitcode 1 python3 perf/sanitize.py
  step racecheck  racecheck.log compute-sanitizer --tool racecheck --error-exitcode 1 python3 perf/sanitize.py
fi
for b in perf/bench_*.py; do
  step "$(basename "$b" .py)" "$(basename "$b" .py).log" python3 "$b" $QUICK
done
if python3 -c "import fusedops.perf" 2>/dev/null; then
  step model-compare compare.log python3 -m fusedops.perf ${QUICK:+--quick}
fi
cat "$OUT"/bench_*.log 2>/dev/null | grep -E '^\|' > "$OUT/tables.md"
echo; echo "## gpu_check summary"; echo "| step | rc | time | last line |"; echo "|---|---|---|---|"
printf '%s\n' "${summary[@]}"
