"""Views of a HF decoder's weights for the engine's own forward, plus its RoPE tables.

The views share storage with the model's parameters, so in-place training updates (optimizer steps,
`load_state_dict`) are seen by the engine without a copy. Rebuild them after anything that replaces
a parameter's storage, such as `model.to(device)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel


def _view(param: torch.Tensor | None) -> torch.Tensor | None:
    """The parameter's tensor without autograd tracking, same storage."""
    return None if param is None else param.detach()


@dataclass
class LayerWeights:
    """One decoder layer. Linear weights are [out_features, in_features]; biases/norms are 1-D."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # qwen3: RMSNorm over each head, [head_dim]
    k_norm: torch.Tensor | None
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def from_layer(cls, layer: nn.Module) -> LayerWeights:
        """Views of one HF `*DecoderLayer` (llama / mistral / qwen2 / qwen3)."""
        attn, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return cls(
            q=_view(attn.q_proj.weight),
            k=_view(attn.k_proj.weight),
            v=_view(attn.v_proj.weight),
            o=_view(attn.o_proj.weight),
            q_bias=_view(attn.q_proj.bias),
            k_bias=_view(attn.k_proj.bias),
            v_bias=_view(attn.v_proj.bias),
            o_bias=_view(attn.o_proj.bias),
            q_norm=None if q_norm is None else _view(q_norm.weight),
            k_norm=None if k_norm is None else _view(k_norm.weight),
            input_norm=_view(layer.input_layernorm.weight),
            post_attention_norm=_view(layer.post_attention_layernorm.weight),
            gate=_view(mlp.gate_proj.weight),
            up=_view(mlp.up_proj.weight),
            down=_view(mlp.down_proj.weight),
        )


@dataclass
class DecoderWeights:
    """All weights of a causal LM; `lm_head is embed` when the embeddings are tied."""

    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # final RMSNorm, [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> DecoderWeights:
        """Views of every weight of `model` (a `*ForCausalLM` of a supported family)."""
        decoder = model.model
        embed = _view(decoder.embed_tokens.weight)
        tied = model.lm_head.weight is decoder.embed_tokens.weight
        return cls(
            embed=embed,
            layers=[LayerWeights.from_layer(layer) for layer in decoder.layers],
            norm=_view(decoder.norm.weight),
            lm_head=embed if tied else _view(model.lm_head.weight),
        )


def rope_tables(
    model: PreTrainedModel, max_positions: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, fp32 [max_positions, head_dim / 2], exactly as the model's own rotary embedding.

    Uses the module's `inv_freq` and `attention_scaling`, so every RoPE scaling type HF implements
    (linear, llama3, yarn, ...) comes out as HF computes it. HF's tables repeat these halves twice.
    """
    rotary = model.model.rotary_emb
    device = torch.device(device) if device is not None else rotary.inv_freq.device
    positions = torch.arange(max_positions, device=device, dtype=torch.float32)
    freqs = positions[:, None] * rotary.inv_freq.to(device=device, dtype=torch.float32)
    return freqs.cos() * rotary.attention_scaling, freqs.sin() * rotary.attention_scaling
