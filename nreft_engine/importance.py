"""Layer importance: how much each decoder layer changes the residual stream, in the engine's own forward.

The measure is ShortGPT's block influence: for layer i, the mean over every token of the calibration
prompts of 1 - cos(h_in, h_out), h_in and h_out the residual stream before and after the layer, all layers
active. A layer that is the identity on the stream scores 0; `SkipPolicy(importance=...)` skips the layers
that score least more often.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nreft_engine import ops
from nreft_engine.decoder import StepInputs
from nreft_engine.runner import ModelRunner
from nreft_engine.skip import LayerPlan


def layer_importance(runner: ModelRunner, prompts: list[list[int]], max_tokens: int) -> list[float]:
    """Block influence of each of the runner's layers over the token ids `prompts` (see the module docstring).

    Runs the prefill of the prompts, packed in chunks of at most `max_tokens` tokens (a longer prompt
    alone), on the current weights (repacked first where they changed); the KV cache is scratch. The caller
    holds the engine's lock.
    """
    if not prompts:
        raise ValueError("layer_importance needs at least one calibration prompt")
    plan = LayerPlan(runner.spec.num_layers)
    cache = runner.prepare(plan)
    capacity = cache.num_blocks * cache.block_size
    for index, ids in enumerate(prompts):
        if len(ids) > capacity:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens but the KV cache holds {capacity} for the full model; "
                "raise kv_cache_memory or pass shorter calibration prompts"
            )
    total = torch.zeros(plan.num_layers, dtype=torch.float64, device=runner.device)
    with torch.inference_mode(), ops.batch_invariant(runner.batch_invariant):
        for chunk in _chunks(prompts, min(max_tokens, capacity)):
            total += _chunk_influence(runner, _prefill(chunk, runner.device), plan, cache)
    return (total / sum(len(ids) for ids in prompts)).tolist()


def _chunks(prompts: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Consecutive prompts packed greedily into chunks of at most `max_tokens` tokens (a longer one alone)."""
    chunks: list[list[list[int]]] = []
    size = 0
    for ids in prompts:
        if not chunks or size + len(ids) > max_tokens:
            chunks.append([])
            size = 0
        chunks[-1].append(ids)
        size += len(ids)
    return chunks


def _prefill(chunk: list[list[int]], device: torch.device) -> StepInputs:
    """The chunk's prompts packed back to back, token j of the pack in cache slot j."""
    return StepInputs.for_prefill(chunk, torch.arange(sum(len(p) for p in chunk)), device)


def _chunk_influence(runner: ModelRunner, inputs: StepInputs, plan: LayerPlan, cache) -> torch.Tensor:
    """Sum over the chunk's tokens of 1 - cos(stream before, stream after), per layer, in float64."""
    decoder = runner.decoder
    hidden = F.embedding(inputs.input_ids, decoder.weights.embed)
    residual = None
    before = _stream(hidden, residual)
    sums = []
    for slot, layer_id in enumerate(plan.active_layers):
        hidden, residual = decoder.layer(layer_id, slot, hidden, residual, inputs, cache)
        after = _stream(hidden, residual)
        # cos can round above 1: clamp, so an identity layer scores 0, never below
        sums.append((1 - F.cosine_similarity(before, after, dim=-1)).clamp_min(0).sum())
        before = after
    return torch.stack(sums)


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """A fresh float64 copy of the residual stream hidden + residual (ops may reuse their inputs' storage);
    float64 so that cos(x, x) rounds to 1 within ~1e-15."""
    stream = hidden.to(torch.float64, copy=True)
    if residual is not None:
        stream += residual
    return stream
