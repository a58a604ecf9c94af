"""Where a decode step's time goes: torch.profiler over steady decode steps, device busy time against wall.

For each (batch, skip ratio) the engine first runs the rollout unprofiled (which also captures the skip set's
graphs; its steady ms per step is the reference), then again under torch.profiler, which records `--steps`
decode steps after the prefill and two decode steps left out as warm-up. Prints and writes as JSON: wall ms
per step, device ms per step (the kernels' own time, summed), the device's busy fraction and the top kernels
by time, and the top host entries by self time (on a GPU, CUDA runtime calls: launches, copies, syncs; on the
CPU, torch ops). A step whose device ms are well under its wall ms waits on the host; one near it is bound by
its kernels.

    python benchmarks/profile_decode.py --device cuda --model random:qwen2.5-1.5b --dtype bfloat16 \
        --out profile.json
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch
from rollout_throughput import DTYPES, load, steady_ms_per_step, workload
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from nreft_engine import Engine
from nreft_engine.bench import measure_engine
from nreft_engine.runner import ModelRunner

CASES = ((16, 4), (1, 1))  # (prompts, n): 64 sequences and batch 1, as in rollout_throughput.py
WAIT, WARMUP = 1, 1  # decode steps before the recorded ones: one unrecorded, one the profiler warms up on


def top_entries(events, time_of, steps: int, top: int) -> list[dict]:
    """The `top` events by time_of(event) in us, per decode step."""
    total = sum(time_of(e) for e in events) or 1.0
    rows = sorted(events, key=time_of, reverse=True)[:top]
    return [
        {"name": e.key, "us_per_step": time_of(e) / steps, "calls_per_step": e.count / steps,
         "percent": 100 * time_of(e) / total}
        for e in rows if time_of(e) > 0
    ]


def profile_case(engine: Engine, prompts: list[list[int]], n: int, steps: int, skip_ratio: float, top: int,
                 cuda: bool) -> dict:
    max_tokens = 1 + WAIT + WARMUP + steps  # the prefill's token, then one token per decode step
    unprofiled = measure_engine(engine, prompts, n, max_tokens, skip_ratio)  # captures this skip set's graphs
    stamps = []  # host time at the end of each decode step
    step = ModelRunner.step

    def counted_step(self, *args):
        batch, out = step(self, *args)
        if not batch.prefill:
            stamps.append(time.perf_counter())
            prof.step()
        return batch, out

    # only the device's activity on a GPU: recording every torch op would slow the host it is measuring
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with (profile(activities=activities, schedule=schedule(wait=WAIT, warmup=WARMUP, active=steps)) as prof,
          mock.patch.object(ModelRunner, "step", counted_step)):
        measure_engine(engine, prompts, n, max_tokens, skip_ratio)
    wall_ms = 1e3 * (stamps[WAIT + WARMUP + steps - 1] - stamps[WAIT + WARMUP - 1]) / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    # ProfilerStep#i spans a whole step: its self time is everything outside the recorded ops
    host = [e for e in events if e.device_type == DeviceType.CPU and not e.key.startswith("ProfilerStep")]
    device_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    sequences = len(prompts) * n
    result = {
        "sequences": sequences, "skip": skip_ratio, "steps": steps,
        "wall_ms_per_step": wall_ms, "unprofiled_ms_per_step": steady_ms_per_step(unprofiled, sequences),
        "device_ms_per_step": device_ms if cuda else None,
        "busy_percent": 100 * device_ms / wall_ms if cuda else None,
        "top_kernels": top_entries(kernels, lambda e: e.self_device_time_total, steps, top),
        "top_host": top_entries(host, lambda e: e.self_cpu_time_total, steps, top),
    }
    busy = f", {device_ms:.3f} ms device ({result['busy_percent']:.0f}% busy)" if cuda else ""
    print(f"\n== {sequences} sequences, skip {skip_ratio}: {wall_ms:.3f} ms wall per step profiled, "
          f"{result['unprofiled_ms_per_step']:.3f} unprofiled{busy}")
    for title, rows in (("kernels", result["top_kernels"]), ("host", result["top_host"])):
        for r in rows:
            print(f"  {title:7} {r['us_per_step']:9.1f} us/step {r['calls_per_step']:6.1f} calls/step "
                  f"{r['percent']:5.1f}%  {r['name'][:90]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:qwen2.5-1.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--layers", type=int)
    parser.add_argument("--steps", type=int, default=20, help="decode steps recorded per case")
    parser.add_argument("--skips", type=float, nargs="+", default=[0.0, 0.25])
    parser.add_argument("--top", type=int, default=12, help="kernels and host entries kept per case")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    model, tokenizer = load(args.model, DTYPES[args.dtype], args.device, args.layers)
    cases = []
    for num_prompts, n in CASES:
        prompts = workload(tokenizer, num_prompts, model.config.vocab_size)
        engine = Engine(model, tokenizer, kv_cache_memory=1 << 30)
        measure_engine(engine, prompts, n, 8, 0.0)  # compiles the kernels on the measured shapes
        cases += [profile_case(engine, prompts, n, args.steps, ratio, args.top, cuda) for ratio in args.skips]
        del engine
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model,
                       "dtype": args.dtype, "cases": cases}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
