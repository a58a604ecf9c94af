"""Full-model token log-probs of sampled completions, with autograd and bounded memory.

The prompt of a group is run once and its KV cache is shared by the group's G completions. The LM head and
log-softmax run over chunks of tokens under activation checkpointing, so at most one chunk of
[chunk x vocab] fp32 logits is alive at a time, in the forward and in the backward pass. Logits go through
the rollout's own filter (temperature, top-k, top-p, min-p from `nreft_engine.kernels.sampler`), so the
log-probs are under the same kind of distribution as the engine's behaviour log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from nreft_engine.kernels.sampler import filter_logits


@dataclass(frozen=True)
class LogitFilter:
    """The rollout's sampling filter; temperature 0 (greedy) scores at temperature 1, as the sampler does."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        rows = logits.shape[0]

        def full(value, dtype):
            return torch.full((rows,), value, dtype=dtype, device=logits.device)

        return filter_logits(logits, full(self.temperature, torch.float32), full(self.top_k, torch.int64),
                             full(self.top_p, torch.float32), full(self.min_p, torch.float32))


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, filt: LogitFilter
) -> torch.Tensor:
    logits = filt(hidden @ weight.t())
    return logits.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    filt: LogitFilter,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for hidden [N, H], LM-head weight [V, H], targets [N] -> fp32 [N].

    Chunks of `chunk_size` rows; with autograd each chunk is checkpointed (recomputed in backward).
    """
    outs = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            outs.append(checkpoint(_chunk_logprobs, h, weight, t, filt, use_reentrant=False))
        else:
            outs.append(_chunk_logprobs(h, weight, t, filt))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


def group_logprobs(
    model: torch.nn.Module,
    prompt_ids: list[int],
    completions: list[list[int]],
    filt: LogitFilter,
    chunk_size: int = 1024,
) -> list[torch.Tensor]:
    """Log-probs of each completion's tokens given the shared prompt: one fp32 tensor [len(c)] per completion.

    The prompt runs once (batch 1) and its cache is repeated for the G completions, which run right-padded
    in one batch (causal attention: padding at the end never influences real tokens).
    """
    if not completions:
        return []
    device = next(model.parameters()).device
    body, head = model.base_model, model.get_output_embeddings().weight
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    # the cache goes by position: transformers 5 renamed it (past_key_values -> cache), argument and output
    out = body(prompt, None, None, None, use_cache=True)
    cache, last_prompt_hidden = out[1], out[0][0, -1]
    lengths = [len(c) for c in completions]
    width = max(lengths)
    padded = torch.zeros(len(completions), width, dtype=torch.long, device=device)
    for i, c in enumerate(completions):
        padded[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    rows = []
    if width > 1:
        cache.batch_repeat_interleave(len(completions))
        comp_hidden = body(padded[:, :-1], None, None, cache, use_cache=True).last_hidden_state
    for i, n in enumerate(lengths):
        rows.append(last_prompt_hidden[None])
        if n > 1:
            rows.append(comp_hidden[i, : n - 1])
    hidden = torch.cat(rows)
    targets = torch.cat([padded[i, :n] for i, n in enumerate(lengths)])
    return list(head_logprobs(hidden, head, targets, filt, chunk_size).split(lengths))
