"""Small random decoders of every supported family, for fast tests (import: `from tiny_models import ...`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_BASE: dict[str, Any] = {
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# family name -> (HF model_type, config overrides)
TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen3": ("qwen3", {"head_dim": 32}),  # q/k norms; head_dim != hidden / heads
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
}


@torch.no_grad()
def make_tiny_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A random fp32 eval-mode model (4 layers, hidden 64, 4 heads, 2 KV heads, vocab 128).

    Weights are drawn so that nothing is trivial: norms around 1, non-zero biases, peaked logits.
    `overrides` go to the HF config (e.g. num_hidden_layers=2).
    """
    model_type, family_overrides = TINY_FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**_BASE, **family_overrides, **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name:
            param.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            param.copy_(0.1 * noise)
        elif "embed_tokens" in name or "lm_head" in name:
            param.copy_(0.25 * noise)
        else:
            param.copy_(noise / math.sqrt(param.shape[-1]))
    return model.eval()


def save_tiny_model(model: PreTrainedModel, path: str) -> str:
    """Save `model` as a safetensors directory loadable by `load_model(path)`; returns `path`."""
    model.save_pretrained(path)
    return str(path)
