"""The settings of a training run, whose defaults are also the `nreft train` options' defaults."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from nreft_engine import SamplingParams, SkipPolicy
from nreft_engine.train.corrections import CorrectionConfig
from nreft_engine.train.data import INSTRUCTION
from nreft_engine.train.objectives import ObjectiveConfig


@dataclass
class TrainConfig:
    """Everything a run depends on besides the model, the task and the reward functions.

    The defaults are the README's main job: `nreft train` takes its options' defaults from here. It saves a
    checkpoint every 5 steps (about 2.5 s each for the 135M model), so a killed run loses at most 4 steps.
    """

    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 12
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    skip_ratio: float | str = "auto"  # a SkipController holds target_ess (train/skip_control.py), or a ratio
    protect_first: int = 4
    protect_last: int = 4
    target_ess: float | None = None  # the adaptive skip count's settings: None unless "auto"; None: 0.6
    ess_band: float | None = None  # None: 0.05
    min_skip_layers: int | None = None  # None: 0 (the first step skips 1 layer)
    max_skip_layers: int | None = None  # None: every eligible layer
    skip_importance: bool = True  # draw skip sets weighted by measured layer importance (skip_control.py)
    skip_temperature: float | None = None  # its settings: None unless skip_importance; None: 0.1
    importance_every: int | None = None  # None: 0 (measured before the first step only)
    importance_prompts: int | None = None  # None: 64 calibration prompts
    lr: float = 3e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    eval_every: int = 0
    eval_max_tokens: int = 12
    save_every: int = 5
    keep_checkpoints: int = 2
    background_save: bool = False  # checkpoints written by a thread while the run goes on (checkpoint.py)
    seed: int = 0
    chunk_size: int = 1024
    update_path: str = "packed"  # or "per-group": the earlier update phase, kept to compare (train/update.py)
    max_update_tokens: int = 2048  # packed: prompt and completion tokens of the groups run in one forward
    head_memory_mb: int = 512  # packed: LM-head logits kept for backward up to this; past it, recomputed
    update_dtype: str = "float32"  # packed: "bfloat16" autocasts the update's forwards (fp32 master weights)
    system_prompt: str = INSTRUCTION

    def check(self, cli: bool = False) -> None:
        """Raise a ValueError naming the first setting out of its range (as its `nreft train` option if
        `cli`), so a bad value fails before anything is loaded."""
        for f in fields(self):
            if f.name in _LIMITS and not _LIMITS[f.name][0](value := getattr(self, f.name)):
                name = f"--{f.name.replace('_', '-')} {value!r}" if cli else f"{f.name}={value!r}"
                raise ValueError(f"{name}: {_LIMITS[f.name][1]}")
        self._check_auto(cli)
        self._check_importance(cli)

    def _check_auto(self, cli: bool) -> None:
        """The adaptive skip count's settings go with skip_ratio="auto", which needs target_ess."""
        def name(key: str) -> str:
            return _option(key, cli)

        auto = {k: getattr(self, k) for k in _AUTO_FIELDS}
        if self.skip_ratio != "auto":
            for key, value in auto.items():
                if value is not None:
                    raise ValueError(f"{name(key)} {value!r}: only with {name('skip_ratio')} auto")
            return
        low, high = self.min_skip_layers or 0, self.max_skip_layers
        if high is not None and high < low:
            raise ValueError(f"{name('max_skip_layers')} {high!r}: must be >= "
                             f"{name('min_skip_layers')} {low}")

    def _check_importance(self, cli: bool) -> None:
        """The layer importance's settings go with skip_importance (unused when no layer is skipped)."""
        if not self.skip_importance:
            for key in _IMPORTANCE_FIELDS:
                if (value := getattr(self, key)) is not None:
                    raise ValueError(f"{_option(key, cli)} {value!r}: only with "
                                     f"{_option('skip_importance', cli)}")

    def sampling_params(self, seed: int, ignore_eos: bool = False) -> SamplingParams:
        """How rollouts sample: G completions per prompt with the configured temperature and filters."""
        return SamplingParams(
            n=self.group_size, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, max_tokens=self.max_tokens, seed=seed, ignore_eos=ignore_eos,
        )

    def skip_policy(self, ratio: float, seed: int, importance: list[float] | None = None) -> SkipPolicy:
        """The behaviour model: skip `ratio` of the layers, never the protected first and last ones; drawn
        uniformly, or weighted by `importance` at skip_temperature."""
        temperature = DEFAULT_SKIP_TEMPERATURE if self.skip_temperature is None else self.skip_temperature
        return SkipPolicy(ratio, self.protect_first, self.protect_last, seed=seed, importance=importance,
                          temperature=temperature)


def _option(key: str, cli: bool) -> str:
    """A setting's name as its `nreft train` option if `cli`, else as the field."""
    return f"--{key.replace('_', '-')}" if cli else key


def _integer(low: int, why: str = "") -> tuple[Callable[[object], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
            f"must be an integer >= {low}{why}")


def _optional(check: tuple[Callable[[object], bool], str]) -> tuple[Callable[[object], bool], str]:
    return (lambda v: v is None or check[0](v)), check[1]


def _real(test: Callable[[float], bool], requirement: str) -> tuple[Callable[[object], bool], str]:
    def ok(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and test(v)

    return ok, requirement


# the main job's measured best (README, Main job results): hold an ESS fraction of 0.6, skipping the least
# important layers
DEFAULT_TARGET_ESS = 0.6
DEFAULT_SKIP_TEMPERATURE = 0.1
UPDATE_PATHS = ("packed", "per-group")
UPDATE_DTYPES = ("float32", "bfloat16")
_AUTO_FIELDS = ("target_ess", "ess_band", "min_skip_layers", "max_skip_layers")
_IMPORTANCE_FIELDS = ("skip_temperature", "importance_every", "importance_prompts")
# field -> (test, what a valid value is); the objective and correction configs check themselves
_LIMITS: dict[str, tuple[Callable[[object], bool], str]] = {
    "steps": _integer(1),
    "prompts_per_step": _integer(1),
    "group_size": _integer(2, ": GRPO learns from the reward differences within a group"),
    "max_tokens": _integer(1),
    "temperature": _real(lambda v: v > 0, "must be > 0: greedy samples of a group would all be the same"),
    "top_p": _real(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": _integer(0, " (0 keeps every token)"),
    "min_p": _real(lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "skip_ratio": (lambda v: v == "auto" or _real(lambda r: 0 <= r < 1, "")[0](v),
                   "must be in [0, 1), or auto"),
    "protect_first": _integer(0),
    "protect_last": _integer(0),
    "target_ess": _optional(_real(lambda v: 0 < v <= 1, "must be in (0, 1]")),
    "ess_band": _optional(_real(lambda v: 0 <= v < 1, "must be in [0, 1)")),
    "min_skip_layers": _optional(_integer(0)),
    "max_skip_layers": _optional(_integer(0)),
    "skip_importance": (lambda v: isinstance(v, bool), "must be True or False"),
    "skip_temperature": _optional(_real(lambda v: v > 0, "must be > 0")),
    "importance_every": _optional(_integer(0, " (0: before the first step only)")),
    "importance_prompts": _optional(_integer(1)),
    "lr": _real(lambda v: v > 0, "must be > 0"),
    "weight_decay": _real(lambda v: v >= 0, "must be >= 0"),
    "warmup_steps": _integer(0),
    "grad_clip": _real(lambda v: v > 0, "must be > 0 (a clip of 0 zeroes every gradient)"),
    "ppo_epochs": _integer(1, " (0 epochs train nothing)"),
    "eval_every": _integer(0, " (0: before and after only)"),
    "eval_max_tokens": _integer(1),
    "save_every": _integer(0, " (0: at the end only)"),
    "keep_checkpoints": _integer(0, " (0 keeps all)"),
    "seed": _integer(0),
    "chunk_size": _integer(1),
    "update_path": (lambda v: v in UPDATE_PATHS, f"must be one of {', '.join(UPDATE_PATHS)}"),
    "max_update_tokens": _integer(1),
    "head_memory_mb": _integer(0, " (0: always recompute the LM head in backward)"),
    "update_dtype": (lambda v: v in UPDATE_DTYPES, f"must be one of {', '.join(UPDATE_DTYPES)}"),
    "system_prompt": (lambda v: isinstance(v, str), "must be a string"),
}
