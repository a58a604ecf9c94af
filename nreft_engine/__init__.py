"""nreft-engine: fast Nested-ReFT rollouts and training (RL fine-tuning, layer-skipped behaviour models)."""

from nreft_engine.async_engine import AsyncEngine
from nreft_engine.engine import Engine
from nreft_engine.outputs import CompletionOutput, GenerationStats, RequestOutput
from nreft_engine.sampling_params import SamplingParams
from nreft_engine.skip import LayerPlan, SkipPolicy

__all__ = [
    "Engine",
    "AsyncEngine",
    "SamplingParams",
    "SkipPolicy",
    "LayerPlan",
    "RequestOutput",
    "CompletionOutput",
    "GenerationStats",
]
__version__ = "0.1.0"
