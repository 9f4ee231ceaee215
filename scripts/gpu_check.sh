#!/usr/bin/env bash
# On a GPU machine: build pyfast with CUDA, run the CUDA tests and the op benchmarks, and leave
# logs plus a JSON of the benchmark table under $OUT (default ./gpu_results).
#   OUT=/tmp/gpu bash scripts/gpu_check.sh [pytest -k expression for the benchmarks]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
pip install --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
# Plain `pytest` (not `python -m pytest`) so the installed package, with its kernels, is imported
# rather than the source tree.
(cd /tmp && python -m pyfast.info) | tee "$OUT/info.txt"

pytest tests/ops tests/cache -q -x -p no:cacheprovider --rootdir=. 2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

bench_filter=${1:-}
PYFAST_BENCH_JSON="$OUT/bench.json" pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  ${bench_filter:+-k "$bench_filter"} --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench.log" \
  | sed -n '/pyfast: fused vs eager/,/^-\{20\}/p'
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
