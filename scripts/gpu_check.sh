#!/usr/bin/env bash
# The GPU check, unattended and offline: build pyfast's CUDA kernels for this machine's GPU, run
# every op test on CUDA, a compute-sanitizer memcheck and racecheck pass over the CUDA op tests,
# and the op benchmarks; leave logs, a summary table and the benchmark numbers under $OUT.
#
#   OUT=/tmp/gpu scripts/gpu_check.sh [STEP...]      (default: all)
#
# Steps: build, test, memcheck, racecheck, bench-box, bench-mask, bench-pack; `sanitize` is
# memcheck + racecheck, `bench` the three benchmarks, `all` everything in that order. Each step
# runs on its own (all but build need a finished build) and is stopped, as a failure, after
# STEP_TIMEOUT seconds (default 570). $OUT gets summary.md (the table, refreshed after every
# step), build.log, test.log, sanitize.log, bench.log and bench.json.
#
# Needs, in the current Python environment: torch with CUDA, pybind11, scikit-build-core, cmake,
# ninja, pytest, pytest-benchmark; nvcc and compute-sanitizer (from the CUDA toolkit) on PATH or in
# $CUDA_HOME/bin. Not needed: pycocotools or a network (the build uses the installed tools).
# PYFAST_CUDA_ARCHS overrides the architecture read from nvidia-smi (e.g. "90-real").
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT=$(mkdir -p "${OUT:-gpu_results}" && cd "${OUT:-gpu_results}" && pwd)
STEP_TIMEOUT=${STEP_TIMEOUT:-570}
CUDA_BIN=${CUDA_HOME:-/usr/local/cuda}/bin
export PATH="$PATH:$CUDA_BIN"
export PYTHONUNBUFFERED=1
PYTHON=$(command -v python3 || command -v python)
# The tests import the installed package: pytest's own script, run from the repository, puts the
# test folders on sys.path but not the source tree (which has no built module).
PYTEST=$(command -v pytest || true)
# The CUDA op tests, under the sanitizers: the device-parametrized ones on CUDA and test_cuda.py,
# without the multi-GB cases and the torch-only machinery (compile, opcheck, gradcheck).
SANITIZE_TESTS="cuda and not huge and not compile and not opcheck and not gradcheck"

say() { printf 'gpu_check: %s\n' "$*" >&2; }

# record STEP STATUS SECONDS NOTE: one row of the summary (a rerun replaces the step's row).
record() {
  local rows="$OUT/steps.tsv" note=${4//$'\n'/ }
  touch "$rows"
  grep -v "^$1"$'\t' "$rows" >"$rows.tmp" || true
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${note//|//}" >>"$rows.tmp"
  mv "$rows.tmp" "$rows"
  write_summary
}

# fail STEP START LOG MESSAGE: record the failure, show the log's tail, stop with status 1.
fail() {
  local step=$1 start=$2 log=$3
  shift 3
  record "$step" FAILED "$((SECONDS - start))" "$*"
  say "$step FAILED: $*"
  if [ -n "$log" ] && [ -f "$log" ]; then
    say "last lines of $log:"
    tail -n 30 "$log" >&2
  fi
  exit 1
}

# limited LOG CMD...: CMD with its output appended to LOG, stopped after STEP_TIMEOUT seconds.
# Returns CMD's status, 124 when it ran out of time.
limited() {
  local log=$1
  shift
  printf '\n$ %s\n' "$*" >>"$log"
  timeout --foreground "$STEP_TIMEOUT" "$@" >>"$log" 2>&1
}

require() {
  command -v "$1" >/dev/null 2>&1 || fail "$STEP" "$START" "" "$1 not found: $2"
}

device_archs() {
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader | tr -d ' .' | sort -u | sed 's/$/-real/' | paste -sd';'
}

# Stops the step unless the installed pyfast has CUDA kernels that run on this machine.
require_cuda_build() {
  local reason
  reason=$(cd /tmp && "$PYTHON" -c "
import pyfast._native as n
print(n.unavailable_reason('cuda') or '')" 2>&1) ||
    fail "$STEP" "$START" "" "pyfast does not import ($(tail -n 1 <<<"$reason")); run: scripts/gpu_check.sh build"
  [ -z "$reason" ] || fail "$STEP" "$START" "" "pyfast has no usable CUDA kernels: $reason (run: scripts/gpu_check.sh build)"
}

write_summary() {
  {
    echo "# pyfast GPU check"
    echo
    local gpu
    gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null |
      head -1) || gpu="no GPU"
    echo "$(date -u '+%Y-%m-%d %H:%M UTC') · GPU: $gpu"
    echo
    (cd /tmp && "$PYTHON" -c 'import torch, pyfast._native as n
print(f"torch {torch.__version__}; pyfast._C CUDA archs: {chr(44).join(n.cuda_archs()) or chr(45)}")' 2>/dev/null) ||
      echo "pyfast is not installed"
    echo
    echo "| step | result | seconds | notes |"
    echo "|---|---|---:|---|"
    [ -f "$OUT/steps.tsv" ] && awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$OUT/steps.tsv"
    if [ -f "$OUT/bench.json" ]; then
      echo
      "$PYTHON" - "$OUT/bench.json" <<'TABLE'
import json, sys

table = json.load(open(sys.argv[1]))
print(f"Benchmarks on {table.get('device')} (medians; ratios are eager or compile time over fused time):")
print()
print("| op | case | phase | fused ms | eager ms | compile ms | vs eager | vs compile | fused GB/s |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for r in table["rows"]:
    ms = lambda key: f"{r[key] * 1e3:.3f}" if key in r else "-"
    ratio = lambda key: f"{r[key] / r['fused_s']:.2f}x" if key in r and "fused_s" in r else "-"
    gbps = f"{r['fused_gbps']:.1f}" if "fused_gbps" in r else "-"
    print(f"| {r['op']} | {r['case']} | {r['phase']} | {ms('fused_s')} | {ms('eager_s')} | {ms('compile_s')} "
          f"| {ratio('eager_s')} | {ratio('compile_s')} | {gbps} |")
TABLE
    fi
  } >"$OUT/summary.md"
}

step_build() {
  require nvidia-smi "this step needs an NVIDIA GPU and its driver"
  require nvcc "this step needs the CUDA toolkit (nvcc) on PATH or in \$CUDA_HOME/bin"
  local archs=${PYFAST_CUDA_ARCHS:-$(device_archs)}
  [ -n "$archs" ] || fail build "$START" "" "nvidia-smi reported no GPU"
  local log="$OUT/build.log"
  : >"$log"
  say "building for CUDA architectures $archs (log: $log)"
  # PYFAST_CUDA=ON: a missing or broken nvcc is an error, not a quiet CPU-only build.
  PYFAST_CUDA=ON PYFAST_CUDA_ARCHS="$archs" limited "$log" "$PYTHON" -m pip install --no-build-isolation \
    --no-deps --verbose "$REPO"
  local status=$?
  [ "$status" -eq 124 ] && fail build "$START" "$log" "timed out after ${STEP_TIMEOUT}s"
  [ "$status" -eq 0 ] || fail build "$START" "$log" "pip install with PYFAST_CUDA=ON failed"
  (cd /tmp && "$PYTHON" -m pyfast.info) >>"$log" 2>&1
  require_cuda_build
  record build ok "$((SECONDS - START))" "CUDA archs $archs"
}

step_test() {
  require_cuda_build
  [ -n "$PYTEST" ] || fail test "$START" "" "pytest not found"
  local log="$OUT/test.log"
  : >"$log"
  PYFAST_TEST_DEVICES=cuda limited "$log" "$PYTEST" tests/ops tests/cache -q -rs -p no:cacheprovider
  local status=$?
  local counts
  counts=$(grep -E '[0-9]+ (passed|failed)' "$log" | tail -1 | tr -d '=')
  [ "$status" -eq 124 ] && fail test "$START" "$log" "timed out after ${STEP_TIMEOUT}s"
  [ "$status" -eq 0 ] || fail test "$START" "$log" "op tests on CUDA failed: $counts"
  record test ok "$((SECONDS - START))" "$counts"
}

sanitize() {
  local tool=$1
  require_cuda_build
  require compute-sanitizer "this step needs compute-sanitizer (CUDA toolkit) on PATH or in \$CUDA_HOME/bin"
  local log="$OUT/sanitize.log"
  local help options=(--tool "$tool" --error-exitcode 99)
  help=$(compute-sanitizer --help 2>&1)
  # Only pyfast's kernels are instrumented: torch's would take hours and are not ours to check.
  if grep -q -- '--kernel-name ' <<<"$help"; then
    options+=(--kernel-name kns=pyfast)
  elif grep -q -- '--kernel-regex' <<<"$help"; then
    options+=(--kernel-regex kns=pyfast)
  fi
  # CUDA API errors that torch provokes and handles itself are not findings.
  if grep -q -- '--report-api-errors' <<<"$help"; then
    options+=(--report-api-errors no)
  fi
  PYFAST_TEST_DEVICES=cuda limited "$log" compute-sanitizer "${options[@]}" \
    "$PYTEST" tests/ops -q -p no:cacheprovider -k "$SANITIZE_TESTS"
  local status=$?
  local summary
  summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)
  [ "$status" -eq 124 ] && fail "$tool" "$START" "$log" "timed out after ${STEP_TIMEOUT}s"
  [ "$status" -eq 99 ] && fail "$tool" "$START" "$log" "compute-sanitizer found errors: $summary"
  [ "$status" -eq 0 ] || fail "$tool" "$START" "$log" "the tests failed under compute-sanitizer (status $status)"
  record "$tool" ok "$((SECONDS - START))" "${summary:-no errors}"
}

bench() {
  local name=$1
  require_cuda_build
  local log="$OUT/bench.log" part="$OUT/bench-$name.json"
  rm -f "$part"
  PYFAST_BENCH_JSON="$part" limited "$log" "$PYTEST" "benchmarks/bench_$name.py" --benchmark-only -q \
    -p no:cacheprovider --benchmark-columns=median,iqr,rounds
  local status=$?
  [ "$status" -eq 124 ] && fail "bench-$name" "$START" "$log" "timed out after ${STEP_TIMEOUT}s"
  [ "$status" -eq 0 ] || fail "bench-$name" "$START" "$log" "benchmarks/bench_$name.py failed"
  [ -f "$part" ] || fail "bench-$name" "$START" "$log" "benchmarks/bench_$name.py measured nothing"
  # Fold this file's rows into bench.json (one file for every benchmark run so far).
  local rows
  rows=$("$PYTHON" - "$OUT/bench.json" "$part" <<'MERGE'
import json, os, sys

merged_path, part_path = sys.argv[1:]
part = json.load(open(part_path))
merged = json.load(open(merged_path)) if os.path.exists(merged_path) else {**part, "rows": []}
ops = {r["op"] for r in part["rows"]}
merged["rows"] = [r for r in merged["rows"] if r["op"] not in ops] + part["rows"]
json.dump(merged, open(merged_path, "w"), indent=1)
os.remove(part_path)
print(len(part["rows"]))
MERGE
  )
  record "bench-$name" ok "$((SECONDS - START))" "$rows results in bench.json"
}

run_step() {
  STEP=$1
  START=$SECONDS
  say "step $STEP"
  case "$STEP" in
    build) step_build ;;
    test) step_test ;;
    memcheck | racecheck) sanitize "$STEP" ;;
    bench-box) bench box_loss ;;
    bench-mask) bench mask_loss ;;
    bench-pack) bench pack ;;
  esac
}

steps=()
for arg in "${@:-all}"; do
  case "$arg" in
    build | test | memcheck | racecheck | bench-box | bench-mask | bench-pack) steps+=("$arg") ;;
    sanitize) steps+=(memcheck racecheck) ;;
    bench) steps+=(bench-box bench-mask bench-pack) ;;
    all) steps+=(build test memcheck racecheck bench-box bench-mask bench-pack) ;;
    *)
      say "unknown step '$arg'; steps: build test memcheck racecheck sanitize bench-box bench-mask bench-pack bench all"
      exit 2
      ;;
  esac
done

for step in "${steps[@]}"; do
  run_step "$step"
done
say "done: $OUT/summary.md"
cat "$OUT/summary.md"
