#!/usr/bin/env bash
# The one GPU check, for an H100 or H200 machine without network, polars, duckdb, datasets or flash-attn.
# Finishes within 4 minutes; every step has its own timeout and
# writes into OUTDIR as it goes, so a cut-off run still leaves what it measured:
#   OUTDIR/env.txt          GPU, driver, python/torch/triton/cupy/transformers versions
#   OUTDIR/install.log      pip install --no-deps --no-build-isolation -e .  (no network needed)
#   OUTDIR/gpu_tests.log    pytest -m gpu tests/kernels (+ OUTDIR/gpu_tests.xml)
#   OUTDIR/gpu_check.json   benchmarks/gpu_check.py sections (loss step, head, model pass, train step, packer, LoRA vs full)
#   OUTDIR/gpu_check.log    its printed table
#   OUTDIR/native_tests.log the interpreter-sized kernel tests run natively, if time is left (last)
# Usage: benchmarks/gpu_check.sh OUTDIR            on the GPU machine, from the repository root
#        benchmarks/gpu_check.sh OUTDIR --cpu-smoke  anywhere: the same steps at toy sizes on the CPU
#                                                    (no install; Triton under the interpreter)
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--cpu-smoke]}
SMOKE=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
start=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/steps.txt"; }

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -P - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "triton", "cupy", "transformers", "pyarrow", "liger_kernel", "cut_cross_entropy"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "absent:", type(e).__name__)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
log "env: $(head -2 "$OUT/env.txt" | tail -1)"

if [ "$SMOKE" != "--cpu-smoke" ]; then
  timeout 60 pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
  log "install rc=$?"
fi

# tests/kernels only: other test folders import polars/duckdb, which the GPU machine lacks
timeout 75 python -P -m pytest -q -p no:cacheprovider -m gpu tests/kernels -o addopts="--import-mode=importlib" --continue-on-collection-errors \
  --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
log "gpu tests rc=$? ($(tail -1 "$OUT/gpu_tests.log"))"

left=$(( 215 - ($(date +%s) - start) ))
[ "$left" -lt 20 ] && left=20
timeout "$left" python benchmarks/gpu_check.py "$OUT" $SMOKE > "$OUT/gpu_check.log" 2>&1
log "measurements rc=$? (timeout ${left}s); results in $OUT/gpu_check.json"

# the CPU suite's kernel tests, natively on the GPU (same shapes, native block sizes), with what is left
left=$(( 235 - ($(date +%s) - start) ))
if [ "$left" -gt 15 ]; then
  timeout "$left" python -P -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib" tests/kernels/test_linear_cross_entropy.py \
    tests/kernels/test_triton_head.py tests/kernels/test_packing_reference.py tests/kernels/test_passes_through_switch.py \
    > "$OUT/native_tests.log" 2>&1
  log "native kernel tests rc=$? ($(tail -1 "$OUT/native_tests.log"))"
fi
log "done"
