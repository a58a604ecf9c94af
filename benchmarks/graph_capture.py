"""What capturing a decode graph for a new skip set costs, and what cheaper captures would save.

Every `generate` with a fresh skip set captures one CUDA graph per batch bucket it passes through: 14-36 ms
each on an H200, 35 ms of a 128-token batch-1 rollout's 298 ms. This times DecodeGraphs' capture as the
engine does it and two candidates, on new skip sets at batch 1 and 64, and checks that each candidate's
graphs give the eager engine's tokens:

  engine         DecodeGraphs._record: an eager run (compiles kernels), then torch.cuda.graph, which empties
                 the device and pinned-host caches before every capture
  keep-caches    the same with that cache emptying patched out
  keep-caches-1  the same, and the eager run only for a bucket's first capture (its kernels are compiled)

    python benchmarks/graph_capture.py [--model random:qwen2.5-1.5b] [--plans 4]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import itertools
import pstats
import statistics
from unittest import mock

import torch
from rollout_throughput import load, workload

from nreft_engine import Engine, SamplingParams, SkipPolicy
from nreft_engine.graphs import DecodeGraphs

CASES = ((1, 1), (16, 4))  # (prompts, n): batch 1 and 64 sequences


def keeping_caches():
    """torch.cuda.graph without its cache emptying (device and pinned host) before each capture."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("torch.cuda.empty_cache"))
    stack.enter_context(mock.patch.object(torch._C, "_host_emptyCache", create=True))
    return stack


def skipping_first_call(step):
    """`step` whose first call (DecodeGraphs._record's eager warm-up run) does nothing."""
    calls = itertools.count()
    return lambda: None if next(calls) == 0 else step()


def variant_patch(name: str):
    """A context that makes DecodeGraphs capture the `name` way (patches around its own _record)."""
    if name == "engine":
        return contextlib.nullcontext()
    if name == "keep-caches":
        return keeping_caches()
    original_capture = DecodeGraphs._capture

    def capture_warm_once(self, bucket, plan, cache):
        warmed = self.__dict__.setdefault("_warmed_buckets", set())
        record = DecodeGraphs._record.__get__(self)
        wrap = skipping_first_call if bucket in warmed else (lambda step: step)
        with mock.patch.object(self, "_record", lambda step: record(wrap(step))):
            replay = original_capture(self, bucket, plan, cache)
        warmed.add(bucket)
        return replay

    stack = keeping_caches()
    stack.enter_context(mock.patch.object(DecodeGraphs, "_capture", capture_warm_once))
    return stack


def profile_one_capture(engine: Engine, prompts: list[list[int]], seed: int) -> None:
    """The host functions one batch-1 capture spends its time in (cProfile, by cumulative time)."""
    plan = SkipPolicy(0.25, seed=seed).plan(engine.num_layers)
    profiler = cProfile.Profile()
    with mock.patch.object(DecodeGraphs, "_capture", profiled(DecodeGraphs._capture, profiler)):
        engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=0), skip=plan)
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
    args = parser.parse_args()
    model, tokenizer = load(args.model, torch.bfloat16, "cuda")
    eager = Engine(model, tokenizer, kv_cache_memory=1 << 30, enforce_eager=True)
    print(f"{'variant':14} {'seqs':>4} {'capture ms (median, min-max)':>30} {'same tokens as eager':>21}")
    for variant in ("engine", "keep-caches", "keep-caches-1"):
        with variant_patch(variant):
            engine = Engine(model, tokenizer, kv_cache_memory=1 << 30)
            for num_prompts, n in CASES:
                prompts = workload(tokenizer, num_prompts, model.config.vocab_size)
                params = SamplingParams(n=n, temperature=1.0, max_tokens=8, ignore_eos=True, seed=0)
                engine.generate(prompts, params)  # the bucket's first capture: compiles kernels
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
                spread = f"{statistics.median(times):.1f} ({min(times):.1f}-{max(times):.1f})"
                print(f"{variant:14} {num_prompts * n:>4} {spread:>30} {same!s:>21}", flush=True)
            if variant == "engine":
                profile_one_capture(engine, workload(tokenizer, 1, model.config.vocab_size), args.plans)
            del engine


if __name__ == "__main__":
    main()
