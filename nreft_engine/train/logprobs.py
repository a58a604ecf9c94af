"""Full-model token log-probs of sampled completions, with autograd and bounded memory.

The prompt of a group is run once and shared by the group's G completions; several groups run together in
one batch, so the matmuls are as large as the micro-batch. `packed_logprobs` runs each group as one row (its
prompt, then its completions, each attending to the prompt and to itself) in a single forward;
`batch_logprobs` runs the prompts, then the completions over the prompts' KV cache, in two. The LM head
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
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, filt: LogitFilter,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The targets' log-probs of one chunk and, if asked, each row's entropy (no gradient)."""
    logp = filt(hidden @ weight.t()).log_softmax(dim=-1)
    picked = logp.gather(1, targets[:, None]).squeeze(1)
    if not entropy:
        return picked, None
    with torch.no_grad():  # filtered tokens: p = 0 times a finite floor instead of -inf
        return picked, -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(dim=-1)


def head_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    filt: LogitFilter,
    chunk_size: int = 1024,
    keep_bytes: int = 0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets[i] | hidden[i]) for hidden [N, H], LM-head weight [V, H], targets [N] -> fp32 [N], and
    with `entropy` the entropy of each row's distribution (fp32 [N], detached), else None.

    Chunks of `chunk_size` rows. With autograd, a chunk's fp32 logits stay alive for backward while all kept
    chunks fit `keep_bytes`; the chunks past it are checkpointed (recomputed in backward).
    """
    outs, kept = [], 0
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        size = h.shape[0] * weight.shape[0] * 4
        if grad and kept + size > keep_bytes:
            outs.append(checkpoint(_chunk_logprobs, h, weight, t, filt, entropy, use_reentrant=False))
        else:
            kept += size if grad else 0
            outs.append(_chunk_logprobs(h, weight, t, filt, entropy))
    if not outs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if entropy else None)
    return torch.cat([o[0] for o in outs]), (torch.cat([o[1] for o in outs]) if entropy else None)


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    filt: LogitFilter,
    chunk_size: int = 1024,
    keep_bytes: int = 0,
) -> torch.Tensor:
    """head_scores's log-probs alone: fp32 [N]."""
    return head_scores(hidden, weight, targets, filt, chunk_size, keep_bytes)[0]


def _padded(rows: list[list[int]], fill: int, device: torch.device) -> torch.Tensor:
    """Integer rows as a [B, max len] long tensor, `fill` past each row's end."""
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def _right_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, max len] (0 past each row's end) and the bool mask of the real tokens."""
    lengths = torch.tensor([len(r) for r in rows], device=device)
    ids = _padded(rows, 0, device)
    return ids, torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]


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
    _check_prompts(groups)
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


def _check_prompts(groups: list[Group]) -> None:
    if empty := [g for g, (p, _) in enumerate(groups) if not p]:
        raise ValueError(f"groups {empty} have an empty prompt: a completion needs a token to follow")


# Rows up to this many tokens run as one masked row per group; the mask makes attention quadratic in the whole
# row (all completions together), so longer rows take batch_logprobs's two forwards.
PACKED_ROW_TOKENS = 1024
_MASKABLE_ATTENTION = ("sdpa", "eager")  # implementations that take a custom 4-D additive mask


def _packed_rows(groups: list[Group]) -> tuple[list[list[int]], list[list[int]], list[list[int]], list]:
    """Per group: its row's tokens (the prompt, then each completion but its last token), their positions,
    their segments (0: prompt, j + 1: completion j), and per completion the row index of the hidden state
    that predicts each of its tokens (the prompt's last one, then its own)."""
    tokens, positions, segments, predictors = [], [], [], []
    for prompt, completions in groups:
        row, pos, seg = list(prompt), list(range(len(prompt))), [0] * len(prompt)
        preds = []
        for j, c in enumerate(completions):
            start = len(row)
            row += c[:-1]
            pos += range(len(prompt), len(prompt) + len(c) - 1)
            seg += [j + 1] * (len(c) - 1)
            preds.append(([len(prompt) - 1] + list(range(start, start + len(c) - 1)))[: len(c)])
        tokens.append(row)
        positions.append(pos)
        segments.append(seg)
        predictors.append(preds)
    return tokens, positions, segments, predictors


def _block_mask(segments: list[list[int]], dtype: torch.dtype, device) -> torch.Tensor:
    """The additive mask [B, 1, width, width]: a token sees the earlier tokens of the prompt and of its own
    completion; padding (segment -1) sees only itself (so no softmax row is empty)."""
    seg = _padded(segments, -1, device)
    width = seg.shape[1]
    order = torch.arange(width, device=device)
    causal = order[:, None] >= order[None, :]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    visible = (causal & same & (seg >= 0)[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def _packable(model: torch.nn.Module, tokens: list[list[int]]) -> bool:
    """Whether one masked row per group computes what the model's own masks would (see packed_logprobs)."""
    config = model.config
    width = max(len(t) for t in tokens)
    window = getattr(config, "sliding_window", None)
    attention = getattr(config, "_attn_implementation", None)
    reaches_window = bool(window) and width >= window
    return width <= PACKED_ROW_TOKENS and attention in _MASKABLE_ATTENTION and not reaches_window


def _embed(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings of `ids`. With tied embeddings the lookup's gradient is sparse: it is summed into
    the LM head's dense gradient rather than materialised as a second [vocab, hidden] tensor."""
    table = model.get_input_embeddings()
    tied = table.weight is model.get_output_embeddings().weight
    return torch.nn.functional.embedding(ids, table.weight, table.padding_idx, sparse=tied)


def completion_hidden(
    model: torch.nn.Module, groups: list[Group]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The final hidden states [N, H] that predict every completion token (by group, then completion, then
    position) and those tokens [N], from one forward: each group is one row, its prompt then its completions,
    under a block mask. None where that would not reproduce the model's own attention (an attention
    implementation that takes no custom mask, a row that reaches a sliding window) or would cost more than
    batch_logprobs's two forwards (rows longer than PACKED_ROW_TOKENS)."""
    _check_prompts(groups)
    tokens, positions, segments, predictors = _packed_rows(groups)
    if not _packable(model, tokens):
        return None
    device = next(model.parameters()).device
    embeds = _embed(model, _padded(tokens, 0, device))
    mask = _block_mask(segments, embeds.dtype, device)
    hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask,
                              position_ids=_padded(positions, 0, device), use_cache=False).last_hidden_state
    rows = [b for b, preds in enumerate(predictors) for p in preds for _ in p]
    cols = [i for preds in predictors for p in preds for i in p]
    targets = torch.tensor([t for _, cs in groups for c in cs for t in c], dtype=torch.long, device=device)
    return hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)], targets


def packed_logprobs(
    model: torch.nn.Module,
    groups: list[Group],
    filt: LogitFilter,
    chunk_size: int = 1024,
    keep_bytes: int = 0,
) -> list[list[torch.Tensor]]:
    """Per group, the log-probs of each completion's tokens given the group's prompt, like batch_logprobs,
    from completion_hidden's one forward; batch_logprobs's two where that returns None."""
    _check_prompts(groups)
    if not any(cs for _, cs in groups):
        return [[] for _ in groups]
    found = completion_hidden(model, groups)
    if found is None:
        return batch_logprobs(model, groups, filt, chunk_size, keep_bytes)
    hidden, targets = found
    head = model.get_output_embeddings().weight
    scores = head_logprobs(hidden, head, targets, filt, chunk_size, keep_bytes)
    scores = list(scores.split([len(c) for _, cs in groups for c in cs]))
    return _split(scores, [len(cs) for _, cs in groups])


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
