"""The one dispatch point for kernels: Triton for CUDA tensors, the C++ CPU kernels of nreft_engine._C
for CPU tensors (kernels/cpu.py, where the op has one), the torch reference otherwise.

Every op of the decode/prefill step, and the logit filter the trainer shares with the sampler, goes
through here, so a new backend is one change in one place. Each op's implementation per device type is
chosen once, at import, from two switches: `NREFT_FORCE_TRITON=1` sends CPU tensors to the Triton kernels
too (with TRITON_INTERPRET=1: how the engine's Triton path is checked without a GPU), and
`NREFT_CPU_KERNELS=0` sends CPU tensors to the torch references instead of the C++ kernels.
`configure` changes the choice later (tests do).

Within `batch_invariant()` (an engine with `batch_invariant=True` runs its steps there) the CPU ops compute
each row of a batch the same way whatever the other rows: the linears run the small-batch kernel for every
row count, prefill attention runs the decode kernel per token; the other C++ kernels already work row by row.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from nreft_engine import tuning
from nreft_engine.kernels import activation as activation_kernels
from nreft_engine.kernels import cpu as cpu_kernels
from nreft_engine.kernels import paged_attention as paged_attention_kernels
from nreft_engine.kernels import prefill_attention as prefill_attention_kernels
from nreft_engine.kernels import rms_norm as rms_norm_kernels
from nreft_engine.kernels import rope as rope_kernels
from nreft_engine.kernels import sampler as sampler_kernels

__all__ = [
    "batch_invariant",
    "check_batch_invariant",
    "configure",
    "filter_logits",
    "linear",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_attention",
    "prepare_linear_weight",
    "rms_norm",
    "rope_write_kv",
    "sample",
    "silu_and_mul",
]

# op name -> the kernels/ module with its `<name>_reference` (and `<name>_triton`, where it has one)
_MODULES: dict[str, ModuleType] = {
    "rms_norm": rms_norm_kernels,
    "rope_write_kv": rope_kernels,
    "paged_decode_attention": paged_attention_kernels,
    "prefill_attention": prefill_attention_kernels,
    "paged_prefill_attention": prefill_attention_kernels,
    "silu_and_mul": activation_kernels,
    "sample": sampler_kernels,
}


@dataclass(frozen=True)
class Backends:
    """One op's implementations: for CUDA tensors, for CPU tensors, and for any other device."""

    cuda: Callable
    cpu: Callable
    other: Callable

    def on(self, t: torch.Tensor) -> Callable:
        if t.is_cuda:
            return self.cuda
        return self.cpu if t.device.type == "cpu" else self.other


@dataclass(frozen=True)
class _Choice:
    use_cpu_kernels: bool
    ops: dict[str, Backends]


def choose_backends(force_triton: bool, use_cpu_kernels: bool) -> dict[str, Backends]:
    """Each op's implementations under the two switches (see the module docstring)."""
    chosen = {}
    for name, module in _MODULES.items():
        reference = getattr(module, f"{name}_reference")
        triton_fn = getattr(module, f"{name}_triton", None)
        cpu_fn = getattr(cpu_kernels, f"{name}_cpu", None) if use_cpu_kernels else None
        on_cpu = triton_fn if force_triton and triton_fn is not None else cpu_fn or reference
        chosen[name] = Backends(cuda=triton_fn or reference, cpu=on_cpu, other=reference)
    return chosen


def configure(force_triton: bool | None = None, use_cpu_kernels: bool | None = None) -> None:
    """Choose the backends anew; a switch left None is read from its environment variable."""
    global _choice
    if force_triton is None:
        force_triton = os.environ.get("NREFT_FORCE_TRITON") == "1"
    if use_cpu_kernels is None:
        use_cpu_kernels = os.environ.get("NREFT_CPU_KERNELS") != "0"
    _choice = _Choice(use_cpu_kernels, choose_backends(force_triton, use_cpu_kernels))


_choice: _Choice
configure()
_batch_invariant: ContextVar[bool] = ContextVar("nreft_batch_invariant", default=False)  # per thread


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """A scope (of this thread) in which the ops are batch-invariant, as the module docstring says."""
    token = _batch_invariant.set(enabled)
    try:
        yield
    finally:
        _batch_invariant.reset(token)


def check_batch_invariant(device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """ValueError, saying why, unless `batch_invariant()` makes a model's steps batch-invariant on `device`:
    the CPU with the C++ kernels and oneDNN, float32/bfloat16, head_dim a multiple of 16."""
    native = [name for name in _MODULES if hasattr(cpu_kernels, f"{name}_cpu")]
    if device.type != "cpu":
        problem = f"runs on the CPU only, not on {device}"
    elif not can_prepack_linear(device) or any(
        _choice.ops[name].cpu is not getattr(cpu_kernels, f"{name}_cpu") for name in native
    ):
        problem = "needs the C++ CPU kernels and oneDNN (unset NREFT_CPU_KERNELS=0 and NREFT_FORCE_TRITON=1)"
    elif dtype not in cpu_kernels.PACKED_LINEAR_DTYPES:
        problem = f"needs a float32 or bfloat16 model, not {dtype}"
    elif head_dim % 16:
        problem = f"needs a head_dim that is a multiple of 16, not {head_dim}"
    else:
        return
    raise ValueError(f"batch_invariant=True {problem}; pass batch_invariant=False")


def can_prepack_linear(device: torch.device) -> bool:
    """True when `prepare_linear_weight` gives weights on `device` a faster layout than their own."""
    return device.type == "cpu" and _choice.use_cpu_kernels and cpu_kernels.can_pack_linear()


def prepare_linear_weight(weight: torch.Tensor) -> torch.Tensor | cpu_kernels.PackedLinear:
    """`weight` [out, in] in the layout `linear` runs fastest with: the CPU kernels' packed copies (see
    kernels/cpu.py; within `batch_invariant()` the small-batch kernel's only), the weight itself otherwise."""
    if can_prepack_linear(weight.device) and weight.dtype in cpu_kernels.PACKED_LINEAR_DTYPES:
        if _batch_invariant.get():
            return cpu_kernels.pack_linear_weight(weight, onednn=False)
        return cpu_kernels.pack_linear_weight(weight, small_batch_rows=tuning.small_batch_rows(weight.dtype))
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
    return _choice.ops["rms_norm"].on(x)(x, weight, eps, residual)


def rope_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    """Rotate q, k and write k, v into the paged cache; see kernels/rope.py."""
    fn = _choice.ops["rope_write_kv"].on(q)
    return fn(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """One query token per sequence over its paged context; see kernels/paged_attention.py."""
    fn = _choice.ops["paged_decode_attention"].on(q)
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale)


def prefill_attention(q, k, v, cu_seqlens, scale: float) -> torch.Tensor:
    """Causal attention over packed prompts; see kernels/prefill_attention.py (within `batch_invariant()`, on
    the CPU: `cpu_kernels.prefill_attention_by_rows`)."""
    if q.device.type == "cpu" and _batch_invariant.get():
        return cpu_kernels.prefill_attention_by_rows(q, k, v, cu_seqlens, scale)
    return _choice.ops["prefill_attention"].on(q)(q, k, v, cu_seqlens, scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale: float):
    """Causal attention of prompt chunks over their paged cache (chunked prefill); see
    kernels/prefill_attention.py (within `batch_invariant()`, on the CPU: by rows, as `prefill_attention`)."""
    if q.device.type == "cpu" and _batch_invariant.get():
        return cpu_kernels.paged_prefill_attention_by_rows(
            q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale
        )
    fn = _choice.ops["paged_prefill_attention"].on(q)
    return fn(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; see kernels/activation.py."""
    return _choice.ops["silu_and_mul"].on(gate)(gate, up)


def sample(logits, temperature, top_k, top_p, min_p, uniform) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter, sample with the given uniforms, return (tokens, exact log-probs); see kernels/sampler.py."""
    return _choice.ops["sample"].on(logits)(logits, temperature, top_k, top_p, min_p, uniform)


def filter_logits(logits, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """Tempered fp32 logits with filtered-out tokens at -inf, differentiable: the sampler's filter, which
    the trainer recomputes log-probs through; see kernels/sampler.py."""
    return sampler_kernels.filter_logits(logits, temperature, top_k, top_p, min_p)
