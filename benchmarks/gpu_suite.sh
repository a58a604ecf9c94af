#!/usr/bin/env bash
# The GPU checks in one run of at most about 7 minutes on an H200: build the CUDA extension, run the CUDA and
# Triton tests on the GPU (no interpreter), the rollout benchmark on a Qwen2.5-1.5B-shaped random model (bf16,
# batch 64 and 1, skip 0 / 0.25 / 0.5, steady decode ms per step, HF generate beside it), a torch.profiler
# summary of 20 decode steps per case, the graph-capture timing, the Triton kernel micro-benchmarks and the
# rollout on one layer (the per-step cost that skipping cannot remove), most important first.
#
# Each step has its own time limit, cut to what is left of the run's budget ($BUDGET s, default 400), so one
# that hangs leaves the others their time and the run still ends in time. Logs and JSON go to a work folder,
# packed into $OUT/suite.tgz after every step (a run cut short keeps what it has); then $OUT/summary.txt gets
# the printed summary and $OUT/summary.json the step outcomes and the targets, measured against required
# (benchmarks/gpu_summary.py): three files, as few as the GPU machine hands back.
#
# Without a CUDA device it is the CPU check: the same steps on a tiny random model (8 new tokens, the C++
# kernels' smallest benchmarks), the GPU-only ones (build, tests, capture) skipped; under a minute.
#
# Usage: OUT=folder bash benchmarks/gpu_suite.sh [STEP...]
#   steps: build tests rollout profile capture bench rollout_1layer (default: all, in this order)
set -u
cd "$(dirname "$0")/.."
STEPS=" ${*:-build tests rollout profile capture bench rollout_1layer} "
OUT=${OUT:-/tmp/nreft-gpu}
PY=${PY:-python3}  # on the GPU machine its image's python3, the one with CUDA torch (the venv is CPU-only)
DEADLINE=$((SECONDS + ${BUDGET:-400}))
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

wants() { [[ $STEPS == *" $1 "* ]]; }

record() {  # record NAME JSON_FIELDS: the step's line in steps.jsonl, then everything so far into suite.tgz
  echo "{\"step\": \"$1\", $2}" >> "$WORK/steps.jsonl"
  tar czf "$OUT/suite.tgz" -C "$WORK" .
}

step() {  # step NAME SECONDS COMMAND...: run under a time limit (at most the budget left), log to NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  ((limit > DEADLINE - SECONDS)) && limit=$((DEADLINE - SECONDS))
  if ((limit < 10)); then
    record "$name" '"skipped": "time budget spent"'
    echo "$name: skipped, time budget spent"
    return 1
  fi
  timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1  # -k: a process stuck in the driver ignores SIGTERM
  rc=$?
  record "$name" "\"rc\": $rc, \"seconds\": $((SECONDS - start)), \"limit\": $limit"
  echo "$name: rc=$rc, $((SECONDS - start)) s of $limit: $(tail -n 1 "$WORK/$name.log")"
  return $rc
}

gpu_only() {  # gpu_only NAME: true on a CUDA device, else the step is recorded as skipped
  [[ $DEVICE == cuda ]] && return 0
  record "$1" '"skipped": "no CUDA device"'
  return 1
}

if $PY -c "import torch; raise SystemExit(not torch.cuda.is_available())" 2> /dev/null; then
  DEVICE=cuda MODEL=random:qwen2.5-1.5b DTYPE=bfloat16 KERNELS=triton SHORT=() PROFILED_STEPS=20
else
  DEVICE=cpu MODEL=random:tiny DTYPE=float32 KERNELS="cpu and smollm2-135m-1-" SHORT=(--quick) PROFILED_STEPS=4
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a shared CPU machine: threads of its own stall each other
fi
{
  echo "$(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2> /dev/null || echo unknown), device $DEVICE"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

# No network on the GPU machine: --no-index, and the build tools come from its python (no build isolation).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PIP=($PY -m pip install --no-index --no-build-isolation --no-deps -e .)
if wants build && gpu_only build && ! step build 150 "${PIP[@]}" -v; then
  tail -n 30 "$WORK/build.log"
  NREFT_NO_CUDA=1 step build_cpu_only 90 "${PIP[@]}"  # keeps the Triton checks: _C without its CUDA sources
fi

diagnose() {  # after failed tests: how _C was linked, and one error of each kind raised through it
  # a static libstdc++ beside torch's shared one once crashed _C's first formatted error message
  { g++ --version | head -n 1; ldd nreft_engine/_C*.so | grep -E "gomp|stdc|gcc_s"
    grep -m 1 -- " -shared " "$WORK/build.log"
    $PY -c "import sysconfig; print({v: sysconfig.get_config_var(v) for v in ('LDSHARED', 'LDCXXSHARED', 'CXX')})"
  } > "$WORK/toolchain.txt" 2>&1
  cat > "$WORK/throw_probe.py" << 'PY'
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
  # cuda-gdb prints the native stack of a crash
  step throw_probe 60 cuda-gdb -q -batch -ex run -ex bt --args $PY "$WORK/throw_probe.py"
}
if wants tests && gpu_only tests && ! NREFT_TEST_DEVICE=cuda step tests 150 $PY -m pytest -q -p no:cacheprovider \
  -n 16 --timeout 90 tests/test_kernels_*.py tests/test_cuda.py tests/test_cache_ops.py tests/test_graphs.py; then
  diagnose
fi

ROLLOUT=($PY benchmarks/rollout_throughput.py --device $DEVICE --model $MODEL --dtypes $DTYPE "${SHORT[@]}")
# the eager engine when the graphed one fails: numbers to compare with, and a hint at what broke
wants rollout && { step rollout 150 "${ROLLOUT[@]}" --variants sync --out "$WORK/rollout.json" ||
  step rollout_eager 100 "${ROLLOUT[@]}" --enforce-eager --no-async --out "$WORK/rollout_eager.json"; }
wants profile && step profile 75 $PY benchmarks/profile_decode.py --device $DEVICE --model $MODEL --dtype $DTYPE \
  --steps $PROFILED_STEPS --top 6 --out "$WORK/profile.json"
wants capture && gpu_only capture && step capture 90 $PY benchmarks/graph_capture.py --out "$WORK/capture.json"
# the kernels the engine runs on this device (the torch references' timings have no target)
wants bench && step bench 100 $PY -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-max-time=0.05 \
  --benchmark-min-rounds=3 -k "$KERNELS" benchmarks/kernels --benchmark-json="$WORK/bench.json"
wants rollout_1layer && step rollout_1layer 90 "${ROLLOUT[@]}" --layers 1 --variants sync \
  --out "$WORK/rollout_1layer.json"

show() {  # show NAME PATTERN: the lines of NAME.log that matter, under its name, if the step ran
  [[ -f $WORK/$1.log ]] && echo "-- $1" && grep -E "$2" "$WORK/$1.log"
}
{
  show bench "kernel bandwidth|^\|"
  for name in rollout rollout_eager rollout_1layer; do show $name "^(dtype|bfloat16|float32) "; done
  show profile "^== |^  (kernels|host) "
  show capture "^(variant|engine|torch.cuda.graph) "
  grep -shE "FAILED|^E .*Error" "$WORK/tests.log" | sort | uniq -c | sort -rn | head -n 15
  grep -sE "raised|SIGSEGV|^#[0-9]+ " "$WORK/throw_probe.log" | head -n 25
  cat "$WORK/toolchain.txt" 2> /dev/null
  $PY benchmarks/gpu_summary.py "$WORK" --json "$OUT/summary.json"
} | tee "$OUT/summary.txt"
tar czf "$OUT/suite.tgz" -C "$WORK" .
echo "logs and JSON: $OUT/suite.tgz (unpacked in $WORK)"
