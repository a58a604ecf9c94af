"""The update phase: PPO epochs of the corrected GRPO loss over a rollout, in micro-batches of groups.

The packed path (default) runs as many prompt groups per forward as fit `max_update_tokens`, each group one
masked row (`packed_logprobs`), keeps the LM head's logits for backward within `head_memory_mb`, clips
the gradient norm with foreach kernels, steps a fused AdamW and can autocast to bfloat16. The per-group
path is the earlier update phase (one group per micro-batch, prompt and completions in two forwards, the LM
head always recomputed in backward, per-parameter clipping and AdamW), kept to compare against: both
compute the same loss and gradients.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.graph import increment_version

from nreft_engine.train.config import TrainConfig
from nreft_engine.train.corrections import ratio_stats
from nreft_engine.train.logprobs import LogitFilter, batch_logprobs, packed_logprobs
from nreft_engine.train.objectives import group_advantages, loss_normalizer, policy_loss


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameters: fused (one kernel for all of them) on the packed path.

    A fused step does not move the parameters' version counters: `Updater` moves them itself.
    """
    fused = {"fused": True} if config.update_path == "packed" else {"foreach": False}
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fused)


def micro_batches(costs: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive indices of `costs` packed greedily so each batch's total is <= max_tokens; an item that
    alone exceeds it gets a batch of its own."""
    batches: list[list[int]] = []
    total = 0
    for i, cost in enumerate(costs):
        if batches and total + cost <= max_tokens:
            batches[-1].append(i)
            total += cost
        else:
            batches.append([i])
            total = cost
    return batches


def _pad(rows: list) -> torch.Tensor:
    """Right-pad a list of 1-D tensors or float lists into a [B, T] fp32 tensor (zeros past each row)."""
    rows = [r if isinstance(r, torch.Tensor) else torch.tensor(r, dtype=torch.float32) for r in rows]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0.0)


def _widen(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


class Updater:
    """Takes the optimizer steps of one rollout's update phase on `model` (and its LR schedule's steps).

    After a fused optimizer step (which writes the parameters without moving their version counters) it
    moves the counters, so the engine re-packs its weight copies at the next rollout, as after any step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: TrainConfig,
        filt: LogitFilter,
        reference: torch.nn.Module | None = None,
    ):
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.config, self.filter, self.reference = config, filt, reference
        self.fused = bool(optimizer.defaults.get("fused"))
        packed = config.update_path == "packed"
        if config.update_dtype != "float32" and not packed:
            raise ValueError(f"update_dtype={config.update_dtype!r} needs update_path='packed' (the "
                             f"per-group path is the earlier fp32 update)")
        self.max_tokens = config.max_update_tokens if packed else 0  # 0: one group per micro-batch
        self.keep_bytes = config.head_memory_mb << 20 if packed else 0
        self.autocast_dtype = torch.bfloat16 if packed and config.update_dtype == "bfloat16" else None
        self.group_logprobs = packed_logprobs if packed else batch_logprobs

    def _logprobs(self, model: torch.nn.Module, groups: list) -> list[torch.Tensor]:
        """Every completion's log-probs of the groups, in order (autocast if configured)."""
        device = next(model.parameters()).device
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            per_group = self.group_logprobs(model, groups, self.filter, self.config.chunk_size,
                                            self.keep_bytes)
        return [lp.float() for group in per_group for lp in group]

    def __call__(self, prompt_ids: list[list[int]], completions: list[list[list[int]]],
                 behaviour_logprobs: list[list[list[float]]], rewards: torch.Tensor) -> dict:
        """PPO epochs over the groups whose advantages are not all 0 (all of them with a KL term); returns
        the loss and gradient norm of the first epoch, the counts, and the ratio statistics."""
        cfg = self.config
        advantages = group_advantages(rewards, cfg.objective.scale_std)
        masks = [_pad([[1.0] * len(c) for c in group]).bool() for group in completions]
        normalizer = sum(loss_normalizer(m, cfg.objective.aggregation) for m in masks)
        # a group whose advantages are all 0 has no policy gradient; without a KL term it can be skipped
        active = [i for i in range(len(masks)) if cfg.objective.kl_beta > 0 or advantages[i].abs().max() > 0]
        costs = [len(prompt_ids[i]) + sum(len(c) for c in completions[i]) for i in active]
        batches = [[active[k] for k in batch] for batch in micro_batches(costs, self.max_tokens)]
        old: dict[int, torch.Tensor] = {}
        ref: dict[int, torch.Tensor] = {}
        stats_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        losses, grad_norms, tokens = [], [], 0
        for epoch in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for b, batch in enumerate(batches):
                groups = [(prompt_ids[i], completions[i]) for i in batch]
                logp = _pad(self._logprobs(self.model, groups))
                mask = _pad([[1.0] * len(c) for i in batch for c in completions[i]]).bool()
                if epoch == 0:
                    old[b] = logp.detach()
                    if self.reference is not None:
                        with torch.no_grad():
                            ref[b] = _pad(self._logprobs(self.reference, groups))
                behaviour = _pad([row for i in batch for row in behaviour_logprobs[i]])
                loss, log_ratio, corrected = policy_loss(
                    logp, old[b], behaviour, advantages[batch].flatten(), mask, cfg.objective,
                    cfg.correction, normalizer, ref.get(b),
                )
                loss.backward()
                total += loss.item()
                tokens += int(mask.sum())
                if epoch == 0:
                    stats_parts.append((log_ratio, mask, corrected))
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip,
                                                  foreach=True if self.fused else None)
            grad_norms.append(float(norm))
            self.optimizer.step()  # a no-op without gradients; keeps the schedule tied to the step count
            if self.fused:
                increment_version([p for group in self.optimizer.param_groups for p in group["params"]])
            self.lr_scheduler.step()
            losses.append(total)
        record = {"loss": losses[0] if losses else 0.0, "grad_norm": grad_norms[0] if grad_norms else 0.0,
                  "trained_groups": len(active), "train_tokens": tokens, "update_micro_batches": len(batches)}
        if stats_parts:
            width = max(p[0].shape[1] for p in stats_parts)
            cat = [torch.cat([_widen(p[k], width) for p in stats_parts]) for k in range(3)]
            record.update(ratio_stats(cat[0], cat[1], cat[2]))
        return record
