"""Off-policy corrections between the target π_θ (full model) and the behaviour π_β (layer-skipped model).

For a completion token y_t with context c_t, the per-token importance ratio is

    ρ_t = π_θ(y_t | c_t) / π_β(y_t | c_t) = exp(log π_θ − log π_β)

computed with the target's log-probs at rollout time (no gradient). A correction turns ratios into
per-token weights w_t that multiply the policy-gradient term of token t (see objectives.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CORRECTIONS = ("none", "is", "tis", "retrace", "mask", "seq_geo")


@dataclass(frozen=True)
class CorrectionConfig:
    """A correction and its constants: C (tis, seq_geo truncation), λ (retrace), [lo, hi] (mask, seq_geo)."""

    name: str = "tis"
    clip: float = 2.0
    trace_lambda: float = 1.0
    mask_low: float = 0.5
    mask_high: float = 2.0
    seq_mode: str = "truncate"

    def __post_init__(self) -> None:
        if self.name not in CORRECTIONS:
            raise ValueError(f"unknown correction {self.name!r}; valid corrections: {', '.join(CORRECTIONS)}")
        if self.seq_mode not in ("truncate", "mask"):
            raise ValueError(f"seq_geo mode must be 'truncate' or 'mask', got {self.seq_mode!r}")
        if self.clip <= 0 or not 0 < self.trace_lambda <= 1 or not 0 <= self.mask_low <= 1 <= self.mask_high:
            raise ValueError(f"bad correction constants: clip={self.clip} (>0), lambda={self.trace_lambda} "
                             f"(in (0,1]), mask=[{self.mask_low}, {self.mask_high}] (lo <= 1 <= hi)")


def correction_weights(
    log_ratio: torch.Tensor, mask: torch.Tensor, cfg: CorrectionConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights w [B, T] and a bool tensor of tokens the correction clipped or masked.

    `log_ratio` = log π_θ − log π_β [B, T] (padding anywhere where `mask` is False), clamped to ±50 so a token
    the target's filter excludes (log π_θ = −∞) gets weight ≈ 0 instead of NaN. The formulas:

    - none:    w_t = 1                                   (nested samples treated as on-policy)
    - is:      w_t = ρ_t                                 (per-token importance sampling, untruncated)
    - tis:     w_t = min(ρ_t, C)                         (truncated IS: bounded variance, bias where ρ_t > C)
    - retrace: w_t = Π_{s≤t} λ·min(1, ρ_s)               (cumulative truncated trace: a token's weight decays
                                                          after any earlier token the target likes less)
    - mask:    w_t = ρ_t · 1[lo ≤ ρ_t ≤ hi]              (IcePop / masked IS: drop tokens too far off-policy)
    - seq_geo: ρ̄ = exp(mean_t log ρ_t) per sequence;    w_t = min(ρ̄, C) (truncate)
                                                         or ρ̄ · 1[lo ≤ ρ̄ ≤ hi] (mask)
    """
    log_ratio = log_ratio.detach().clamp(-50.0, 50.0).masked_fill(~mask, 0.0)
    ratio = log_ratio.exp()
    none = torch.zeros_like(mask)
    name = cfg.name
    if name == "none":
        return torch.ones_like(ratio), none
    if name == "is":
        return ratio, none
    if name == "tis":
        return ratio.clamp(max=cfg.clip), (ratio > cfg.clip) & mask
    if name == "retrace":
        trace = cfg.trace_lambda * ratio.clamp(max=1.0)
        return trace.cumprod(dim=1), (ratio < 1.0) & mask
    if name == "mask":
        keep = (ratio >= cfg.mask_low) & (ratio <= cfg.mask_high)
        return ratio * keep, ~keep & mask
    counts = mask.sum(dim=1).clamp(min=1)
    seq_ratio = (log_ratio.sum(dim=1) / counts).exp()[:, None].expand_as(ratio)
    if cfg.seq_mode == "truncate":
        return seq_ratio.clamp(max=cfg.clip), (seq_ratio > cfg.clip) & mask
    keep = (seq_ratio >= cfg.mask_low) & (seq_ratio <= cfg.mask_high)
    return seq_ratio * keep, ~keep & mask


def ratio_stats(log_ratio: torch.Tensor, mask: torch.Tensor, corrected: torch.Tensor) -> dict[str, float]:
    """Mean/min/max ρ, effective sample size fraction (Σρ)²/(N·Σρ²), fraction corrected, KL(π_β‖π_θ) (k3)."""
    lr = log_ratio.detach().clamp(-50.0, 50.0)[mask]
    if lr.numel() == 0:
        return {}
    ratio = lr.exp().double()
    return {
        "ratio_mean": ratio.mean().item(),
        "ratio_min": ratio.min().item(),
        "ratio_max": ratio.max().item(),
        "ess_fraction": (ratio.sum() ** 2 / (ratio.numel() * (ratio**2).sum())).item(),
        "frac_corrected": corrected[mask].float().mean().item(),
        # k3 with samples from β: E_β[ρ − 1 − log ρ] = KL(π_β ‖ π_θ), non-negative per sample
        "kl_behaviour_target": (ratio - 1 - lr.double()).mean().item(),
    }
