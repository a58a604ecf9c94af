#!/usr/bin/env bash
# The GPU checks in one run: build the CUDA extension, run the kernel and CUDA tests on the GPU (no
# interpreter), the rollout benchmark on a Qwen2.5-1.5B-shaped random model (bf16, batch 64 and 1, skip 0 /
# 0.25 / 0.5, HF generate on the same GPU), the decode profile, the graph-capture benchmark and the kernel
# micro-benchmarks. Each step has its own time limit, so one that hangs or fails leaves the others their
# time. Logs and JSON are kept in $OUT/logs.tgz (refreshed after every step, so a run cut short keeps what
# it has); the tables and a one-line summary per step are printed last. Usage: bash benchmarks/gpu_suite.sh
# [STEP...]: the named steps only (build tests rollout profile capture probe bench_paged rollout_1layer
# bench_other bench_sampler; default: all but bench_sampler, which bench_other includes).
set -u
STEPS=${*:-build tests rollout profile capture probe bench_paged rollout_1layer bench_other}
wants() { [[ " $STEPS " == *" $1 "* ]]; }
OUT=${OUT:-/tmp/nreft-gpu}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
PY=${PY:-python3}
: > "$LOGS/summary.txt"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $LOGS/NAME.log, append a summary line
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc, $((SECONDS - start)) s: $(tail -n 1 "$LOGS/$name.log")" | tee -a "$LOGS/summary.txt"
  tar czf "$OUT/logs.tgz" -C "$LOGS" .
  return $rc
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} > "$LOGS/gpu.txt" 2>&1
cat "$LOGS/gpu.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if wants build && ! step build 120 $PY -m pip install -v --no-build-isolation --no-deps -e .; then
  tail -n 30 "$LOGS/build.log"
  # keep the Triton checks: the C++ extension without its CUDA sources
  NREFT_NO_CUDA=1 step build_cpu_only 120 $PY -m pip install --no-build-isolation --no-deps -e .
fi
# how _C was linked: a static libstdc++ beside torch's shared one crashed its first formatted error message
{ g++ --version | head -n 1; ldd nreft_engine/_C*.so | grep -E "gomp|stdc|gcc_s"; grep -m 1 -- " -shared " "$LOGS/build.log"
  $PY -c "import sysconfig; print({v: sysconfig.get_config_var(v) for v in ('LDSHARED', 'LDCXXSHARED', 'CXX')})"
  env | grep -E "^(LDFLAGS|CXX|CC|CFLAGS|CXXFLAGS)="; } > "$LOGS/toolchain.txt" 2>&1
export NREFT_TEST_DEVICE=cuda
wants tests && step tests 150 $PY -m pytest -q -p no:cacheprovider -n 16 tests/test_kernels_*.py tests/test_cuda.py \
  tests/test_cache_ops.py tests/test_graphs.py
wants rollout && { step rollout 150 $PY benchmarks/rollout_throughput.py --device cuda --model random:qwen2.5-1.5b \
  --dtypes bfloat16 --variants sync --out "$LOGS/rollout_gpu.json" ||
  step rollout_eager 100 $PY benchmarks/rollout_throughput.py --device cuda --model random:qwen2.5-1.5b \
    --dtypes bfloat16 --enforce-eager --no-async --out "$LOGS/rollout_gpu_eager.json"; }
# GPU busy time against wall time per decode step, and the top kernels (batch 64 and 1, skip 0 / 0.25)
wants profile && step profile 80 $PY benchmarks/profile_decode.py --device cuda --model random:qwen2.5-1.5b --dtype bfloat16
# what a new skip set's graph capture costs, as the engine captures and two cheaper ways
wants capture && step capture 90 $PY benchmarks/graph_capture.py
# One error of each kind raised through _C (a torch op's own, a TORCH_CHECK in _C, a std::invalid_argument
# and a custom exception in _C) under cuda-gdb, which prints the native stack of a crash.
cat > "$LOGS/throw_probe.py" <<'PY'
import torch
from nreft_engine import _C
cases = {
    "torch op": lambda: torch.empty(4).view(3),
    "_C TORCH_CHECK": lambda: _C.copy_blocks(torch.zeros(1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 2),
                                             torch.tensor([[0, 5]])),  # block id 5 of 1: out of range
    "_C std::invalid_argument": lambda: _C.BlockManager(-1, 16),
    "_C UnknownSequence": lambda: _C.BlockManager(4, 16).free(123),
}
for name, call in cases.items():
    try:
        call()
    except Exception as e:
        print(f"{name}: raised {type(e).__name__}: {e}", flush=True)
PY
if wants probe; then
  if command -v cuda-gdb > /dev/null; then
    step throw_probe 60 cuda-gdb -q -batch -ex run -ex bt --args $PY "$LOGS/throw_probe.py"
  else
    step throw_probe 60 $PY -X faulthandler "$LOGS/throw_probe.py"
  fi
fi
BENCH=(-q -p no:cacheprovider --benchmark-only --benchmark-max-time=0.05 --benchmark-min-rounds=3)
wants bench_paged && step bench_paged 75 $PY -m pytest "${BENCH[@]}" benchmarks/kernels/test_bench_paged_attention.py \
  --benchmark-json="$LOGS/bench_paged.json"
# one decoder layer: what a decode step costs besides the layers (host work, lm head, sampler)
wants rollout_1layer && step rollout_1layer 90 $PY benchmarks/rollout_throughput.py --device cuda \
  --model random:qwen2.5-1.5b --dtypes bfloat16 --layers 1 --variants sync --out "$LOGS/rollout_gpu_1layer.json"
wants bench_other && step bench_other 90 $PY -m pytest "${BENCH[@]}" benchmarks/kernels/test_bench_elementwise.py \
  benchmarks/kernels/test_bench_sampler.py benchmarks/kernels/test_bench_prefill_attention.py \
  --benchmark-json="$LOGS/bench_other.json"
wants bench_sampler && step bench_sampler 60 $PY -m pytest "${BENCH[@]}" benchmarks/kernels/test_bench_sampler.py \
  --benchmark-json="$LOGS/bench_sampler.json"

grep -hE "kernel bandwidth|^\| kernel |\| triton \|" "$LOGS"/bench_*.log  # the torch rows are in the logs
grep -hE "^(dtype|bfloat16) " "$LOGS"/rollout*.log
grep -sh "^== " "$LOGS/profile.log"
grep -shE "^(variant|engine|torch.cuda.graph)" "$LOGS/capture.log"
grep -shE "FAILED|^E .*Error" "$LOGS/tests.log" | sort | uniq -c | sort -rn | head -n 15
grep -sE "raised|SIGSEGV|^#[0-9]+ " "$LOGS/throw_probe.log" | head -n 25
cat "$LOGS/toolchain.txt" "$LOGS/summary.txt"
