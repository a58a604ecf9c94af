"""Rollout throughput: HF transformers `generate` vs the engine (skip 0, 0.25, 0.5), one process, one workload.

16 chat prompts x n=4 samples x 128 new tokens (EOS ignored) on SmolLM2-135M in fp32 and bf16, and batch 1
(one prompt, n=1). Prints generated tokens/s, KV bytes and ratios, and writes JSON.

    python benchmarks/rollout_throughput.py [--quick] [--out benchmarks/results/rollout_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from nreft_engine import Engine
from nreft_engine.bench import chat_workload, measure_engine, measure_hf
from nreft_engine.models.loader import load_model

SKIP_RATIOS = (0.0, 0.25, 0.5)


def run_case(model, tokenizer, dtype_name: str, num_prompts: int, n: int, max_tokens: int) -> list[dict]:
    prompts = chat_workload(tokenizer, num_prompts)
    engine = Engine(model, tokenizer, kv_cache_memory=1 << 30)
    measure_engine(engine, prompts[:2], n=1, max_tokens=8, skip_ratio=0.0)  # warm-up
    rows = [{"system": "hf", **measure_hf(model, prompts, n, max_tokens, tokenizer.pad_token_id or 0)}]
    for ratio in SKIP_RATIOS:
        rows.append({"system": f"engine skip {ratio}", **measure_engine(engine, prompts, n, max_tokens, ratio)})
    for row in rows:
        row.update(dtype=dtype_name, sequences=num_prompts * n, max_tokens=max_tokens)
        print(f"  {dtype_name} x{num_prompts * n} {row['system']}: {row['tokens_per_second']:.1f} tok/s", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    hf = {(r["dtype"], r["sequences"]): r["tokens_per_second"] for r in rows if r["system"] == "hf"}
    base = {(r["dtype"], r["sequences"]): r["tokens_per_second"] for r in rows if r["system"] == "engine skip 0.0"}
    print(f"{'dtype':9} {'seqs':>4} {'system':18} {'tok/s':>8} {'x HF':>6} {'x skip0':>7} {'KV MiB':>8}")
    for r in rows:
        key = (r["dtype"], r["sequences"])
        print(f"{r['dtype']:9} {r['sequences']:>4} {r['system']:18} {r['tokens_per_second']:8.1f} "
              f"{r['tokens_per_second'] / hf[key]:6.2f} {r['tokens_per_second'] / base[key]:7.2f} "
              f"{r['kv_cache_bytes'] / 2**20:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 new tokens instead of 128 (a smoke run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rollout_throughput.json"))
    args = parser.parse_args()
    max_tokens = 8 if args.quick else 128
    rows = []
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model, tokenizer = load_model("smollm2-135m-instruct", dtype=dtype)
        rows += run_case(model, tokenizer, dtype_name, 16, 4, max_tokens)
        if dtype is torch.float32:
            rows += run_case(model, tokenizer, dtype_name, 1, 1, max_tokens)
    print_table(rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
