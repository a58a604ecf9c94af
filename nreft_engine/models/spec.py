"""ModelSpec: the shape facts the engine needs about a supported decoder, read from a HF config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# HF model_types the engine's decoder runs (mistral is llama without biases; qwen2 adds q/k/v biases,
# qwen3 per-head q/k norms: the weight views in weights.py pick those up from the modules).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
# RoPE types whose frequencies change with the running sequence length: fixed tables cannot match them.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class UnsupportedModelError(ValueError):
    """The model's architecture or an option of it is not one the engine's decoder implements."""


def _describe(config: Any) -> str:
    archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
    return f"{archs} (model_type {getattr(config, 'model_type', None)!r})"


def _unsupported(config: Any, why: str) -> UnsupportedModelError:
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    return UnsupportedModelError(f"{_describe(config)}: {why}. Supported model types: {supported}.")


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def _eos_ids(*sources: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        for token in [value] if isinstance(value, int) else (value or []):
            if token not in ids:
                ids.append(int(token))
    return tuple(ids)


def check_supported(config: Any) -> None:
    """Raise UnsupportedModelError, saying what is not supported, unless the engine runs `config`'s model."""
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(config, "this architecture is not supported")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise _unsupported(config, f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
    if getattr(config, "mlp_bias", False):
        raise _unsupported(config, "MLP biases (mlp_bias=True) are not supported")
    if _rope_type(config) in _LENGTH_DEPENDENT_ROPE:
        raise _unsupported(config, f"rope type {_rope_type(config)!r} depends on sequence length")


@dataclass(frozen=True)
class ModelSpec:
    """The dimensions of a llama / mistral / qwen2 / qwen3 decoder that the engine's step depends on.

    Sliding-window attention (e.g. mistral's `sliding_window`) is ignored: the engine always attends to
    the full context, which differs from HF only for sequences longer than the window.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_config(cls, config: Any, generation_config: Any = None) -> ModelSpec:
        """Build the spec from a HF config (and its generation config, for extra EOS ids)."""
        check_supported(config)
        num_heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            vocab_size=config.vocab_size,
            rms_norm_eps=float(config.rms_norm_eps),
            max_position_embeddings=config.max_position_embeddings,
            eos_token_ids=_eos_ids(config, generation_config),
        )
