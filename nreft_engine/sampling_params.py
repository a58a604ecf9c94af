"""SamplingParams: how to sample completions, with vLLM's field names and meanings (imports nothing else)."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field, fields
from typing import Any


def as_int(value: Any, what: str) -> int:
    """`value` as an int if it is a Python, NumPy or torch integer (not a bool); else TypeError naming it."""
    if not isinstance(value, bool) and "bool" not in str(getattr(value, "dtype", "")):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class SamplingParams:
    """How to sample completions, with vLLM's field names and meanings.

    `temperature=0` is greedy. `top_k <= 0` (vLLM uses -1) keeps every token. `logprobs=N` also returns
    the N most likely alternatives per step. The behaviour log-prob of every sampled token is always
    returned: it is the log-prob under the exact distribution the token was drawn from. Every field is
    checked on construction and on each later assignment (a bad value raises and changes nothing).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False)  # derived from `stop`

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        for name, value in _checked(values).items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if "stop_strings" not in self.__dict__:  # still in the dataclass __init__: __post_init__ checks
            object.__setattr__(self, name, value)
            return
        if name == "stop_strings":
            raise AttributeError("stop_strings is derived from stop; assign stop instead")
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if name in values:
            values[name] = value
        for key, checked in _checked(values).items():
            object.__setattr__(self, key, checked)
        if name not in values:
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _checked(v: dict[str, Any]) -> dict[str, Any]:
    """The fields in `v`, type- and range-checked and normalized (numbers to int/float, lists copied), plus
    the derived `stop_strings`; TypeError / ValueError naming the first bad value."""
    out = {name: as_int(v[name], name) for name in ("n", "top_k", "max_tokens", "min_tokens")}
    out.update({name: _as_float(v[name], name) for name in ("temperature", "top_p", "min_p")})
    _require(out["n"] >= 1, f"n must be an integer >= 1, got {out['n']!r}")
    _require(out["temperature"] >= 0 and math.isfinite(out["temperature"]),
             f"temperature must be finite and >= 0 (0 = greedy), got {out['temperature']!r}")
    _require(0 < out["top_p"] <= 1, f"top_p must be in (0, 1], got {out['top_p']!r}")
    _require(0 <= out["min_p"] <= 1, f"min_p must be in [0, 1], got {out['min_p']!r}")
    _require(out["max_tokens"] >= 1, f"max_tokens must be an integer >= 1, got {out['max_tokens']!r}")
    _require(0 <= out["min_tokens"] <= out["max_tokens"],
             f"min_tokens must be in [0, max_tokens={out['max_tokens']}], got {out['min_tokens']!r}")
    if not isinstance(v["ignore_eos"], bool):
        raise TypeError(f"ignore_eos must be True or False, got {v['ignore_eos']!r}")
    out["ignore_eos"] = v["ignore_eos"]
    out["seed"] = None if v["seed"] is None else as_int(v["seed"], "seed")
    out["logprobs"] = None if v["logprobs"] is None else as_int(v["logprobs"], "logprobs")
    _require(out["logprobs"] is None or out["logprobs"] >= 0,
             f"logprobs must be None or an integer >= 0, got {out['logprobs']!r}")
    out["stop"], out["stop_strings"] = _checked_stop(v["stop"])
    ids = [as_int(t, "each of stop_token_ids") for t in _as_list(v["stop_token_ids"], "stop_token_ids")]
    _require(all(t >= 0 for t in ids), f"stop_token_ids must be token ids >= 0, got {v['stop_token_ids']!r}")
    out["stop_token_ids"] = ids
    return out


def _as_list(value: Any, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{what} must be a list, got {value!r} ({type(value).__name__})")
    return list(value)


def _checked_stop(stop: Any) -> tuple[str | list[str] | None, tuple[str, ...]]:
    """(`stop` as stored: a str, a copied list or None; the stop strings)."""
    stops = [stop] if isinstance(stop, str) else _as_list(stop, "stop (a str or a list of str)")
    if not all(isinstance(s, str) for s in stops):
        raise TypeError(f"stop must be a str or a list of str, got {stop!r}")
    _require(all(stops), f"stop strings must be non-empty, got {stop!r}")
    return (stop if isinstance(stop, str) or stop is None else stops), tuple(stops)
