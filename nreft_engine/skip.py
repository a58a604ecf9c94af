"""Which decoder layers run for a batch: SkipPolicy draws a LayerPlan; the plan maps layers to cache slots."""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from typing import Sequence, Union

from nreft_engine.sampling_params import as_int


@dataclass(frozen=True)
class LayerPlan:
    """The layers one `generate` call runs. A skipped layer is the identity on the residual stream."""

    num_layers: int
    skipped: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "skipped", tuple(as_int(i, "each skipped layer id") for i in self.skipped))
        bad = [i for i in self.skipped if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"skipped layer ids {bad} are outside [0, {self.num_layers})")
        if len(set(self.skipped)) != len(self.skipped):
            raise ValueError(f"skipped layer ids repeat: {list(self.skipped)}")
        if len(self.skipped) >= self.num_layers:
            raise ValueError(f"cannot skip all {self.num_layers} layers")
        object.__setattr__(self, "skipped", tuple(sorted(self.skipped)))

    @property
    def active_layers(self) -> tuple[int, ...]:
        """Layer ids that run, in order; position i is the layer's KV-cache slot."""
        skipped = set(self.skipped)
        return tuple(i for i in range(self.num_layers) if i not in skipped)

    @property
    def num_active(self) -> int:
        return self.num_layers - len(self.skipped)


@dataclass
class SkipPolicy:
    """Skip round(ratio * L) layers drawn at random for each `generate` call (Nested-ReFT's behaviour model).

    The first `protect_first` and last `protect_last` layers are never skipped. The draws come from a
    generator seeded once with `seed`, so a run is reproducible and every call gets a fresh skip set.

    Without `importance` the eligible layers are equally likely (`random.sample`). With `importance` (one
    value >= 0 per layer, e.g. `Engine.layer_importance`) the skip set is drawn without replacement, one layer
    after another, each with probability proportional to exp(-importance_i / (temperature * m)) among the
    eligible layers not yet drawn, m the mean importance of the eligible layers (all weights equal if m is 0):
    temperature -> 0 skips the `count` least important layers, temperature -> inf is uniform.
    """

    ratio: float
    protect_first: int = 1
    protect_last: int = 1
    seed: int | None = None
    importance: Sequence[float] | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"skip ratio must be in [0, 1), got {self.ratio!r}")
        if self.protect_first < 0 or self.protect_last < 0:
            raise ValueError(
                f"protect_first/protect_last must be >= 0, got {self.protect_first}, {self.protect_last}"
            )
        if self.importance is not None:
            self.importance = _check_importance(self.importance)
        if not self.temperature > 0:  # also NaN
            raise ValueError(f"skip temperature must be > 0 (inf: uniform), got {self.temperature!r}")
        self._rng = random.Random(self.seed)
        self._key_seed = self.seed if self.seed is not None else random.SystemRandom().getrandbits(62)

    def eligible(self, num_layers: int) -> list[int]:
        """Layer ids that may be skipped."""
        return list(range(self.protect_first, num_layers - self.protect_last))

    def num_skipped(self, num_layers: int) -> int:
        """round(ratio * L), checked against the eligible layers."""
        count = round(self.ratio * num_layers)
        eligible = self.eligible(num_layers)
        if count > len(eligible):
            raise ValueError(
                f"skip ratio {self.ratio} asks for {count} of {num_layers} layers but only {len(eligible)} "
                f"are eligible (protect_first={self.protect_first}, protect_last={self.protect_last})"
            )
        return count

    def plan(self, num_layers: int) -> LayerPlan:
        """Draw the next skip set."""
        return self._draw(self._rng, num_layers)

    def plan_for(self, num_layers: int, *key: int) -> LayerPlan:
        """The skip set of `key` (e.g. a training step and a rank), drawn from the seed and the key alone: the
        same key always gets the same set, whatever was drawn before (a trainer resumed mid-run, many
        ranks)."""
        return self._draw(random.Random(repr((self._key_seed, *key))), num_layers)

    def _draw(self, rng: random.Random, num_layers: int) -> LayerPlan:
        count = self.num_skipped(num_layers)
        if self.importance is None:
            return LayerPlan(num_layers, tuple(rng.sample(self.eligible(num_layers), count)))
        return LayerPlan(num_layers, self._weighted_sample(rng, num_layers, count))

    def _weighted_sample(self, rng: random.Random, num_layers: int, count: int) -> tuple[int, ...]:
        """`count` eligible layers drawn by the importance rule (class docstring) as Gumbel-top-k: the `count`
        largest log-weight + Gumbel noise, the same distribution as drawing one layer after another."""
        if len(self.importance) != num_layers:
            raise ValueError(
                f"SkipPolicy.importance has {len(self.importance)} values; the model has {num_layers} layers"
            )
        eligible = self.eligible(num_layers)
        mean = sum(self.importance[i] for i in eligible) / max(len(eligible), 1)
        keys = {}
        for i in eligible:
            log_weight = -(self.importance[i] / mean) / self.temperature if mean > 0 else 0.0
            keys[i] = log_weight - math.log(-math.log(max(rng.random(), sys.float_info.min)))
        return tuple(sorted(eligible, key=keys.__getitem__, reverse=True)[:count])


def _check_importance(importance) -> tuple[float, ...]:
    """`importance` as a tuple of floats, each finite and >= 0."""
    if isinstance(importance, (str, bytes)) or not hasattr(importance, "__iter__"):
        raise TypeError(f"SkipPolicy.importance must be a sequence of floats, got {importance!r}")
    if hasattr(importance, "tolist"):  # a tensor or an array
        importance = importance.tolist()
    values = tuple(float(x) for x in importance)
    bad = [(i, x) for i, x in enumerate(values) if not (math.isfinite(x) and x >= 0)]
    if bad:
        raise ValueError(f"SkipPolicy.importance must be finite and >= 0; got (layer, value) {bad[:5]}")
    return values


SkipSpec = Union[SkipPolicy, LayerPlan, Sequence[int], None]


def resolve_plan(skip: SkipSpec, num_layers: int) -> LayerPlan:
    """Turn what a caller passed as `skip` (policy, plan, explicit layer ids or None) into a LayerPlan."""
    if skip is None:
        return LayerPlan(num_layers)
    if isinstance(skip, SkipPolicy):
        return skip.plan(num_layers)
    if isinstance(skip, LayerPlan):
        if skip.num_layers != num_layers:
            raise ValueError(f"LayerPlan is for {skip.num_layers} layers, the model has {num_layers}")
        return skip
    if isinstance(skip, (str, bytes)) or not hasattr(skip, "__iter__"):
        raise TypeError(
            f"skip must be a SkipPolicy, a LayerPlan, a list of layer ids or None, got {skip!r} "
            f"({type(skip).__name__})"
        )
    return LayerPlan(num_layers, tuple(skip))
