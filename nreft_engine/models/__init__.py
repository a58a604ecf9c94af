"""Model loading (embedded default, GGUF, safetensors dir, hub id, in-memory) and weight views."""

from .loader import DEFAULT_MODEL, EMBEDDED_MODELS, load_model, model_spec
from .spec import SUPPORTED_MODEL_TYPES, ModelSpec, UnsupportedModelError
from .weights import DecoderWeights, LayerWeights, rope_tables

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "SUPPORTED_MODEL_TYPES",
    "DecoderWeights",
    "LayerWeights",
    "ModelSpec",
    "UnsupportedModelError",
    "load_model",
    "model_spec",
    "rope_tables",
]
