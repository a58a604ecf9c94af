"""Command-line options of the `nreft` subcommands that load a model: the model, dtype, KV-cache budget."""

from __future__ import annotations

import argparse

import torch

from nreft_engine.models.loader import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_cache_memory(text: str) -> float | int:
    """Parse --kv-cache-memory as the Engine takes it: a fraction of free memory (<= 1) or bytes (an int)."""
    value = float(text)
    return value if value <= 1 else int(value)


def add_model_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """Add --model, --dtype (unless `dtype` is False: the subcommand fixes it) and --kv-cache-memory."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF dir, GGUF file or hub id")
    if dtype:
        parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--kv-cache-memory", type=kv_cache_memory, default=0.1,
                        help="fraction of free memory (<=1) or bytes")
