"""Helpers shared by the tests/test_kernels_*.py files (Triton kernels vs their torch references)."""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable

import torch

# Acceptance tolerances (relative): fp32 1e-5, bf16 2e-2.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Elementwise |out - ref| <= tol * (|ref| + max|ref|): relative to each element and to the tensor's
    scale (so near-zero elements of a well-scaled output do not demand impossible precision). NaN fails."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    if out.numel() == 0:
        return
    o, r = out.double(), ref.double()
    assert not torch.isnan(o).any(), "output has NaN (unwritten elements?)"
    tol = REL_TOL[dtype]
    scale = r.abs().max().clamp_min(1e-30)
    err = (o - r).abs()
    bound = tol * (r.abs() + scale)
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"max error {err.max().item():.3e} exceeds {tol:g} relative (ratio {worst:.2f})"


def run_on_device(fn: Callable, device: str) -> Callable:
    """`fn` run on copies of its CPU tensor arguments on `device`: in-place updates are copied back into
    the arguments, an output that is an argument comes back as that argument, other outputs on the CPU.
    Calls with no CPU tensor (an engine running on the device, a CUDA-graph capture) pass straight through."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if not any(isinstance(x, torch.Tensor) and x.device.type == "cpu" for x in (*args, *kwargs.values())):
            return fn(*args, **kwargs)  # already on the device (the engine's own calls): untouched
        pairs = []

        def to_device(x):
            if isinstance(x, torch.Tensor) and x.device.type == "cpu":
                pairs.append((x, x.to(device)))
                return pairs[-1][1]
            return x

        out = fn(*[to_device(a) for a in args], **{k: to_device(v) for k, v in kwargs.items()})
        torch.cuda.synchronize()
        originals = {id(d): x for x, d in pairs}
        for x, d in pairs:
            x.copy_(d)

        def to_cpu(o):
            if isinstance(o, torch.Tensor):
                return originals[id(o)] if id(o) in originals else o.cpu()
            return tuple(to_cpu(i) for i in o) if isinstance(o, tuple) else o

        return to_cpu(out)

    return wrapped


class _PoisonTorch(types.ModuleType):
    """A stand-in for `torch` inside a kernel module: empty/empty_like return NaN-filled (float) or
    sentinel-filled (integer) tensors, so any output element a kernel forgets to write fails the test."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t: torch.Tensor) -> torch.Tensor:
        if t.dtype.is_floating_point:
            return t.fill_(float("nan"))
        return t.fill_(-123456789 if t.dtype != torch.bool else True)

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@contextlib.contextmanager
def poisoned_outputs(module):
    """Within the block, every torch.empty / torch.empty_like in `module` is poisoned."""
    saved = module.torch
    module.torch = _PoisonTorch()
    try:
        yield
    finally:
        module.torch = saved


def random_block_tables(
    batch: int, context_lens: list[int], page: int, num_blocks: int, gen: torch.Generator, pad_to: int = 0
) -> torch.Tensor:
    """int32 [batch, width] tables drawing distinct physical blocks in random (non-contiguous) order;
    rows are padded with 0 past each sequence's blocks (as the cache contract says)."""
    need = [-(-c // page) for c in context_lens]
    width = max(max(need), pad_to)
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(batch, width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n].int()
        used += n
    return table
