"""What capturing a decode graph for a new skip set costs, the engine's way and `torch.cuda.graph`'s way.

Every `generate` with a fresh skip set captures one CUDA graph per batch bucket it passes through: 14-36 ms
each on an H200 at 9881875 (2026-11-27; 35 ms of a 128-token batch-1 rollout's 298 ms), when every capture
ran the step eagerly first and went through `torch.cuda.graph`. This times both ways on new skip sets at
batch 1 and 64, and checks that each way's graphs give the eager engine's tokens:

  engine            DecodeGraphs._record: the eager run only on a (bucket, cache layout)'s first capture,
                    and the allocator's caches kept
  torch.cuda.graph  an eager run before every capture, and the device and pinned-host caches emptied
                    first, as `torch.cuda.graph` does (the engine's way before 6942720)

    python benchmarks/graph_capture.py [--model random:qwen2.5-1.5b] [--plans 4] [--out capture.json]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
from unittest import mock

import torch
from rollout_throughput import load, workload

from nreft_engine import Engine, SamplingParams, SkipPolicy
from nreft_engine.graphs import DecodeGraphs

CASES = ((1, 1), (16, 4))  # (prompts, n): batch 1 and 64 sequences
VARIANTS = ("engine", "torch.cuda.graph")


def variant_patch(name: str):
    """A context that makes DecodeGraphs capture the `name` way (patches around its own _record)."""
    if name == "engine":
        return contextlib.nullcontext()
    record = DecodeGraphs._record

    def like_torch_cuda_graph(self, step, warm_up):
        torch.cuda.empty_cache()
        torch._C._host_emptyCache()
        return record(self, step, warm_up=True)

    return mock.patch.object(DecodeGraphs, "_record", like_torch_cuda_graph)


def profile_one_capture(engine: Engine, prompts: list[list[int]], seed: int) -> None:
    """The host functions one batch-1 capture spends its time in (cProfile, by cumulative time)."""
    plan = SkipPolicy(0.25, seed=seed).plan(engine.num_layers)
    profiler = cProfile.Profile()
    with mock.patch.object(DecodeGraphs, "_capture", profiled(DecodeGraphs._capture, profiler)):
        engine.generate(
            prompts, SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=0), skip=plan
        )
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)


def profiled(method, profiler: cProfile.Profile):
    def wrapper(*args, **kwargs):
        profiler.enable()
        try:
            return method(*args, **kwargs)
        finally:
            profiler.disable()

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:qwen2.5-1.5b")
    parser.add_argument("--plans", type=int, default=4, help="new skip sets timed per variant and batch")
    parser.add_argument("--out", help="write the timings as JSON here")
    args = parser.parse_args()
    model, tokenizer = load(args.model, torch.bfloat16, "cuda")
    eager = Engine(model, tokenizer, kv_cache_memory=1 << 30, enforce_eager=True)
    print(f"{'variant':16} {'seqs':>4} {'capture ms (median, min-max)':>30} {'same tokens as eager':>21}")
    rows = []
    for variant in VARIANTS:
        with variant_patch(variant):
            engine = Engine(model, tokenizer, kv_cache_memory=1 << 30)
            for num_prompts, n in CASES:
                prompts = workload(tokenizer, num_prompts, model.config.vocab_size)
                params = SamplingParams(n=n, temperature=1.0, max_tokens=8, ignore_eos=True, seed=0)
                warm = SkipPolicy(0.25, seed=args.plans).plan(engine.num_layers)
                engine.generate(prompts, params, skip=warm)  # the layout's first capture compiles kernels
                times, same = [], True
                for seed in range(args.plans):
                    plan = SkipPolicy(0.25, seed=seed).plan(engine.num_layers)
                    outputs = engine.generate(prompts, params, skip=plan)
                    stats = engine.last_stats
                    times.append(1e3 * stats.graph_capture_seconds / max(stats.graph_captures, 1))
                    expected = eager.generate(prompts, params, skip=plan)
                    same &= [c.token_ids for o in outputs for c in o.outputs] == [
                        c.token_ids for o in expected for c in o.outputs
                    ]
                median = statistics.median(times)
                spread = f"{median:.1f} ({min(times):.1f}-{max(times):.1f})"
                print(f"{variant:16} {num_prompts * n:>4} {spread:>30} {same!s:>21}", flush=True)
                rows.append({"variant": variant, "sequences": num_prompts * n, "capture_ms": times,
                             "median_ms": median, "same_tokens_as_eager": same})
            if variant == "engine":
                profile_one_capture(engine, workload(tokenizer, 1, model.config.vocab_size), args.plans + 1)
            del engine
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "model": args.model, "rows": rows}, f,
                      indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
