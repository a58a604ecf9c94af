"""Full-model token log-probs of sampled completions, with autograd and bounded memory.

The prompt of a group is run once and its KV cache is shared by the group's G completions; several groups
run together in one batch (`batch_logprobs`), so the matmuls are as large as the micro-batch. The LM head
and log-softmax run over chunks of tokens; a chunk's logits are kept for the backward pass while they fit
a memory budget, and past it the chunk is checkpointed (recomputed in backward), so at most the budget plus
one chunk of [chunk x vocab] fp32 logits is alive at a time. Logits go through the rollout's own filter
(temperature, top-k, top-p, min-p from `nreft_engine.kernels.sampler`), so the log-probs are under the
same kind of distribution as the engine's behaviour log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from nreft_engine.kernels.sampler import filter_logits

# (prompt token ids, its completions' token ids)
Group = tuple[list[int], list[list[int]]]


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
    keep_bytes: int = 0,
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for hidden [N, H], LM-head weight [V, H], targets [N] -> fp32 [N].

    Chunks of `chunk_size` rows. With autograd, a chunk's fp32 logits stay alive for backward while all kept
    chunks fit `keep_bytes`; the chunks past it are checkpointed (recomputed in backward).
    """
    outs, kept = [], 0
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        size = h.shape[0] * weight.shape[0] * 4
        if grad and kept + size > keep_bytes:
            outs.append(checkpoint(_chunk_logprobs, h, weight, t, filt, use_reentrant=False))
        else:
            kept += size if grad else 0
            outs.append(_chunk_logprobs(h, weight, t, filt))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


def _right_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, max len] (0 past each row's end) and the bool mask of the real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


def batch_logprobs(
    model: torch.nn.Module,
    groups: list[Group],
    filt: LogitFilter,
    chunk_size: int = 1024,
    keep_bytes: int = 0,
) -> list[list[torch.Tensor]]:
    """Per group, the log-probs of each completion's tokens given the group's prompt (fp32 [len(c)] each).

    Two forwards for all the groups: the prompts (right-padded, batch of groups), then every completion
    (right-padded, one row each) over its own prompt's cache rows, at positions after its real prompt
    tokens, with the prompt padding masked out; padding never influences real tokens.
    """
    if empty := [g for g, (p, _) in enumerate(groups) if not p]:
        raise ValueError(f"groups {empty} have an empty prompt: a completion needs a token to follow")
    device = next(model.parameters()).device
    body, head = model.base_model, model.get_output_embeddings().weight
    prompt_ids, prompt_mask = _right_padded([p for p, _ in groups], device)
    prompt_lengths = prompt_mask.sum(dim=1)
    owners = torch.tensor([g for g, (_, cs) in enumerate(groups) for _ in cs], dtype=torch.long)
    owners = owners.to(device)
    completions = [c for _, cs in groups for c in cs]
    if not completions:
        return [[] for _ in groups]
    # the cache goes by position: transformers 5 renamed it (past_key_values -> cache), argument and output
    out = body(prompt_ids, prompt_mask.long(), None, None, use_cache=True)
    cache, prompt_hidden = out[1], out[0]
    last_prompt = prompt_hidden[owners, prompt_lengths[owners] - 1]
    comp_ids, comp_mask = _right_padded(completions, device)
    lengths = comp_mask.sum(dim=1).tolist()
    rows = [last_prompt[:, None]]
    if comp_ids.shape[1] > 1:
        cache.batch_select_indices(owners)
        inputs = comp_ids[:, :-1]
        positions = prompt_lengths[owners, None] + torch.arange(inputs.shape[1], device=device)
        mask = torch.cat([prompt_mask[owners], torch.ones_like(inputs, dtype=torch.bool)], dim=1)
        rows.append(body(inputs, mask.long(), positions, cache, use_cache=True).last_hidden_state)
    hidden = torch.cat(rows, dim=1)[:, : comp_ids.shape[1]][comp_mask]  # row r's real tokens, in order
    scores = head_logprobs(hidden, head, comp_ids[comp_mask], filt, chunk_size, keep_bytes).split(lengths)
    per_group = [len(cs) for _, cs in groups]
    return [list(part) for part in _split(list(scores), per_group)]


def _split(items: list, counts: list[int]) -> list[list]:
    """`items` cut into consecutive runs of the given lengths."""
    out, start = [], 0
    for n in counts:
        out.append(items[start:start + n])
        start += n
    return out


def group_logprobs(
    model: torch.nn.Module,
    prompt_ids: list[int],
    completions: list[list[int]],
    filt: LogitFilter,
    chunk_size: int = 1024,
    keep_bytes: int = 0,
) -> list[torch.Tensor]:
    """Log-probs of each completion's tokens given the shared prompt: one fp32 tensor [len(c)] per completion.

    The prompt runs once and its cache is repeated for the G completions, which run right-padded in one batch.
    """
    return batch_logprobs(model, [(prompt_ids, completions)], filt, chunk_size, keep_bytes)[0]
