#!/usr/bin/env bash
# Issue 3's GPU checks in one device call: build the CUDA extension, run the kernel and CUDA tests on the
# GPU (no interpreter), the kernel micro-benchmarks, and the rollout benchmark on a Qwen2.5-1.5B-shaped
# random model (bf16, batch 64 and 1, skip 0 / 0.25 / 0.5, HF generate on the same GPU).
# Logs and JSON go to $OUT; the summary is printed last. Usage: bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/nreft-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
: > "$OUT/summary.txt"

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, append one summary line
  local name=$1 start=$SECONDS rc
  shift
  "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc, $((SECONDS - start)) s: $(tail -n 1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
step build $PY -m pip install --no-build-isolation --no-deps -e . || { tail -n 40 "$OUT/build.log"; exit 1; }
export NREFT_TEST_DEVICE=cuda
step tests $PY -m pytest -q -p no:cacheprovider tests/test_kernels_*.py tests/test_cuda.py tests/test_cache_ops.py \
  tests/test_graphs.py
step kernels $PY -m pytest -q -p no:cacheprovider benchmarks/kernels --benchmark-only \
  --benchmark-json="$OUT/kernels.json"
step rollout $PY benchmarks/rollout_throughput.py --device cuda --model random:qwen2.5-1.5b --dtypes bfloat16 \
  --out "$OUT/rollout_gpu.json"
grep -E "^(dtype|bfloat16) " "$OUT/rollout.log"
grep -E "FAILED|Error" "$OUT/tests.log" | head -n 20
cat "$OUT/summary.txt"
