"""The decoder forward over a LayerPlan's active layers: a packed prefill or a one-token-per-row decode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nreft_engine import ops
from nreft_engine.cache import PagedKVCache
from nreft_engine.linear import FusedLinear
from nreft_engine.models.spec import ModelSpec
from nreft_engine.models.weights import DecoderWeights, LayerWeights
from nreft_engine.skip import LayerPlan
from nreft_engine.transfer import to_device


@dataclass
class StepInputs:
    """Flat token inputs of one step: the prompt chunks' tokens packed first (bounds cu_seqlens; chunk_tables
    and chunk_context_lens when some chunk has tokens before it in the cache), then one token per decoding
    row (block_tables, context_lens). Logits are taken at last_token_index."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    last_token_index: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    chunk_tables: torch.Tensor | None = None
    chunk_context_lens: torch.Tensor | None = None
    num_prefill_tokens: int = 0

    @property
    def prefill(self) -> bool:
        return self.cu_seqlens is not None

    @classmethod
    def for_prefill(
        cls, prompts: list[list[int]], slots: list[int] | torch.Tensor, device: torch.device
    ) -> StepInputs:
        """The prefill of whole `prompts` packed back to back on `device`, token j of the pack in slot
        slots[j]."""
        return cls.pack([PromptChunk(p, 0, True) for p in prompts], [], slots, device)

    @classmethod
    def pack(
        cls,
        chunks: list[PromptChunk],
        decodes: list[tuple[int, int]],
        slots: list[int] | torch.Tensor,
        device: torch.device,
        chunk_tables: torch.Tensor | None = None,
        block_tables: torch.Tensor | None = None,
    ) -> StepInputs:
        """A step of prompt `chunks` then `decodes` (last token, context length with it), on `device`;
        logits at the last token of each chunk that samples and at every decode row."""
        ids, positions, bounds, last = [], [], [0], []
        for chunk in chunks:
            ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.end))
            bounds.append(bounds[-1] + len(chunk.token_ids))
            if chunk.samples:
                last.append(bounds[-1] - 1)
        prefill_tokens = bounds[-1]
        ids.extend(token for token, _ in decodes)
        positions.extend(length - 1 for _, length in decodes)
        last.extend(range(prefill_tokens, prefill_tokens + len(decodes)))
        inputs = cls(
            input_ids=to_device(ids, device),
            positions=to_device(positions, device),
            slot_mapping=to_device(slots, device),
            last_token_index=to_device(last, device),
            cu_seqlens=to_device(bounds, device, torch.int32) if chunks else None,
            num_prefill_tokens=prefill_tokens,
        )
        if chunk_tables is not None:
            inputs.chunk_tables = to_device(chunk_tables, device)
            inputs.chunk_context_lens = to_device([c.end for c in chunks], device, torch.int32)
        if decodes:
            inputs.block_tables = to_device(block_tables, device)
            inputs.context_lens = to_device([length for _, length in decodes], device, torch.int32)
        return inputs


@dataclass(frozen=True)
class PromptChunk:
    """Tokens [start, start + len(token_ids)) of a sequence, fed in one step; `samples` when they end it."""

    token_ids: list[int]
    start: int
    samples: bool

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass
class LayerLinears:
    """The matmuls of one decoder layer: fused q/k/v, o, fused gate/up, down."""

    qkv: FusedLinear
    o: FusedLinear
    gate_up: FusedLinear
    down: FusedLinear

    @classmethod
    def from_weights(cls, layer: LayerWeights, prepack: bool) -> LayerLinears:
        return cls(
            qkv=FusedLinear(
                [layer.q, layer.k, layer.v], [layer.q_bias, layer.k_bias, layer.v_bias], prepack=prepack
            ),
            o=FusedLinear([layer.o], [layer.o_bias], prepack=prepack),
            gate_up=FusedLinear([layer.gate, layer.up], prepack=prepack),
            down=FusedLinear([layer.down], prepack=prepack),
        )

    def all(self) -> tuple[FusedLinear, ...]:
        return self.qkv, self.o, self.gate_up, self.down


class Decoder:
    """The decoder's forward from the model's own parameters (views, or prepacked copies kept in step)."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: DecoderWeights,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prepack: bool = False,
    ):
        self.spec = spec
        self.weights = weights
        self.cos, self.sin = cos, sin
        self.scale = spec.head_dim**-0.5
        self.linears = [LayerLinears.from_weights(layer, prepack) for layer in weights.layers]
        self.lm_head = FusedLinear([weights.lm_head], prepack=prepack)

    def refresh_packed_weights(self, force: bool = False) -> int:
        """Re-prepare the prepacked weights whose parameters changed in place (all with `force`); returns how
        many were."""
        fused = [linear for layer in self.linears for linear in layer.all()] + [self.lm_head]
        return sum(linear.refresh(force) for linear in fused)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, plan: LayerPlan, cache: PagedKVCache) -> torch.Tensor:
        """Logits [num_sequences, vocab] at each sequence's last input token."""
        hidden = F.embedding(inputs.input_ids, self.weights.embed)
        residual = None
        for slot, layer_id in enumerate(plan.active_layers):
            hidden, residual = self.layer(layer_id, slot, hidden, residual, inputs, cache)
        if inputs.prefill:
            if inputs.last_token_index.shape[0] == 0:  # a step of prompt chunks none of which ends its prompt
                return hidden.new_empty((0, self.spec.vocab_size))
            hidden, residual = hidden[inputs.last_token_index], residual[inputs.last_token_index]
        x, _ = ops.rms_norm(hidden, self.weights.norm, self.spec.rms_norm_eps, residual)
        (logits,) = self.lm_head(x)
        return logits

    def layer(
        self,
        layer_id: int,
        slot: int,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        inputs: StepInputs,
        cache: PagedKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer `layer_id` (its K/V in cache slot `slot`) on the residual stream `hidden + residual`
        (`hidden` alone before the first layer): the new (hidden, residual), whose sum is the stream after."""
        spec, layer, linears = self.spec, self.weights.layers[layer_id], self.linears[layer_id]
        tokens = inputs.input_ids.shape[0]
        x, residual = ops.rms_norm(hidden, layer.input_norm, spec.rms_norm_eps, residual)
        q, k, v = linears.qkv(x)
        q = q.view(tokens, spec.num_heads, spec.head_dim)
        k = k.view(tokens, spec.num_kv_heads, spec.head_dim)
        v = v.view(tokens, spec.num_kv_heads, spec.head_dim)
        if layer.q_norm is not None:
            q, _ = ops.rms_norm(q, layer.q_norm, spec.rms_norm_eps)
            k, _ = ops.rms_norm(k, layer.k_norm, spec.rms_norm_eps)
        k_cache, v_cache = cache.k[slot], cache.v[slot]
        q, k = ops.rope_write_kv(
            q, k, v, inputs.positions, self.cos, self.sin, k_cache, v_cache, inputs.slot_mapping
        )
        attn = self._attention(q, k, v, k_cache, v_cache, inputs)
        (hidden,) = linears.o(attn.reshape(tokens, -1))
        x, residual = ops.rms_norm(hidden, layer.post_attention_norm, spec.rms_norm_eps, residual)
        (hidden,) = linears.down(ops.silu_and_mul(*linears.gate_up(x)))
        return hidden, residual

    def _attention(self, q, k, v, k_cache, v_cache, inputs: StepInputs) -> torch.Tensor:
        """Attention of the step's rows: whole prompts over their own k/v, prompt chunks over the cache
        (their own k/v written in it already), decode rows over the cache."""
        n = inputs.num_prefill_tokens
        parts = []
        if inputs.prefill and inputs.chunk_tables is None:
            parts.append(ops.prefill_attention(q[:n], k[:n], v[:n], inputs.cu_seqlens, self.scale))
        elif inputs.prefill:
            parts.append(ops.paged_prefill_attention(
                q[:n], k_cache, v_cache, inputs.chunk_tables, inputs.cu_seqlens, inputs.chunk_context_lens,
                self.scale,
            ))
        if inputs.block_tables is not None:
            parts.append(ops.paged_decode_attention(
                q[n:], k_cache, v_cache, inputs.block_tables, inputs.context_lens, self.scale
            ))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
