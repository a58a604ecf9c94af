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
    """Flat token inputs of one step. Prefill sets cu_seqlens; decode sets block_tables and context_lens."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    last_token_index: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None

    @property
    def prefill(self) -> bool:
        return self.cu_seqlens is not None

    @classmethod
    def for_prefill(
        cls, prompts: list[list[int]], slots: list[int] | torch.Tensor, device: torch.device
    ) -> StepInputs:
        """The prefill of `prompts` packed back to back on `device`, token j of the pack in slot slots[j]."""
        ids, positions, lens = [], [], [0]
        for prompt in prompts:
            ids.extend(prompt)
            positions.extend(range(len(prompt)))
            lens.append(lens[-1] + len(prompt))
        cu = to_device(lens, device, torch.int32)
        return cls(
            input_ids=to_device(ids, device),
            positions=to_device(positions, device),
            slot_mapping=to_device(slots, device),
            last_token_index=(cu[1:] - 1).long(),
            cu_seqlens=cu,
        )


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
        if inputs.prefill:
            attn = ops.prefill_attention(q, k, v, inputs.cu_seqlens, self.scale)
        else:
            attn = ops.paged_decode_attention(
                q, k_cache, v_cache, inputs.block_tables, inputs.context_lens, self.scale
            )
        (hidden,) = linears.o(attn.reshape(tokens, -1))
        x, residual = ops.rms_norm(hidden, layer.post_attention_norm, spec.rms_norm_eps, residual)
        (hidden,) = linears.down(ops.silu_and_mul(*linears.gate_up(x)))
        return hidden, residual
