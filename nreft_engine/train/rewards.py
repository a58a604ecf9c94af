"""Verifiable rewards. A reward function has TRL's signature:

    fn(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns) -> list[float]

where `columns` holds per-sample dataset columns (here `answer`). Users bring their own as `module:function`.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

from nreft_engine.train.data import last_boxed

RewardFn = Callable[..., Sequence[float]]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(completion: str) -> str | None:
    """A completion's final answer: after GSM8K's '####', else the last \\boxed{}, else the last number."""
    if "####" in completion:
        numbers = _NUMBER.findall(completion.split("####")[-1])
        return numbers[0].replace(",", "") if numbers else None
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(completion)
    return numbers[-1].replace(",", "") if numbers else None


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def numeric_match(prompts, completions, completion_ids, answer, **columns) -> list[float]:
    """1.0 where the completion's final answer equals the reference number (within 1e-6 relative), else 0."""
    rewards = []
    for completion, ref in zip(completions, answer):
        got, want = extract_answer(completion), _as_number(str(ref))
        value = _as_number(got) if got is not None else None
        ok = value is not None and want is not None and math.isclose(value, want, rel_tol=1e-6, abs_tol=1e-9)
        rewards.append(1.0 if ok else 0.0)
    return rewards


def math_verify_reward(prompts, completions, completion_ids, answer, **columns) -> list[float]:
    """1.0 where math-verify finds the completion's answer equivalent to the reference (LaTeX aware)."""
    from math_verify import parse, verify

    rewards = []
    for completion, ref in zip(completions, answer):
        gold = parse(f"${ref}$")
        guess = parse(completion)
        rewards.append(1.0 if gold and guess and verify(gold, guess) else 0.0)
    return rewards


BUILTIN_REWARDS: dict[str, RewardFn] = {"numeric": numeric_match, "math_verify": math_verify_reward}


def resolve_reward(spec: str) -> RewardFn:
    """A built-in reward by name, or a user's callable given as 'package.module:function', imported (and so
    run) from the current folder or the installed packages, as `python -m` would find it."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown reward {spec!r}: use one of {', '.join(BUILTIN_REWARDS)} or 'module:function'"
        )
    module_name, attr = spec.split(":", 1)
    if not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected 'module:function'")
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(
            f"reward {spec!r}: no module named {err.name!r} in {cwd} or the installed packages"
        ) from err
    finally:
        sys.path.remove(cwd)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TypeError(f"reward {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def compute_rewards(
    fns: Sequence[RewardFn],
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
    **columns: list,
) -> list[float]:
    """Sum of the reward functions per completion; each must return one finite float per completion."""
    total = [0.0] * len(completions)
    for fn in fns:
        values = list(fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns))
        name = getattr(fn, "__name__", repr(fn))
        if len(values) != len(completions):
            raise ValueError(
                f"reward function {name} returned {len(values)} values for {len(completions)} completions"
            )
        for i, v in enumerate(values):
            if v is None or not math.isfinite(float(v)):
                raise ValueError(
                    f"reward function {name} returned {v!r} for completion {i}; rewards must be finite"
                )
            total[i] += float(v)
    return total
