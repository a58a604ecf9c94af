"""The trainer's skip sets: a fixed skip ratio, or (`skip_ratio="auto"`) a count of skipped layers that a
SkipController moves after each step to hold the importance weights' ESS fraction near a target."""

from __future__ import annotations

import math

from nreft_engine.skip import LayerPlan, SkipPolicy

AUTO = "auto"
ESS_KEY = "ess_fraction"  # the key of corrections.ratio_stats that the controller reads


class SkipController:
    """The number of skipped layers, moved one layer at a time to hold the ESS fraction near `target_ess`.

    After each step `update(ess)`: ESS > target + band (the behaviour model is closer to the target than
    needed) -> one more layer; ESS < target - band -> one fewer; inside the band, or no ESS (NaN / None: no
    group was trained) -> hold. The count stays within [min_layers, max_layers]. The band is the hysteresis:
    a count is kept as long as its ESS stays within the band.
    """

    def __init__(self, target_ess: float, band: float = 0.05, min_layers: int = 0, max_layers: int = 0,
                 start: int | None = None):
        if not 0 < target_ess <= 1:
            raise ValueError(f"target_ess must be in (0, 1], got {target_ess!r}")
        if not 0 <= band < 1:
            raise ValueError(f"band must be in [0, 1), got {band!r}")
        if not 0 <= min_layers <= max_layers:
            raise ValueError(f"need 0 <= min_layers <= max_layers, got {min_layers}, {max_layers}")
        self.target_ess, self.band = float(target_ess), float(band)
        self.min_layers, self.max_layers = int(min_layers), int(max_layers)
        self.count = self._clamp(max(min_layers, 1) if start is None else start)
        self.updates = 0

    def _clamp(self, count: int) -> int:
        return min(max(int(count), self.min_layers), self.max_layers)

    def update(self, ess: float | None) -> int:
        """Move the count by the step's ESS fraction (class docstring); returns the next step's count."""
        if ess is not None and not math.isnan(ess):
            if ess > self.target_ess + self.band:
                self.count = self._clamp(self.count + 1)
            elif ess < self.target_ess - self.band:
                self.count = self._clamp(self.count - 1)
        self.updates += 1
        return self.count

    def state_dict(self) -> dict:
        return {"count": self.count, "updates": self.updates, "target_ess": self.target_ess,
                "band": self.band, "min_layers": self.min_layers, "max_layers": self.max_layers}

    def load_state_dict(self, state: dict) -> None:
        """Restore the count (checked against this controller's [min_layers, max_layers]) and update count."""
        count = int(state["count"])
        if count != self._clamp(count):
            raise ValueError(f"saved skip count {count} is outside [{self.min_layers}, {self.max_layers}]")
        self.count, self.updates = count, int(state.get("updates", 0))


def draw_plan(num_layers: int, count: int, protect_first: int, protect_last: int, seed: int) -> LayerPlan:
    """`count` skipped layers, drawn by the SkipPolicy whose ratio asks for exactly `count` (round(count / L
    * L) is `count`), so a fixed-ratio run and an adaptive one at the same count skip the same layers."""
    return SkipPolicy(count / num_layers, protect_first, protect_last, seed=seed).plan(num_layers)


class StepSkips:
    """What the trainer skips at each step, from its config: `config.skip_ratio` of the layers, or with
    "auto" the count of a SkipController (checkpointed with the trainer, see `stateful`)."""

    def __init__(self, config, num_layers: int):
        self.config, self.num_layers = config, num_layers
        self.controller = None
        if config.skip_ratio != AUTO:
            # a skip ratio the model's layers cannot take fails here, before any evaluation
            config.skip_policy(config.skip_ratio, config.seed).num_skipped(num_layers)
            return
        eligible = max(0, num_layers - config.protect_first - config.protect_last)
        limit = min(eligible, num_layers - 1)  # a plan cannot skip every layer
        low = config.min_skip_layers or 0
        if low > limit:
            raise ValueError(f"min_skip_layers={low}: the model has only {limit} skippable layers "
                             f"({num_layers} layers, protect_first={config.protect_first}, "
                             f"protect_last={config.protect_last})")
        high = limit if config.max_skip_layers is None else min(config.max_skip_layers, limit)
        band = 0.05 if config.ess_band is None else config.ess_band
        self.controller = SkipController(config.target_ess, band, low, high, start=low or 1)

    def plan(self, seed: int):
        """The step's skip spec for `Engine.generate` (a policy drawn with `seed`, a LayerPlan or None)."""
        cfg = self.config
        if self.controller is None:
            return cfg.skip_policy(cfg.skip_ratio, seed) if cfg.skip_ratio > 0 else None
        return draw_plan(self.num_layers, self.controller.count, cfg.protect_first, cfg.protect_last, seed)

    def observe(self, record: dict) -> None:
        """After a step: move the controller's count by the step record's ESS fraction."""
        if self.controller is not None:
            self.controller.update(record.get(ESS_KEY))

    def stateful(self) -> dict:
        """The objects a checkpoint saves and restores (their state_dict / load_state_dict), by name."""
        return {} if self.controller is None else {"skip_controller": self.controller}
