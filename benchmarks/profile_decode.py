"""Where a decode step's time goes: torch.profiler over a short rollout, GPU busy time against wall time.

Warms the engine up on the measured shape, then profiles one generate call per (batch, skip ratio) and prints
wall ms per step, device ms per step (the kernels' own time, summed) and the top entries by kernel time. A
step whose device ms are well under its wall ms waits on the host; one near it is bound by its kernels.

    python benchmarks/profile_decode.py --device cuda --model random:qwen2.5-1.5b --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch
from rollout_throughput import DTYPES, load, workload
from torch.profiler import ProfilerActivity, profile

from nreft_engine import Engine
from nreft_engine.bench import measure_engine

CASES = ((16, 4), (1, 1))  # (prompts, n): 64 sequences and batch 1, as in rollout_throughput.py


def profile_case(
    engine: Engine, prompts: list[list[int]], n: int, max_tokens: int, skip_ratio: float, top: int
) -> None:
    measure_engine(engine, prompts, n, max_tokens, skip_ratio)  # captures this skip set's graphs
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        row = measure_engine(engine, prompts, n, max_tokens, skip_ratio)
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    steps = max_tokens
    print(f"\n== {len(prompts) * n} sequences, skip {skip_ratio}: "
          f"{row['seconds'] * 1e3 / steps:.3f} ms wall per step, "
          f"{device_us / 1e3 / steps:.3f} ms device per step "
          f"({device_us / 1e4 / row['seconds']:.0f}% busy)")
    sort_by = "self_device_time_total" if device_us else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:qwen2.5-1.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--layers", type=int)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--skips", type=float, nargs="+", default=[0.0, 0.25])
    parser.add_argument("--top", type=int, default=12, help="rows of each profile table")
    args = parser.parse_args()
    model, tokenizer = load(args.model, DTYPES[args.dtype], args.device, args.layers)
    for num_prompts, n in CASES:
        prompts = workload(tokenizer, num_prompts, model.config.vocab_size)
        engine = Engine(model, tokenizer, kv_cache_memory=1 << 30)
        measure_engine(engine, prompts, n, 8, 0.0)
        for ratio in args.skips:
            profile_case(engine, prompts, n, args.max_tokens, ratio, args.top)
        del engine


if __name__ == "__main__":
    main()
