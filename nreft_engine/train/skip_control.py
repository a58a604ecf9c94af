"""The trainer's skip sets: a fixed skip ratio, or (`skip_ratio="auto"`) a count of skipped layers that a
SkipController moves after each step to hold the importance weights' ESS fraction near a target; drawn
uniformly, or (`skip_importance`) weighted towards the layers of least measured importance."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from nreft_engine.train.config import DEFAULT_TARGET_ESS
from nreft_engine.train.data import Task, batch_at, render_prompts

AUTO = "auto"
ESS_KEY = "ess_fraction"  # the key of corrections.ratio_stats that the controller reads
RETRY_WAIT = 8  # steps before a count whose ESS fell below the band is tried again (doubling per failure)
IMPORTANCE_PROMPTS = 64  # calibration prompts of the layer importance when importance_prompts is None
IMPORTANCE_JUMP = 2.0  # with importance: no layer more than this many times as important as those skipped
IMPORTANCE_FLOOR = 1e-3  # importances under this fraction of the largest are equal (an identity's fp noise)


def importance_ceiling(importance: list[float], eligible: list[int], jump: float = IMPORTANCE_JUMP) -> int:
    """The most layers an importance-weighted count may rise to: the eligible layers in order of importance,
    cut before the first one more than `jump` times as important as the one before it (values under
    IMPORTANCE_FLOOR of the largest count as that floor).

    The ESS of c layers says nothing about a layer that changes the residual stream far more than any of
    them (for an identity layer, about 0: any other layer), so the controller does not try it.
    """
    values = sorted(importance[i] for i in eligible)
    floor = IMPORTANCE_FLOOR * max(values, default=0.0)
    return next((c for c in range(1, len(values)) if values[c] > jump * max(values[c - 1], floor)),
                len(values))


class SkipController:
    """The number of skipped layers, moved one layer at a time to hold the ESS fraction near `target_ess`.

    After each step `update(ess)`: ESS > target + band (the behaviour model is closer to the target than
    needed) -> one more layer; ESS < target - band -> one fewer; inside the band, or no ESS (NaN / None: no
    group was trained) -> hold. The count stays within [min_layers, max_layers]. Two hysteresis rules keep it
    from oscillating: a count is kept as long as its ESS stays within the band; and a count whose ESS fell
    below the band is not tried again for `retry_wait` steps, twice as many after each further failure of
    it, until its ESS holds. So where the ESS jumps across the band from count c (fine) to c + 1 (far off),
    the count settles on c, with ever rarer single steps at c + 1. `update`'s `ceiling` (importance_ceiling,
    where the skip sets follow the layers' importance) caps the rises.
    """

    def __init__(self, target_ess: float, band: float = 0.05, min_layers: int = 0, max_layers: int = 0,
                 start: int | None = None, retry_wait: int = RETRY_WAIT):
        if not 0 < target_ess <= 1:
            raise ValueError(f"target_ess must be in (0, 1], got {target_ess!r}")
        if not 0 <= band < 1:
            raise ValueError(f"band must be in [0, 1), got {band!r}")
        if not 0 <= min_layers <= max_layers:
            raise ValueError(f"need 0 <= min_layers <= max_layers, got {min_layers}, {max_layers}")
        if retry_wait < 1:
            raise ValueError(f"retry_wait must be >= 1 step, got {retry_wait!r}")
        self.target_ess, self.band, self.retry_wait = float(target_ess), float(band), int(retry_wait)
        self.min_layers, self.max_layers = int(min_layers), int(max_layers)
        self.count = self._clamp(max(min_layers, 1) if start is None else start)
        self.updates = 0
        self.failed: int | None = None  # the last count whose ESS fell below the band, until its ESS holds
        self.wait, self.retry_at = 0, 0  # its current wait, and the update from which it may be tried

    def _clamp(self, count: int) -> int:
        return min(max(int(count), self.min_layers), self.max_layers)

    def update(self, ess: float | None, ceiling: int | None = None) -> int:
        """Move the count by the step's ESS fraction (class docstring), rising no higher than `ceiling` (if
        given); returns the next step's count."""
        if ess is not None and not math.isnan(ess):
            if ess < self.target_ess - self.band:
                self.wait = 2 * self.wait if self.failed == self.count else self.retry_wait
                self.failed, self.retry_at = self.count, self.updates + self.wait
                self.count = self._clamp(self.count - 1)
            else:
                if self.failed is not None and self.count >= self.failed:
                    self.failed = None  # the count that failed holds now
                below_ceiling = ceiling is None or self.count < ceiling
                if ess > self.target_ess + self.band and below_ceiling and self._may_rise():
                    self.count = self._clamp(self.count + 1)
        self.updates += 1
        return self.count

    def _may_rise(self) -> bool:
        """Whether one more layer is allowed: not within the wait after a failure."""
        return self.failed is None or self.updates >= self.retry_at

    def state_dict(self) -> dict:
        return {"count": self.count, "updates": self.updates, "target_ess": self.target_ess,
                "band": self.band, "min_layers": self.min_layers, "max_layers": self.max_layers,
                "failed": self.failed, "wait": self.wait, "retry_at": self.retry_at}

    def load_state_dict(self, state: dict) -> None:
        """Restore the count (checked against this controller's [min_layers, max_layers]), the update count
        and the retry state."""
        count = int(state["count"])
        if count != self._clamp(count):
            raise ValueError(f"saved skip count {count} is outside [{self.min_layers}, {self.max_layers}]")
        self.count, self.updates = count, int(state.get("updates", 0))
        self.failed = state.get("failed")
        self.wait, self.retry_at = int(state.get("wait", 0)), int(state.get("retry_at", 0))


class LayerImportance:
    """The importance vector the skip sets are drawn by (`skip_importance`): `measure()` before the first
    step and again every `every` steps (0: never again); checkpointed, so a resumed run draws the same
    sets."""

    def __init__(self, measure: Callable[[], list[float]], every: int):
        self.measure, self.every = measure, every
        self.values: list[float] | None = None
        self.step: int | None = None  # the number of steps done when it was measured

    def refresh(self, step: int) -> dict | None:
        """Measure, with `step` steps done, if it is due; returns the metrics record of a measurement."""
        if self.values is not None and not (self.every and step % self.every == 0 and step != self.step):
            return None
        start = time.perf_counter()
        self.values, self.step = [float(v) for v in self.measure()], step
        return {"type": "importance", "step": step, "layer_importance": self.values,
                "importance_s": time.perf_counter() - start}

    def state_dict(self) -> dict:
        return {"values": self.values, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.step = state["values"], state["step"]


class StepSkips:
    """What the trainer skips at each step, from its config: `config.skip_ratio` of the layers, or with
    "auto" the count of a SkipController; with `skip_importance` drawn by the layers' importance, measured
    by `engine` on the first `importance_prompts` train prompts of `task` (state: see `stateful`)."""

    def __init__(self, config, engine, tokenizer, task: Task):
        self.config, self.num_layers = config, engine.num_layers
        self.controller = self.importance = None
        if config.skip_importance and config.skip_ratio != 0:
            count = min(config.importance_prompts or IMPORTANCE_PROMPTS, len(task.train))
            prompts = render_prompts(tokenizer, batch_at(task, 0, count, config.seed), config.system_prompt)
            self.importance = LayerImportance(lambda: engine.layer_importance(prompts),
                                              config.importance_every or 0)
        if config.skip_ratio != AUTO:
            # a skip ratio the model's layers cannot take fails here, before any evaluation
            config.skip_policy(config.skip_ratio, config.seed).num_skipped(self.num_layers)
            return
        self.controller = _controller(config, self.num_layers)

    def refresh(self, step: int, write: Callable[[dict], None]) -> None:
        """With `step` steps done and the next to run: measure the layer importance if it is due, and
        `write` its metrics record."""
        if self.importance is not None and step < self.config.steps:
            if (record := self.importance.refresh(step)) is not None:
                write(record)

    def plan(self, seed: int):
        """The step's skip spec for `Engine.generate` (a policy drawn with `seed`, a LayerPlan or None)."""
        cfg = self.config
        importance = None if self.importance is None else self.importance.values
        if self.controller is None:
            return cfg.skip_policy(cfg.skip_ratio, seed, importance) if cfg.skip_ratio > 0 else None
        # the ratio count / L asks for exactly `count` layers (round(count / L * L) is count): a fixed-ratio
        # run and an adaptive one at the same count skip the same layers
        ratio = self.controller.count / self.num_layers
        return cfg.skip_policy(ratio, seed, importance).plan(self.num_layers)

    def observe(self, record: dict) -> None:
        """After a step: move the controller's count by the step record's ESS fraction, with importance no
        higher than its importance_ceiling."""
        if self.controller is None:
            return
        ceiling = None
        if self.importance is not None and self.importance.values is not None:
            eligible = self.config.skip_policy(0.0, self.config.seed).eligible(self.num_layers)
            ceiling = importance_ceiling(self.importance.values, eligible)
        self.controller.update(record.get(ESS_KEY), ceiling)

    def stateful(self) -> dict:
        """The objects a checkpoint saves and restores (their state_dict / load_state_dict), by name."""
        state = {"skip_controller": self.controller, "skip_importance": self.importance}
        return {name: obj for name, obj in state.items() if obj is not None}


def _controller(config, num_layers: int) -> SkipController:
    """The SkipController of an "auto" config, its [min, max] checked against the model's skippable layers."""
    eligible = max(0, num_layers - config.protect_first - config.protect_last)
    limit = min(eligible, num_layers - 1)  # a plan cannot skip every layer
    low = config.min_skip_layers or 0
    if low > limit:
        raise ValueError(f"min_skip_layers={low}: the model has only {limit} skippable layers "
                         f"({num_layers} layers, protect_first={config.protect_first}, "
                         f"protect_last={config.protect_last})")
    high = limit if config.max_skip_layers is None else min(config.max_skip_layers, limit)
    band = 0.05 if config.ess_band is None else config.ess_band
    target = DEFAULT_TARGET_ESS if config.target_ess is None else config.target_ess
    return SkipController(target, band, low, high, start=low or 1)
