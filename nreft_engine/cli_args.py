"""Command-line options of the `nreft` subcommands that load a model: the model, dtype, KV-cache budget."""

from __future__ import annotations

import argparse
import re

import torch

from nreft_engine.cache import available_memory
from nreft_engine.models.loader import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)", re.IGNORECASE)
_FRACTION = re.compile(r"\d*\.\d+|\d+\.")
_MIN_BARE_BYTES = 2**20  # a bare integer below this is more likely a mistyped fraction ("1") than bytes
KV_CACHE_HELP = (
    "KV-cache budget: a fraction of the free memory, written with a decimal point (0.1; 1.0 = all of it), "
    "or a size: an integer number of bytes (at least 1 MiB: a bare 1 is refused as ambiguous) or a number "
    "with a unit (512MiB, 2GB; KiB/MiB/GiB/TiB or KB/MB/GB/TB). Default: %(default)s"
)


def kv_cache_memory(text: str) -> float | int:
    """Parse --kv-cache-memory (see KV_CACHE_HELP) as the Engine takes it: a float fraction or int bytes;
    bytes beyond the memory available now are refused (the CLI's engines run on the CPU)."""
    text = text.strip()
    if _FRACTION.fullmatch(text):
        value = float(text)
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(
                f"{text}: a fraction of the free memory must be in (0, 1]; give bytes as an integer or with "
                "a unit (512MiB, 2GB)")
        return value
    if text.isdigit():
        size = int(text)
        if size < _MIN_BARE_BYTES:
            raise argparse.ArgumentTypeError(
                f"{text} reads as bytes, too few for a KV cache; write a fraction with a decimal point "
                "(1.0 = all the free memory, 0.1) or a size with a unit (512MiB, 2GB)")
    elif match := _SIZE.fullmatch(text):
        size = int(float(match[1]) * _UNITS[match[2].lower()])
    else:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a fraction of the free memory (0.1, 1.0) nor a size (512MiB, 2GB, or an "
            "integer number of bytes)")
    free = available_memory(torch.device("cpu"))
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text}: the budget must be positive")
    if size > free:
        raise argparse.ArgumentTypeError(f"{text} asks for {_readable(size)} of memory but "
                                         f"{_readable(free)} is available")
    return size


def _readable(size: int) -> str:
    unit = next(u for u in ("TiB", "GiB", "MiB", "KiB", "B") if size >= _UNITS[u.lower()] or u == "B")
    return f"{size / _UNITS[unit.lower()]:.1f} {unit}" if unit != "B" else f"{size} bytes"


def add_model_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """Add --model, --dtype (unless `dtype` is False: the subcommand fixes it) and --kv-cache-memory."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF dir, GGUF file or hub id")
    if dtype:
        parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--kv-cache-memory", type=kv_cache_memory, default=0.1, help=KV_CACHE_HELP)
