"""Rollout throughput: HF transformers `generate` vs the engine (skip 0, 0.25, 0.5), one process and workload.

16 chat prompts x n=4 samples x 128 new tokens (EOS ignored), and batch 1 (one prompt, n=1) in the first
dtype. Default: SmolLM2-135M on the CPU in fp32 and bf16. Prints generated tokens/s, KV bytes and ratios,
and writes JSON.

    python benchmarks/rollout_throughput.py [--quick] [--out benchmarks/results/rollout_throughput.json]
    python benchmarks/rollout_throughput.py --device cuda --model random:qwen2.5-1.5b --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nreft_engine import Engine
from nreft_engine.bench import chat_workload, measure_engine, measure_hf
from nreft_engine.models.loader import DEFAULT_MODEL, load_model

SKIP_RATIOS = (0.0, 0.25, 0.5)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Random-weight models of a real model's shape (the GPU targets need no checkpoint): qwen2 config overrides.
RANDOM_SHAPES = {
    "qwen2.5-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    # a few MB: the GPU suite's CPU check runs every step's code on it in seconds
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2048, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
}


def load(name: str, dtype: torch.dtype, device: str, layers: int | None = None):
    """(model, tokenizer or None): `random:<shape>` builds random weights (no tokenizer), with `layers`
    decoder layers if given."""
    if name.startswith("random:"):
        shape = name.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise SystemExit(f"unknown random shape {shape!r}; known: {', '.join(RANDOM_SHAPES)}")
        torch.manual_seed(0)
        overrides = {} if layers is None else {"num_hidden_layers": layers}
        config = AutoConfig.for_model("qwen2", **{**RANDOM_SHAPES[shape], **overrides})
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        return model, None
    model, tokenizer = load_model(name, dtype=dtype)
    return model.to(device), tokenizer


def workload(tokenizer, num_prompts: int, vocab_size: int) -> list[list[int]]:
    """The chat prompts; without a tokenizer, random ids of the same lengths (33-55 tokens)."""
    if tokenizer is not None:
        return chat_workload(tokenizer, num_prompts)
    gen = torch.Generator().manual_seed(0)
    lengths = [33 + (7 * i) % 23 for i in range(num_prompts)]
    return [torch.randint(0, vocab_size, (length,), generator=gen).tolist() for length in lengths]


def steady_ms_per_step(row: dict, sequences: int) -> float:
    """A measure_engine row's decode ms per step without graph captures (each step decodes every sequence)."""
    return 1e3 * sequences / row["steady_decode_tokens_per_second"]


# engine variants timed beside the default one (skip 0 and 0.25): label -> Engine options
VARIANTS = {"sync": {"async_scheduling": False}, "prepacked": {"prepack_weights": True}}


def run_case(
    model,
    tokenizer,
    dtype_name: str,
    num_prompts: int,
    n: int,
    max_tokens: int,
    variants: tuple[str, ...] = (),
    **engine_options,
) -> list[dict]:
    prompts = workload(tokenizer, num_prompts, model.config.vocab_size)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # a decode step reads each once
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0

    def warm_engine(**options) -> Engine:
        # warm-up on the measured shapes, so no system pays one-time costs in its timing (Triton and cuBLAS
        # kernel selection, the CUDA context's first use); new skip sets still capture their graphs
        engine = Engine(model, tokenizer, kv_cache_memory=1 << 30, **{**engine_options, **options})
        measure_engine(engine, prompts, n, max_tokens=8, skip_ratio=0.0)
        return engine

    engine = warm_engine()
    measure_hf(model, prompts, n, 8, pad)
    rows = [{"system": "hf", **measure_hf(model, prompts, n, max_tokens, pad)}]
    for ratio in SKIP_RATIOS:
        result = measure_engine(engine, prompts, n, max_tokens, ratio)
        rows.append({"system": f"engine skip {ratio}", **result})
    del engine
    for label in variants:
        engine = warm_engine(**VARIANTS[label])
        for ratio in SKIP_RATIOS[:2]:
            result = measure_engine(engine, prompts, n, max_tokens, ratio)
            rows.append({"system": f"{label} skip {ratio}", **result})
        del engine
    for row in rows:
        row.update(dtype=dtype_name, sequences=num_prompts * n, max_tokens=max_tokens, weight_bytes=weights)
        if "steady_decode_tokens_per_second" in row:
            row["steady_decode_ms_per_step"] = steady_ms_per_step(row, num_prompts * n)
        graphs = ""
        if row.get("graph_captures"):
            graphs = f", {row['graph_captures']} graphs in {row['graph_capture_seconds']:.2f} s"
        case = f"{dtype_name} x{num_prompts * n} {row['system']}"
        print(f"  {case}: {row['tokens_per_second']:.1f} tok/s{graphs}", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    """tok/s end to end, and the decode steps' tok/s with and without graph captures ("steady"), each
    with its ratio to the same run's skip 0, and the steady ms per step."""
    def by_case(system: str, field: str) -> dict:
        return {(r["dtype"], r["sequences"]): r[field] for r in rows if r["system"] == system}

    hf = by_case("hf", "tokens_per_second")
    base = by_case("engine skip 0.0", "tokens_per_second")
    base_steady = by_case("engine skip 0.0", "steady_decode_tokens_per_second")
    print(f"{'dtype':9} {'seqs':>4} {'system':18} {'tok/s':>8} {'x HF':>6} {'x skip0':>7} "
          f"{'decode tok/s':>12} {'steady tok/s':>12} {'x skip0':>7} {'ms/step':>7} {'KV MiB':>8} "
          f"{'graphs':>6}")
    for r in rows:
        key = (r["dtype"], r["sequences"])
        if "decode_tokens_per_second" in r:
            steady = r["steady_decode_tokens_per_second"]
            decode = (f"{r['decode_tokens_per_second']:12.1f} {steady:12.1f} "
                      f"{steady / base_steady[key]:7.2f} {r['steady_decode_ms_per_step']:7.3f}")
        else:
            decode = " " * 42
        print(f"{r['dtype']:9} {r['sequences']:>4} {r['system']:18} {r['tokens_per_second']:8.1f} "
              f"{r['tokens_per_second'] / hf[key]:6.2f} {r['tokens_per_second'] / base[key]:7.2f} {decode} "
              f"{r['kv_cache_bytes'] / 2**20:8.1f} {r.get('graph_captures', 0):6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 new tokens instead of 128 (a smoke run)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a load_model name/path, or random:<shape> ({', '.join(RANDOM_SHAPES)})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="64-sequence case in each; batch 1 in the first")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs (the engine's own option)")
    parser.add_argument("--no-async", action="store_true",
                        help="no async scheduling (the engine's own option)")
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="also time skip 0 and 0.25 with async scheduling off ('sync') or with q/k/v and "
                        "gate/up weights fused into copies ('prepacked'; the CPU default where memory "
                        "allows)")
    parser.add_argument("--layers", type=int,
                        help="random:<shape> with this many layers (1: the per-step fixed cost)")
    parser.add_argument("--out",
                        default=os.path.join(os.path.dirname(__file__), "results", "rollout_throughput.json"))
    args = parser.parse_args()
    max_tokens = 8 if args.quick else 128
    rows = []
    for i, dtype_name in enumerate(args.dtypes):
        model, tokenizer = load(args.model, DTYPES[dtype_name], args.device, args.layers)
        options = {"variants": tuple(args.variants), "enforce_eager": args.enforce_eager}
        if args.no_async:
            options["async_scheduling"] = False
        rows += run_case(model, tokenizer, dtype_name, 16, 4, max_tokens, **options)
        if i == 0:
            rows += run_case(model, tokenizer, dtype_name, 1, 1, max_tokens, **options)
        del model
    print_table(rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        if args.device.startswith("cuda"):
            device = torch.cuda.get_device_name()
        else:
            device = platform.processor() or platform.machine()
        json.dump({"machine": device, "model": args.model, "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
