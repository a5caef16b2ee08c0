#!/bin/bash
# Issue 7's GPU check in one command: GPU tests, memcheck/racecheck on the small cases, then the
# benchmarks, most needed first (each under its own time limit). Logs and tables go to $OUT.
# Run from the repo root with the cubins prebuilt in .fusedops_cache and the wheels in .whl.
set -u
OUT=${OUT:-perf/out}
mkdir -p "$OUT"
export FUSEDOPS_CACHE=.fusedops_cache PYTHONPATH=/tmp/site:.:perf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1
{ nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader; git log --oneline -1; date -u; } > "$OUT/device.txt"
TESTS="tests/test_rmsnorm.py tests/test_add_rmsnorm.py tests/test_rope.py tests/test_silu_mul.py
       tests/test_layernorm.py tests/test_softmax.py"
SANITIZE="compute-sanitizer --report-api-errors no --print-limit 20"
(
    $SANITIZE --tool memcheck python3 -m pytest -q -p no:cacheprovider $TESTS -k sanitizer > "$OUT/memcheck.log" 2>&1
    $SANITIZE --tool racecheck python3 -m pytest -q -p no:cacheprovider tests/test_rmsnorm.py \
        tests/test_add_rmsnorm.py tests/test_layernorm.py -k sanitizer > "$OUT/racecheck.log" 2>&1
) &
python3 -m pytest -q -p no:cacheprovider -m gpu $TESTS > "$OUT/tests.log" 2>&1
wait
for bench in rmsnorm:75 add_rmsnorm:60 rope:60 silu_mul:60 layernorm:55 softmax:55; do
    timeout "${bench#*:}" python3 "perf/bench_${bench%:*}.py" > "$OUT/bench_${bench%:*}.log" 2>&1
    echo "bench ${bench%:*}: exit $?" >> "$OUT/device.txt"
done
cp perf/out/*.md "$OUT/" 2>/dev/null
cat "$OUT/device.txt"
tail -n 3 "$OUT/tests.log" "$OUT/memcheck.log" "$OUT/racecheck.log"
