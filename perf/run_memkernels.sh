#!/bin/bash
# Issue 7's GPU check in one command: GPU tests, memcheck/racecheck on the small cases, then the
# benchmarks, most needed first (each under its own time limit). Everything ends up in ONE file,
# $OUT/memkernels_run.log: the device tool returns only a few files from $OUT (run 3 lost softmax's table).
# Run from the repo root with the cubins prebuilt in .fusedops_cache and the wheels in .whl.
set -u
OUT=${OUT:-perf/out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export FUSEDOPS_CACHE=.fusedops_cache PYTHONPATH=/tmp/site:.:perf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    > "$LOGS/pip.log" 2>&1
{ nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader; date -u; } > "$LOGS/0_device.txt"
TESTS="tests/test_rmsnorm.py tests/test_add_rmsnorm.py tests/test_rope.py tests/test_silu_mul.py
       tests/test_layernorm.py tests/test_softmax.py"
SANITIZE="compute-sanitizer --report-api-errors no --print-limit 20"
(
    $SANITIZE --tool memcheck python3 -m pytest -q -p no:cacheprovider $TESTS -k sanitizer > "$LOGS/memcheck.log" 2>&1
    $SANITIZE --tool racecheck python3 -m pytest -q -p no:cacheprovider tests/test_rmsnorm.py \
        tests/test_add_rmsnorm.py tests/test_layernorm.py -k sanitizer > "$LOGS/racecheck.log" 2>&1
) &
python3 -m pytest -q -p no:cacheprovider -m gpu $TESTS > "$LOGS/tests.log" 2>&1
wait
for bench in rmsnorm:75 add_rmsnorm:60 rope:60 silu_mul:60 layernorm:55 softmax:55; do
    timeout "${bench#*:}" python3 "perf/bench_${bench%:*}.py" > "$LOGS/bench_${bench%:*}.log" 2>&1
    echo "bench ${bench%:*}: exit $?" >> "$LOGS/0_device.txt"
done
for f in "$LOGS"/*; do echo "=== $(basename "$f")"; cat "$f"; done > "$OUT/memkernels_run.log"
cat "$LOGS/0_device.txt"
tail -n 3 "$LOGS/tests.log" "$LOGS/memcheck.log" "$LOGS/racecheck.log"
