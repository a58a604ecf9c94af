"""Rollout throughput measurement shared by `nreft bench` and benchmarks/rollout_throughput.py."""

from __future__ import annotations

import os
import platform
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nreft_engine import Engine, SamplingParams, SkipPolicy
from nreft_engine.cache import kv_cache_bytes
from nreft_engine.chat import chat_prompt_ids

QUESTIONS = [
    "What is 17 + 25? Explain step by step.",
    "A farmer has 12 cows and buys 7 more. How many cows does he have?",
    "Write a short poem about the sea.",
    "If a train travels 60 km in one hour, how far does it go in 3 hours?",
    "What is the capital of France, and why is it famous?",
    "Tom has 3 apples and eats one. How many are left?",
    "Explain what a prime number is.",
    "What is 9 times 8?",
    "Give me three tips for studying math.",
    "Sara reads 15 pages a day. How many pages does she read in a week?",
    "Why is the sky blue?",
    "What is 144 divided by 12?",
    "Describe a cat in two sentences.",
    "A shop sells pens for 2 dollars each. How much do 6 pens cost?",
    "What is the difference between weather and climate?",
    "Solve for x: 2x + 6 = 14.",
]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for results that must name their machine."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def chat_workload(tokenizer: PreTrainedTokenizerBase, num_prompts: int) -> list[list[int]]:
    """The first `num_prompts` questions (cycled) as chat-templated token ids."""
    return [chat_prompt_ids(tokenizer, QUESTIONS[i % len(QUESTIONS)]) for i in range(num_prompts)]


def measure_engine(
    engine: Engine, prompts: list[list[int]], n: int, max_tokens: int, skip_ratio: float, seed: int = 0
) -> dict:
    """Generate with EOS ignored (exactly n x max_tokens tokens per prompt); return tokens/s and KV bytes."""
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=seed)
    skip = SkipPolicy(skip_ratio, seed=seed) if skip_ratio > 0 else None
    start = time.perf_counter()
    engine.generate(prompts, params, skip=skip)
    seconds = time.perf_counter() - start
    stats = engine.last_stats
    steady = stats.decode_seconds - stats.graph_capture_seconds
    return {
        "tokens": stats.generated_tokens,
        "seconds": seconds,
        "tokens_per_second": stats.generated_tokens / seconds,
        "decode_tokens_per_second": (
            stats.decode_tokens / stats.decode_seconds if stats.decode_seconds else 0.0
        ),
        # the decode steps alone: graph captures (a new skip set's, inside its first steps) taken out
        "steady_decode_tokens_per_second": stats.decode_tokens / steady if steady > 0 else 0.0,
        "kv_cache_bytes": stats.kv_cache_bytes,
        "num_blocks": stats.num_blocks,
        "skipped_layers": list(stats.skipped_layers),
        "peak_running": stats.peak_running,
        "graph_captures": stats.graph_captures,
        "graph_capture_seconds": stats.graph_capture_seconds,
    }


def left_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` as one left-padded batch for HF `generate`: (input_ids, attention_mask), [rows, longest]."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return input_ids, mask


@torch.inference_mode()
def measure_hf(
    model: PreTrainedModel,
    prompts: list[list[int]],
    n: int,
    max_tokens: int,
    pad_token_id: int,
    seed: int = 0,
) -> dict:
    """HF `generate` on the same workload: left-padded batch of every prompt repeated n times, EOS ignored."""
    rows = [p for p in prompts for _ in range(n)]
    input_ids, mask = (t.to(model.device) for t in left_padded(rows, pad_token_id))
    width = input_ids.shape[1]
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=pad_token_id,
    )
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * len(rows)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes = kv_cache_bytes(config.num_hidden_layers, len(rows) * out.shape[1], config.num_key_value_heads,
                              head_dim, next(model.parameters()).element_size())
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "kv_cache_bytes": kv_bytes}
