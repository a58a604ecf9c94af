"""C++ CPU kernels (nreft_engine._C) vs their torch references at SmolLM2-135M decode shapes.

Batch 64, contexts 180..220, 9 query / 3 kv heads of 64, block size 16, hidden 576, intermediate 1536.
Both variants run in the same process, interleaved round by round (shared machines drift), and the best
round counts. THREADS sets torch's thread count (default 1: the most stable numbers on a busy machine);
CPUTIME=1 measures thread CPU time instead of wall time (single thread only).

    python benchmarks/kernels/cpu_decode_step.py
"""

from __future__ import annotations

import os
import time

import torch
from nreft_engine.kernels import cpu
from nreft_engine.kernels.activation import silu_and_mul_reference
from nreft_engine.kernels.paged_attention import paged_decode_attention_reference
from nreft_engine.kernels.rms_norm import rms_norm_reference

CLOCK = time.thread_time if os.environ.get("CPUTIME") == "1" else time.perf_counter


def best_of(fns: dict, reps: int, rounds: int = 7) -> dict:
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            t = CLOCK()
            for _ in range(reps):
                f()
            best[k] = min(best[k], (CLOCK() - t) / reps * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    print(f"threads {torch.get_num_threads()}, isa {cpu.isa()}, clock {CLOCK.__name__}")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        run(dtype, gen)


def run(dtype: torch.dtype, gen: torch.Generator) -> None:
    batch, heads, kv_heads, dim, page, hidden, inter, layers = 64, 9, 3, 64, 16, 576, 1536, 30
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
    cases = [  # (name, reference, C++, calls per decode step)
        (
            "paged_decode_attention",
            lambda: paged_decode_attention_reference(q, kc, vc, tables, lens, 0.125),
            lambda: cpu.paged_decode_attention_cpu(q, kc, vc, tables, lens, 0.125),
            layers,
            20,
        ),
        (
            "rms_norm (+residual)",
            lambda: rms_norm_reference(x, w, 1e-5, res),
            lambda: cpu.rms_norm_cpu(x, w, 1e-5, res),
            2 * layers + 1,
            300,
        ),
        (
            "silu_and_mul",
            lambda: silu_and_mul_reference(gate, up),
            lambda: cpu.silu_and_mul_cpu(gate, up),
            layers,
            300,
        ),
    ]
    with torch.inference_mode():
        for name, ref, cpp, calls, reps in cases:
            t = best_of({"ref": ref, "cpp": cpp}, reps)
            print(
                f"{dtype!s:15} {name:24} ref {t['ref']:9.1f} us   C++ {t['cpp']:8.1f} us   x{t['ref'] / t['cpp']:5.1f}"
                f"   per 30-layer step {t['ref'] * calls / 1e3:6.2f} -> {t['cpp'] * calls / 1e3:5.2f} ms"
            )


if __name__ == "__main__":
    main()
