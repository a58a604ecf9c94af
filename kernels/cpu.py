"""The C++ CPU kernels of nreft_engine._C (csrc/cpu_kernels.cpp), behind the torch references' signatures,
and the prepacked linear: each weight copied once into oneDNN's blocked layout (the way vLLM's CPU backend
and IPEX run their matmuls: about 1.8x the throughput of `F.linear` on SmolLM2's shapes at batch 64) and
into the C++ small-batch layout (`pack_rows16`: 1.6x oneDNN at the memory-bound batch 1).

`ops.py` sends CPU tensors here when the extension provides them. Each wrapper runs the C++ kernel on the
inputs it supports (float32 / bfloat16, the usual layouts, no autograd) and the torch reference otherwise,
so results are always the reference's: fp32 within 1e-5 relative, bf16 rounded at the same points
(residual sum, silu before the multiply, normalized row before the weight multiply, rotated q and k), and
the sampler's tokens those of the reference for the same uniforms.

The kernels are compiled for AVX-512, AVX2 and baseline x86-64 and pick the best the CPU has at import;
`set_isa` (tests, benchmarks) or NREFT_CPU_ISA=avx512|avx2|base choose one explicitly.
"""

from __future__ import annotations

import functools
import platform
from typing import NamedTuple

import torch

from nreft_engine import _C
from nreft_engine.kernels.activation import silu_and_mul_reference
from nreft_engine.kernels.paged_attention import paged_decode_attention_reference
from nreft_engine.kernels.rms_norm import rms_norm_reference
from nreft_engine.kernels.rope import rope_write_kv_reference
from nreft_engine.kernels.sampler import sample_reference

_DTYPES = (torch.float32, torch.bfloat16)
PACKED_LINEAR_DTYPES = _DTYPES

__all__ = [
    "PackedLinear",
    "can_pack_linear",
    "isa",
    "linear_packed",
    "onednn_bf16",
    "onednn_dtype",
    "pack_linear_weight",
    "paged_decode_attention_cpu",
    "paged_prefill_attention_by_rows",
    "prefill_attention_by_rows",
    "rms_norm_cpu",
    "rope_write_kv_cpu",
    "sample_cpu",
    "set_isa",
    "silu_and_mul_cpu",
    "softmax_lanes",
]


def isa() -> str:
    """The instruction set the kernels run ("avx512", "avx2", "base")."""
    return _C.cpu_isa()


def set_isa(name: str = "") -> None:
    """Run the kernels with `name` ("" = the best this CPU supports); ValueError if the CPU lacks it."""
    _C.set_cpu_isa(name)


def can_pack_linear() -> bool:
    """True when this torch build has oneDNN (mkldnn) and its prepacked linear."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_bf16() -> bool:
    """True when oneDNN multiplies bf16 natively here: it needs AVX-512 (BW, VL, DQ), AVX-NE-CONVERT or AMX,
    and honours ONEDNN_MAX_CPU_ISA (read once per process, so neither changes)."""
    return can_pack_linear() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the oneDNN copy of a `dtype` weight: its own, or float32 for bf16 where oneDNN has no
    native bf16 (a widened copy, multiplied in fp32 and rounded to bf16 once, as native bf16 rounds)."""
    return torch.float32 if dtype == torch.bfloat16 and not onednn_bf16() else dtype


class PackedLinear(NamedTuple):
    """A weight [out, in] copied into two layouts: oneDNN's blocked one (an opaque mkldnn tensor, of
    `onednn_dtype`) for batches, `pack_rows16`'s [ceil(out / 16), in, 16] for up to `small_batch_rows` rows,
    where the matmul only streams the weight. Without the oneDNN copy (None) every row count runs the
    small-batch kernel, which computes each row the same way whatever the batch: batch-invariant."""

    onednn: torch.Tensor | None
    rows16: torch.Tensor
    out_features: int
    small_batch_rows: int


def pack_linear_weight(weight: torch.Tensor, onednn: bool = True, small_batch_rows: int = 0) -> PackedLinear:
    """`weight` [out, in] (float32 / bfloat16) copied into both layouts of `PackedLinear` (with `onednn`
    False, the small-batch one only)."""
    if weight.dtype not in PACKED_LINEAR_DTYPES or weight.dim() != 2:
        raise ValueError(
            f"can only pack 2-D float32/bfloat16 weights, got {weight.dtype} {tuple(weight.shape)}"
        )
    weight = weight.detach().contiguous()
    blocked = None
    if onednn:
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight.to(onednn_dtype(weight.dtype)))
    return PackedLinear(blocked, _C.pack_rows16(weight), weight.shape[0], small_batch_rows)


def linear_packed(x: torch.Tensor, weight: PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias with W from `pack_linear_weight`; x [..., in] of W's dtype, any number of rows (up to
    W's `small_batch_rows` through the small-batch kernel, more through oneDNN; all of them through the
    small-batch kernel when W has no oneDNN copy)."""
    if weight.onednn is None or x.numel() <= weight.small_batch_rows * x.shape[-1]:
        return _C.linear_rows16_cpu(x, weight.rows16, bias, weight.out_features)
    compute = weight.onednn.dtype
    if x.dtype == compute:
        return torch.ops.mkldnn._linear_pointwise(x, weight.onednn, bias, "none", [], "")
    bias = bias.to(compute) if bias is not None else None
    return torch.ops.mkldnn._linear_pointwise(x.to(compute), weight.onednn, bias, "none", [], "").to(x.dtype)


def prefill_attention_by_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention over packed prompts (`prefill_attention_reference`'s signature) computed by the C++
    decode kernel, each token as a query over its prompt's keys up to itself: every row is then exactly what
    a decode step computes for it, whatever the batch. q, k, v of one dtype, float32 or bfloat16;
    head_dim a multiple of 16."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        table = torch.arange(end - start, dtype=torch.int32)  # the prompt as a cache of one-token blocks
        keys, values = k[start:end].unsqueeze(1), v[start:end].unsqueeze(1)
        out[start:end] = _rows_over_cache(q[start:end], keys, values, table, end - start, scale)
    return out


def paged_prefill_attention_by_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`paged_prefill_attention_reference` computed by the C++ decode kernel one query at a time, as
    `prefill_attention_by_rows` does for whole prompts."""
    out = torch.empty_like(q)
    bounds, lens = cu_seqlens.tolist(), context_lens.tolist()
    for b, (start, end) in enumerate(zip(bounds, bounds[1:])):
        out[start:end] = _rows_over_cache(q[start:end], k_cache, v_cache, block_tables[b], lens[b], scale)
    return out


def _rows_over_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    context: int,
    scale: float,
) -> torch.Tensor:
    """The last len(q) tokens of a sequence of `context` cached tokens (blocks `table`), each as a decode
    query over the tokens up to itself."""
    n = q.shape[0]
    tables = table.to(torch.int32).expand(n, -1)
    lens = torch.arange(context - n + 1, context + 1, dtype=torch.int32)
    return _C.paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens, float(scale))


def _autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ `rms_norm_reference`: one pass per row for the sum (written into `residual`) and its squares,
    one for the output. Any leading shape (e.g. [T, heads, D] for per-head q/k norms)."""
    if (
        x.dtype in _DTYPES
        and weight.dtype in _DTYPES
        and x.dim() >= 1
        and weight.dim() == 1
        and weight.shape[0] == x.shape[-1]
        and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))
        and not _autograd(x, weight, residual)
    ):
        y = _C.rms_norm_cpu(x, weight, eps, residual)
        return y, (residual if residual is not None else x)
    return rms_norm_reference(x, weight, eps, residual)


def paged_decode_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """C++ `paged_decode_attention_reference`: one task per (sequence, kv head) loads the GQA group's
    queries once and walks the block table in place (no gather copy); head_dim a multiple of 16."""
    if (
        q.dtype in _DTYPES
        and k_cache.dtype == q.dtype
        and v_cache.dtype == q.dtype
        and q.dim() == 3
        and k_cache.dim() == 4
        and q.shape[-1] % 16 == 0
        and not _autograd(q, k_cache, v_cache)
    ):
        if block_tables.dtype != torch.int32:
            block_tables = block_tables.to(torch.int32)
        if context_lens.dtype != torch.int32:
            context_lens = context_lens.to(torch.int32)
        return _C.paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, float(scale))
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)


def silu_and_mul_cpu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """C++ `silu_and_mul_reference`, one fused pass; gate/up may be strided row views."""
    if (
        gate.dtype in _DTYPES
        and up.dtype == gate.dtype
        and gate.shape == up.shape
        and gate.dim() >= 1
        and not _autograd(gate, up)
    ):
        return _C.silu_and_mul_cpu(gate, up)
    return silu_and_mul_reference(gate, up)


def rope_write_kv_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ `rope_write_kv_reference`: one pass per token rotates q and k and writes k, v into its cache slot;
    q/k/v may be strided views of one fused projection; caches of q's dtype, fp32 cos/sin."""
    if (
        q.dtype in _DTYPES
        and all(t.dtype == q.dtype for t in (k, v, k_cache, v_cache))
        and cos.dtype == torch.float32
        and sin.dtype == torch.float32
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and not _autograd(q, k, v)
    ):
        positions, slot_mapping = positions.long(), slot_mapping.long()
        return _C.rope_write_kv_cpu(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    return rope_write_kv_reference(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


@functools.cache
def softmax_lanes() -> int:
    """The fp32 lanes in which torch's CPU softmax sums, which top-p's kept tokens can depend on: the floats
    of ATen's Vectorized<float> at the active capability, AVX-512 or AVX2 on x86-64; 0 elsewhere (unknown).
    Fixed for the process, so computed once."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0
    return {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 0)


def sample_cpu(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniform: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ `sample_reference`: a few passes over each row, rows in parallel; the same tokens for the same
    uniforms. Top-k / top-p order only a few candidates, or most of the row where top-p's cut depends on the
    reference's fp32 rounding (reproduced). ValueError for a row without a finite maximum."""
    lanes = softmax_lanes()
    if (
        logits.dtype in _DTYPES
        and logits.dim() == 2
        and logits.shape[1] > 0
        and lanes
        and not _autograd(logits)
    ):
        return _C.sample_cpu(
            logits, temperature.float(), top_k.long(), top_p.float(), min_p.float(), uniform.float(), lanes
        )
    return sample_reference(logits, temperature, top_k, top_p, min_p, uniform)
