"""A trainer's rollouts with packed weights against the model's own, and the engine's timed choice.

A trainer's engine sees new weights before every rollout, so packed copies are re-packed each time. This runs
the main job's rollout shape (SmolLM2-135M fp32, 8 prompts x 8 samples x 12 tokens by default) after an
in-place update of every parameter, alternating an engine with `prepack_weights=True` and one with `False`
over the same weights, and prints seconds per rollout (re-pack included), their ratio, and what
`training_prepack` (the default) chose. Prefix the command with the AVX2 caps of the Makefile's AVX2_CAP to
measure as an AVX2-only CPU.

    python benchmarks/training_prepack.py [--rollouts 6] [--max-tokens 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nreft_engine import Engine, SamplingParams
from nreft_engine.bench import chat_workload, cpu_name
from nreft_engine.kernels import cpu as cpu_kernels
from nreft_engine.linear import training_prepack
from nreft_engine.models.loader import DEFAULT_MODEL, load_model


def rollout_seconds(engine: Engine, model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams):
    """One rollout after an in-place update of every parameter (what an optimizer step does)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)
    start = time.perf_counter()
    engine.generate(prompts, params)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--rollouts", type=int, default=6, help="timed per variant, after one warm-up")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    prompts = chat_workload(tokenizer, args.prompts)
    params = SamplingParams(n=args.group_size, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = args.prompts * args.group_size
    chosen = training_prepack(model, rows, args.max_tokens)
    engines = {prepack: Engine(model, tokenizer, prepack_weights=prepack) for prepack in (True, False)}
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for prepack, engine in engines.items():
        rollout_seconds(engine, model, prompts, params)  # warm-up
    for _ in range(args.rollouts):
        for prepack, engine in engines.items():
            seconds[prepack].append(rollout_seconds(engine, model, prompts, params))
    best = {prepack: min(values) for prepack, values in seconds.items()}
    result = {
        "cpu": cpu_name(),
        "kernels_isa": cpu_kernels.isa(),
        "torch_isa": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": cpu_kernels.onednn_bf16(),
        "rows": rows,
        "max_tokens": args.max_tokens,
        "packed_seconds": best[True],
        "unpacked_seconds": best[False],
        "packed_speedup": best[False] / best[True],
        "training_prepack_chose": chosen,
        "chosen_vs_unpacked": best[False] / best[bool(chosen)],
    }
    print(f"kernels {result['kernels_isa']}, torch {result['torch_isa']}; {rows} sequences x "
          f"{args.max_tokens} tokens, best of {args.rollouts} rollouts after an update")
    print(f"packed {best[True]:.3f} s, unpacked {best[False]:.3f} s: packed {result['packed_speedup']:.2f}x; "
          f"training_prepack chose {'packed' if chosen else 'unpacked'} "
          f"({result['chosen_vs_unpacked']:.2f}x the unpacked rollout)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
