"""C++ CPU kernels (nreft_engine._C) vs their torch references at SmolLM2-135M decode shapes.

Batches 1, 64 and 256 (BATCHES=64 or BATCHES=1,256 picks others), contexts 180..220, 9 query / 3 kv heads
of 64, block size 16, hidden 576, intermediate 1536, vocabulary 49152. The sampler runs at temperature 1
without filters (the RL case) and with top-p 0.9, and filtered (temperature 0.7, top-k 50, top-p 0.9, min-p
0.05), over logits 4 * N(0, 1): flatter than a model's, so top-p's boundary often lies within the
reference's rounding, which the kernel then reproduces by sorting most of the row.

The matmuls run as one decode step's worth (30 layers of fused q/k/v, o, fused gate/up, down, and the
tied lm_head): `F.linear` over the plain weights against `kernels.cpu.linear_packed` over their packed copies
(the small-batch kernel up to the row count timed as its win on this CPU, oneDNN beyond).

Both variants run in the same process, interleaved round by round (shared machines drift), each round
timing about 20 ms of calls, and the best round counts. THREADS sets torch's thread count (default 1: the
most stable numbers on a busy machine); CPUTIME=1 measures thread CPU time instead of wall time (single
thread only).

    python benchmarks/kernels/cpu_decode_step.py
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from nreft_engine import ops
from nreft_engine.kernels import cpu
from nreft_engine.kernels.activation import silu_and_mul_reference
from nreft_engine.kernels.paged_attention import paged_decode_attention_reference
from nreft_engine.kernels.rms_norm import rms_norm_reference
from nreft_engine.kernels.rope import rope_cos_sin, rope_write_kv_reference
from nreft_engine.kernels.sampler import sample_reference

CLOCK = time.thread_time if os.environ.get("CPUTIME") == "1" else time.perf_counter
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1,64,256").split(",")]


def best_of(fns: dict, rounds: int = 7, seconds: float = 0.02) -> dict:
    """The best time per call (us) of each function, over rounds that each time about `seconds` of calls."""
    reps = {}
    for k, f in fns.items():
        t = CLOCK()
        f()
        reps[k] = max(1, round(seconds / max(CLOCK() - t, 1e-6)))
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            t = CLOCK()
            for _ in range(reps[k]):
                f()
            best[k] = min(best[k], (CLOCK() - t) / reps[k] * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    print(f"threads {torch.get_num_threads()}, isa {cpu.isa()}, clock {CLOCK.__name__}")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for batch in BATCHES:
            run(dtype, batch, gen)


def run(dtype: torch.dtype, batch: int, gen: torch.Generator) -> None:
    heads, kv_heads, dim, page, hidden, inter, vocab, layers = 9, 3, 64, 16, 576, 1536, 49152, 30
    ctxs = torch.randint(180, 221, (batch,), generator=gen).tolist()
    need = [-(-c // page) for c in ctxs]
    num_blocks = sum(need) + 64
    kc = torch.randn(num_blocks, page, kv_heads, dim, generator=gen).to(dtype)
    vc = torch.randn(num_blocks, page, kv_heads, dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(batch, max(need), dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):  # random, non-contiguous physical blocks
        tables[b, :n] = perm[used : used + n].int()
        used += n
    lens = torch.tensor(ctxs, dtype=torch.int32)
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    x = torch.randn(batch, hidden, generator=gen).to(dtype)
    w = torch.randn(hidden, generator=gen).to(dtype)
    res = torch.randn(batch, hidden, generator=gen).to(dtype)
    gate = torch.randn(batch, inter, generator=gen).to(dtype)
    up = torch.randn(batch, inter, generator=gen).to(dtype)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)  # the fused projection
    rope_args = (
        *(t.view(batch, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)),
        lens.long() - 1,
        *rope_cos_sin(256, dim),
        kc,
        vc,
        torch.randperm(num_blocks * page, generator=gen)[:batch],
    )
    logits = (4 * torch.randn(batch, vocab, generator=gen)).to(dtype)
    ones, no_top_k, no_min_p = torch.ones(batch), torch.zeros(batch, dtype=torch.int64), torch.zeros(batch)
    plain = (ones, no_top_k, ones, no_min_p)
    top_p = (ones, no_top_k, torch.full((batch,), 0.9), no_min_p)
    filtered = (
        torch.full((batch,), 0.7),
        torch.full((batch,), 50, dtype=torch.int64),
        torch.full((batch,), 0.9),
        torch.full((batch,), 0.05),
    )
    uniform = torch.rand(batch, generator=gen)
    shapes = [
        (hidden + 2 * kv_heads * dim, hidden), (hidden, heads * dim), (2 * inter, hidden), (hidden, inter)
    ]
    weights = [
        (torch.randn(o, i, generator=gen) / 32).to(dtype) for o, i in shapes * layers + [(vocab, hidden)]
    ]
    packed = [ops.prepare_linear_weight(w) for w in weights]
    inputs = {i: torch.randn(batch, i, generator=gen).to(dtype) for _, i in shapes}
    cases = [  # (name, reference, C++, calls per decode step)
        (
            "paged_decode_attention",
            lambda: paged_decode_attention_reference(q, kc, vc, tables, lens, 0.125),
            lambda: cpu.paged_decode_attention_cpu(q, kc, vc, tables, lens, 0.125),
            layers,
        ),
        (
            "rms_norm (+residual)",
            lambda: rms_norm_reference(x, w, 1e-5, res),
            lambda: cpu.rms_norm_cpu(x, w, 1e-5, res),
            2 * layers + 1,
        ),
        (
            "silu_and_mul",
            lambda: silu_and_mul_reference(gate, up),
            lambda: cpu.silu_and_mul_cpu(gate, up),
            layers,
        ),
        (
            "rope_write_kv",
            lambda: rope_write_kv_reference(*rope_args),
            lambda: cpu.rope_write_kv_cpu(*rope_args),
            layers,
        ),
        (
            "sample (plain)",
            lambda: sample_reference(logits, *plain, uniform),
            lambda: cpu.sample_cpu(logits, *plain, uniform),
            1,
        ),
        (
            "sample (top-p 0.9)",
            lambda: sample_reference(logits, *top_p, uniform),
            lambda: cpu.sample_cpu(logits, *top_p, uniform),
            1,
        ),
        (
            "sample (filtered)",
            lambda: sample_reference(logits, *filtered, uniform),
            lambda: cpu.sample_cpu(logits, *filtered, uniform),
            1,
        ),
        (
            "linears (whole model)",
            lambda: [F.linear(inputs[w.shape[1]], w) for w in weights],
            lambda: [cpu.linear_packed(inputs[w.shape[1]], p) for w, p in zip(weights, packed)],
            1,
        ),
    ]
    with torch.inference_mode():
        for name, ref, cpp, calls in cases:
            t = best_of({"ref": ref, "cpp": cpp})
            print(
                f"{dtype!s:15} B={batch:<4} {name:24} ref {t['ref']:9.1f} us   C++ {t['cpp']:8.1f} us"
                f"   x{t['ref'] / t['cpp']:5.1f}   per 30-layer step {t['ref'] * calls / 1e3:7.2f}"
                f" -> {t['cpp'] * calls / 1e3:6.2f} ms"
            )


if __name__ == "__main__":
    main()
