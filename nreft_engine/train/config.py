"""The settings of a training run, whose defaults are also the `nreft train` options' defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from nreft_engine import SamplingParams, SkipPolicy
from nreft_engine.train.corrections import CorrectionConfig
from nreft_engine.train.data import INSTRUCTION
from nreft_engine.train.objectives import ObjectiveConfig


@dataclass
class TrainConfig:
    """Everything a run depends on besides the model, the task and the reward functions.

    The defaults are the README's main job: `nreft train` takes its options' defaults from here.
    """

    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 12
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    skip_ratio: float = 0.034
    protect_first: int = 4
    protect_last: int = 4
    lr: float = 3e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    eval_every: int = 0
    eval_max_tokens: int = 12
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    chunk_size: int = 1024
    system_prompt: str = INSTRUCTION

    def sampling_params(self, seed: int, ignore_eos: bool = False) -> SamplingParams:
        """How rollouts sample: G completions per prompt with the configured temperature and filters."""
        return SamplingParams(
            n=self.group_size, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, max_tokens=self.max_tokens, seed=seed, ignore_eos=ignore_eos,
        )

    def skip_policy(self, ratio: float, seed: int) -> SkipPolicy:
        """The behaviour model: skip `ratio` of the layers, never the protected first and last ones."""
        return SkipPolicy(ratio, self.protect_first, self.protect_last, seed=seed)
