"""GRPO-family objectives: group advantages, PPO clipping, off-policy weights, optional KL to a reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nreft_engine.train.corrections import CorrectionConfig, correction_weights

AGGREGATIONS = ("token", "sequence")
# log-probs of tokens the target's filter excludes are −∞; the floor keeps PPO ratios finite (weight ≈ 0)
_LOGPROB_FLOOR = -1e4


@dataclass(frozen=True)
class ObjectiveConfig:
    """GRPO (scale_std=True) or Dr.GRPO (False); loss aggregation; PPO clip range; KL coefficient β."""

    scale_std: bool = True
    aggregation: str = "token"
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_beta: float = 0.0

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown loss aggregation {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
            )
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0 and self.kl_beta >= 0):
            raise ValueError(f"need 0 <= eps_low < 1, eps_high >= 0, kl_beta >= 0; got {self}")


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """A = r − mean(group), divided by the group's std for GRPO (not Dr.GRPO). rewards [P, G] -> [P, G]."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


def loss_normalizer(mask: torch.Tensor, aggregation: str) -> float:
    """What the whole batch's loss is divided by: its token count (token) or its sequence count (sequence)."""
    return float(mask.sum()) if aggregation == "token" else float(mask.shape[0])


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    objective: ObjectiveConfig,
    correction: CorrectionConfig,
    normalizer: float,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped, off-policy-weighted policy-gradient loss of a micro-batch, divided by `normalizer`.

    Per token: ℓ_t = −w_t · min(r_t·A, clip(r_t, 1−ε_low, 1+ε_high)·A) + β·k3_t, where r_t = π_θ/π_θ_old
    (PPO ratio, 1 in the first epoch), w_t the correction weight from ρ_t = π_θ_old/π_β, and
    k3_t = exp(ref − logp) − (ref − logp) − 1. Tensors are [B, T] (advantages [B]).
    Returns (loss, the correction's log-ratio [B, T], bool tokens it clipped or masked).
    """
    logp = logp.clamp(min=_LOGPROB_FLOOR)
    old_logp = old_logp.clamp(min=_LOGPROB_FLOOR)
    log_ratio = old_logp - behaviour_logp
    weights, corrected = correction_weights(log_ratio, mask, correction)
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - objective.eps_low, 1 + objective.eps_high)
    per_token = -weights * torch.minimum(ratio * adv, clipped * adv)
    if objective.kl_beta > 0 and ref_logp is not None:
        diff = ref_logp.clamp(min=_LOGPROB_FLOOR) - logp
        per_token = per_token + objective.kl_beta * (diff.exp() - diff - 1)
    per_token = per_token.masked_fill(~mask, 0.0)
    if objective.aggregation == "token":
        total = per_token.sum()
    else:
        total = (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    return total / normalizer, log_ratio, corrected
