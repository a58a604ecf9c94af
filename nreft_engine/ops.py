"""The one dispatch point for kernels: Triton for CUDA tensors, the C++ CPU kernels of nreft_engine._C
for CPU tensors (kernels/cpu.py, where the op has one), the torch reference otherwise.

Every op of the decode/prefill step goes through here, so a new backend is one change in one place.
`NREFT_FORCE_TRITON=1` sends CPU tensors to the Triton kernels too (with TRITON_INTERPRET=1), which is
how the engine's Triton path is checked on machines without a GPU. `NREFT_CPU_KERNELS=0` sends CPU
tensors to the torch references instead of the C++ kernels.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from nreft_engine.kernels import activation as activation_kernels
from nreft_engine.kernels import cpu as cpu_kernels
from nreft_engine.kernels import paged_attention as paged_attention_kernels
from nreft_engine.kernels import prefill_attention as prefill_attention_kernels
from nreft_engine.kernels import rms_norm as rms_norm_kernels
from nreft_engine.kernels import rope as rope_kernels
from nreft_engine.kernels import sampler as sampler_kernels

__all__ = [
    "linear",
    "paged_decode_attention",
    "prefill_attention",
    "prepare_linear_weight",
    "rms_norm",
    "rope_write_kv",
    "sample",
    "silu_and_mul",
]


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` should go to a Triton kernel."""
    return t.is_cuda or os.environ.get("NREFT_FORCE_TRITON") == "1"


def use_cpu_kernels(device: torch.device) -> bool:
    """True when tensors on `device` should go to the C++ CPU kernels (where the op has one)."""
    return device.type == "cpu" and os.environ.get("NREFT_CPU_KERNELS") != "0"


def _pick(module, name: str, t: torch.Tensor):
    triton_fn = getattr(module, f"{name}_triton", None)
    if triton_fn is not None and use_triton(t):
        return triton_fn
    cpu_fn = getattr(cpu_kernels, f"{name}_cpu", None)
    if cpu_fn is not None and use_cpu_kernels(t.device):
        return cpu_fn
    return getattr(module, f"{name}_reference")


def can_prepack_linear(device: torch.device) -> bool:
    """True when `prepare_linear_weight` gives weights on `device` a faster layout than their own."""
    return use_cpu_kernels(device) and cpu_kernels.can_pack_linear()


def prepare_linear_weight(weight: torch.Tensor) -> torch.Tensor | cpu_kernels.PackedLinear:
    """`weight` [out, in] in the layout `linear` runs fastest with: the CPU kernels' packed copies (see
    kernels/cpu.py), the weight itself otherwise."""
    if can_prepack_linear(weight.device) and weight.dtype in cpu_kernels.PACKED_LINEAR_DTYPES:
        return cpu_kernels.pack_linear_weight(weight)
    return weight


def linear(
    x: torch.Tensor, weight: torch.Tensor | cpu_kernels.PackedLinear, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T + bias, for a plain weight or one from `prepare_linear_weight`."""
    if isinstance(weight, cpu_kernels.PackedLinear):
        return cpu_kernels.linear_packed(x, weight, bias)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """(rmsnorm(x + residual) * weight, x + residual); see kernels/rms_norm.py."""
    return _pick(rms_norm_kernels, "rms_norm", x)(x, weight, eps, residual)


def rope_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    """Rotate q, k and write k, v into the paged cache; see kernels/rope.py."""
    return _pick(rope_kernels, "rope_write_kv", q)(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """One query token per sequence over its paged context; see kernels/paged_attention.py."""
    fn = _pick(paged_attention_kernels, "paged_decode_attention", q)
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale)


def prefill_attention(q, k, v, cu_seqlens, scale: float) -> torch.Tensor:
    """Causal attention over packed prompts; see kernels/prefill_attention.py."""
    return _pick(prefill_attention_kernels, "prefill_attention", q)(q, k, v, cu_seqlens, scale)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; see kernels/activation.py."""
    return _pick(activation_kernels, "silu_and_mul", gate)(gate, up)


def sample(logits, temperature, top_k, top_p, min_p, uniform) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter, sample with the given uniforms, and return (tokens, exact log-probs); see kernels/sampler.py."""
    return _pick(sampler_kernels, "sample", logits)(logits, temperature, top_k, top_p, min_p, uniform)
