"""What the verl backend reads from verl's rollout config, and verl's per-request sampling dict.

Engine options and the skip policy come from `actor_rollout_ref.rollout.engine_kwargs.nreft` (set with
`+actor_rollout_ref.rollout.engine_kwargs.nreft.<key>=<value>`), on top of the defaults taken from the
rollout config itself (max_num_seqs, max_num_batched_tokens, max_model_len, dtype, enforce_eager).
"""

from __future__ import annotations

from typing import Any

import torch

from nreft_engine.sampling_params import SamplingParams
from nreft_engine.skip import SkipPolicy, SkipSpec

# engine_kwargs.nreft keys: Engine keyword arguments, then the skip policy's
ENGINE_KEYS = ("kv_cache_memory", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
               "prepack_weights", "enforce_eager", "async_scheduling", "batch_invariant")
SKIP_KEYS = ("skip_ratio", "skip_layers", "protect_first", "protect_last", "skip_seed")
# verl's sampling dict key -> SamplingParams field (None: checked, not passed on)
SAMPLING_KEYS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "max_tokens": "max_tokens", "max_new_tokens": "max_tokens", "min_tokens": "min_tokens",
    "stop": "stop", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos", "seed": "seed",
    "repetition_penalty": None, "logprobs": None,
}


def nreft_kwargs(config: Any) -> dict[str, Any]:
    """The `engine_kwargs.nreft` mapping of a rollout config, checked for unknown keys."""
    kwargs = dict((getattr(config, "engine_kwargs", None) or {}).get("nreft") or {})
    unknown = sorted(set(kwargs) - set(ENGINE_KEYS) - set(SKIP_KEYS) - {"dtype"})
    if unknown:
        raise ValueError(
            f"unknown rollout.engine_kwargs.nreft keys {unknown}; known: {sorted(ENGINE_KEYS + SKIP_KEYS)} "
            "and dtype"
        )
    return kwargs


def engine_options(config: Any) -> dict[str, Any]:
    """`Engine` keyword arguments from the rollout config, overridden by `engine_kwargs.nreft`."""
    max_model_len = config.max_model_len or config.prompt_length + config.response_length
    options: dict[str, Any] = {
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_model_len": max_model_len,
        "enforce_eager": config.enforce_eager,
    }
    kwargs = nreft_kwargs(config)
    options.update((k, v) for k, v in kwargs.items() if k in ENGINE_KEYS)
    return options


def model_dtype(config: Any) -> torch.dtype:
    """The engine's dtype: `engine_kwargs.nreft.dtype`, else the rollout's `dtype` (float32 on the CPU,
    where the CPU kernels run float32 and bfloat16 only)."""
    name = str(nreft_kwargs(config).get("dtype") or config.dtype).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"rollout dtype {name!r} is not a torch dtype (e.g. bfloat16, float16, float32)")
    return dtype


def skip_spec(config: Any) -> SkipSpec:
    """The rollout's skip setting: a SkipPolicy from `skip_ratio` (a fresh set per global step, from
    `skip_seed`, protecting `protect_first` / `protect_last` layers), fixed `skip_layers`, or None."""
    kwargs = nreft_kwargs(config)
    if kwargs.get("skip_layers") is not None:
        if kwargs.get("skip_ratio"):
            raise ValueError("set either engine_kwargs.nreft.skip_ratio or skip_layers, not both")
        return list(kwargs["skip_layers"])
    if not kwargs.get("skip_ratio"):
        return None
    return SkipPolicy(
        ratio=float(kwargs["skip_ratio"]),
        protect_first=int(kwargs.get("protect_first", 1)),
        protect_last=int(kwargs.get("protect_last", 1)),
        seed=int(kwargs.get("skip_seed", 0)),
    )


def sampling_params(values: dict[str, Any], default_max_tokens: int) -> SamplingParams:
    """SamplingParams from verl's sampling dict (one sample per request); unknown keys and values the
    engine does not support raise a ValueError naming them."""
    unknown = sorted(set(values) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"unsupported sampling params {unknown}; the nreft rollout takes {sorted(SAMPLING_KEYS)}"
        )
    penalty = values.get("repetition_penalty", 1.0)
    if penalty not in (None, 1.0):
        raise ValueError(f"repetition_penalty={penalty} is not supported by the nreft rollout; use 1.0")
    fields = {SAMPLING_KEYS[k]: v for k, v in values.items() if SAMPLING_KEYS[k] and v is not None}
    fields.setdefault("max_tokens", default_max_tokens)
    return SamplingParams(n=1, **fields)
