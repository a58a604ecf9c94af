"""Which decoder layers run for a batch: SkipPolicy draws a LayerPlan; the plan maps layers to cache slots."""

from __future__ import annotations

import random
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
    """

    ratio: float
    protect_first: int = 1
    protect_last: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"skip ratio must be in [0, 1), got {self.ratio!r}")
        if self.protect_first < 0 or self.protect_last < 0:
            raise ValueError(
                f"protect_first/protect_last must be >= 0, got {self.protect_first}, {self.protect_last}"
            )
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
        return LayerPlan(num_layers, tuple(rng.sample(self.eligible(num_layers), count)))


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
