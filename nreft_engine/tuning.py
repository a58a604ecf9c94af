"""Speed defaults measured on the machine that runs, not assumed from another: which CPU linear wins at a
few rows. The same choice differs between CPUs of one instruction set (on an AMX Xeon oneDNN's bf16 beats
the small-batch kernel from one row; on a Zen 4 the kernel wins up to 4), so each process times it once.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable

import torch

from nreft_engine.kernels import cpu as cpu_kernels

logger = logging.getLogger(__name__)

SMALL_BATCH_ROWS_ENV = "NREFT_SMALL_BATCH_ROWS"  # pins the cutoff (e.g. for runs compared across processes)
_CANDIDATE_ROWS = (1, 2, 4, 8, 16)
_TIMED_SHAPE = (2048, 768)  # [out, in]: a mid-sized projection (8 MB in fp32)


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def small_batch_rows(dtype: torch.dtype) -> int:
    """Most rows for which the small-batch kernel beats oneDNN here at `dtype` (0: oneDNN from one row), timed
    once per process, dtype and kernel ISA (about 10 ms), or pinned by NREFT_SMALL_BATCH_ROWS."""
    pinned = os.environ.get(SMALL_BATCH_ROWS_ENV)
    if pinned is not None:
        if not pinned.isdigit():
            raise ValueError(f"{SMALL_BATCH_ROWS_ENV}={pinned!r}: must be a whole number of rows (0 or more)")
        return int(pinned)
    return _timed_small_batch_rows(dtype, cpu_kernels.isa())


@functools.cache
def _timed_small_batch_rows(dtype: torch.dtype, isa: str) -> int:
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(_TIMED_SHAPE, generator=gen) / 32).to(dtype)
    packed = cpu_kernels.pack_linear_weight(weight, small_batch_rows=0)
    rows16_only = packed._replace(onednn=None)
    cutoff = 0
    for rows in _CANDIDATE_ROWS:
        x = torch.randn(rows, _TIMED_SHAPE[1], generator=gen).to(dtype)
        kernel = best_time(lambda: cpu_kernels.linear_packed(x, rows16_only))
        onednn = best_time(lambda: cpu_kernels.linear_packed(x, packed))
        if kernel >= onednn:
            break
        cutoff = rows
    logger.info("CPU linears (%s, kernels %s), timed: %s", str(dtype).removeprefix("torch."), isa,
                describe_small_batch(cutoff))
    return cutoff


def describe_small_batch(rows: int) -> str:
    """Which linear runs at which row count, for log lines."""
    if rows == 0:
        return "oneDNN from one row"
    return f"the small-batch kernel up to {rows} rows, oneDNN beyond"
