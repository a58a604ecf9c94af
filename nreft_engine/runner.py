"""One model step over a LayerPlan's active layers: a packed prefill or a one-token-per-sequence decode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nreft_engine import ops
from nreft_engine.cache import PagedKVCache
from nreft_engine.models.spec import ModelSpec
from nreft_engine.models.weights import DecoderWeights
from nreft_engine.skip import LayerPlan


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


class ModelRunner:
    """Runs the decoder from views of the model's own parameters, so weight updates are seen at once."""

    def __init__(self, spec: ModelSpec, weights: DecoderWeights, cos: torch.Tensor, sin: torch.Tensor):
        self.spec = spec
        self.weights = weights
        self.cos, self.sin = cos, sin
        self.scale = spec.head_dim**-0.5

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, plan: LayerPlan, cache: PagedKVCache) -> torch.Tensor:
        """Logits [num_sequences, vocab] at each sequence's last input token."""
        spec, w = self.spec, self.weights
        tokens = inputs.input_ids.shape[0]
        hidden = F.embedding(inputs.input_ids, w.embed)
        residual = None
        for slot, layer_id in enumerate(plan.active_layers):
            layer = w.layers[layer_id]
            x, residual = ops.rms_norm(hidden, layer.input_norm, spec.rms_norm_eps, residual)
            q = F.linear(x, layer.q, layer.q_bias).view(tokens, spec.num_heads, spec.head_dim)
            k = F.linear(x, layer.k, layer.k_bias).view(tokens, spec.num_kv_heads, spec.head_dim)
            v = F.linear(x, layer.v, layer.v_bias).view(tokens, spec.num_kv_heads, spec.head_dim)
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
            hidden = F.linear(attn.reshape(tokens, -1), layer.o, layer.o_bias)
            x, residual = ops.rms_norm(hidden, layer.post_attention_norm, spec.rms_norm_eps, residual)
            hidden = F.linear(ops.silu_and_mul(F.linear(x, layer.gate), F.linear(x, layer.up)), layer.down)
        if inputs.prefill:
            hidden, residual = hidden[inputs.last_token_index], residual[inputs.last_token_index]
        x, _ = ops.rms_norm(hidden, w.norm, spec.rms_norm_eps, residual)
        return F.linear(x, w.lm_head)
