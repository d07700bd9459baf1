#!/usr/bin/env bash
# The one GPU check, for the H100/H200 lent now and then (15 minutes of device time per session, no
# network, no polars/duckdb/datasets/POT/flash-attn). Within 4 minutes; every step has its own timeout
# and writes into OUTDIR as it goes, so a cut-off run still leaves what it measured:
#   OUTDIR/steps.txt        one line per step, each ending rc=N (and the sizes, first)
#   OUTDIR/env.txt          preflight (<= 10 s): python, packages, winnow, `kernels`, POT, C compiler,
#                           Python.h, the GPU, one tiny Triton launch
#   OUTDIR/install.log      $PY -m pip install --no-deps --no-build-isolation -e .  (no network needed)
#   OUTDIR/gpu_tests.log    pytest -m gpu tests/kernels, at most 40 s (+ OUTDIR/gpu_tests.xml)
#   OUTDIR/gpu_check.json   benchmarks/gpu_check.py: one process per section, each path recorded as it
#                           finishes (reference and materialized before Triton); see that script
#   OUTDIR/gpu_check.log    its printed table
# Exit status of the measurements: 0 when only Triton paths failed (the references still stand).
# The CPU suite's kernel tests are not rerun natively here (they cost minutes): the self-check section
# runs every kernel against its reference on the GPU instead.
# Usage: benchmarks/gpu_check.sh OUTDIR              on the GPU machine, from the repository root
#        benchmarks/gpu_check.sh OUTDIR --cpu-smoke  anywhere: the same steps at toy sizes on the CPU
#                                                    (no install; Triton under the interpreter)
# WINNOW_GPU_CHECK_FAULT=triton makes every Triton launch raise (the fault-injection run).
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--cpu-smoke]}
SMOKE=${2:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
start=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/steps.txt"; }
PY=$(command -v python3 || command -v python)
# -P: never the checkout root on sys.path (its kernels/ would shadow the `kernels` package transformers imports)
log "sizes: $($PY -P -c 'import sys; sys.path.insert(0, "benchmarks"); import gpu_check as g; print(g.sizes_line(g.SMOKE if "--cpu-smoke" in sys.argv else g.FULL))' $SMOKE 2>&1 | tail -1) rc=0"

if [ "$SMOKE" != "--cpu-smoke" ]; then
  timeout 60 $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
  log "install rc=$?"
fi

timeout 15 $PY -P benchmarks/gpu_check.py "$OUT" --preflight $SMOKE > "$OUT/preflight.log" 2>&1
rc=$?
log "preflight ($(grep -E '^(gpu|triton launch):' "$OUT/env.txt" | tr '\n' ' ')) rc=$rc"

# tests/kernels only: other test folders import polars/duckdb, which the GPU machine lacks
timeout 40 $PY -P -m pytest -q -p no:cacheprovider -m gpu tests/kernels -o addopts="--import-mode=importlib" \
  --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
rc=$?
[ "$rc" -eq 5 ] && rc=0  # no test collected (a CPU smoke deselects them all) is not a failure
log "gpu tests ($(tail -1 "$OUT/gpu_tests.log")) rc=$rc"

budget=$(( 232 - ($(date +%s) - start) ))
[ "$budget" -lt 30 ] && budget=30
timeout $(( budget + 15 )) $PY -P benchmarks/gpu_check.py "$OUT" --budget "$budget" $SMOKE > "$OUT/gpu_check.log" 2>&1
rc=$?
log "measurements (budget ${budget}s; results in $OUT/gpu_check.json) rc=$rc"
log "done in $(( $(date +%s) - start ))s rc=0"
