"""SiLU-and-multiply of the gated MLP: the torch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise."""
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(
    gate_ptr, up_ptr, out_ptr, stride_g, stride_u, stride_o, n_cols, BLOCK: tl.constexpr
):
    """Grid (rows, column blocks). Rounds like torch: silu(gate) to gate's dtype, then the product."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = tl.math.div_rn(gf, 1.0 + tl.exp(-gf)).to(g.dtype)
    out = act.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, cols] view with unit column stride (a copy only for unusual layouts)."""
    if t.dim() == 2 and t.stride(-1) == 1:
        return t
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def silu_and_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_and_mul_reference`; gate/up may be strided row views (of a fused gate_up)."""
    out_dtype = torch.result_type(gate, up)
    out = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    if out.numel() == 0:
        return out
    cols = gate.shape[-1]
    g2, u2 = _as_rows(gate), _as_rows(up)
    o2 = out.view(-1, cols)
    block = min(triton.next_power_of_2(cols), 2048)
    num_warps = 4 if block <= 1024 else 8
    grid = (g2.shape[0], triton.cdiv(cols, block))
    _silu_and_mul_kernel[grid](
        g2, u2, o2, g2.stride(0), u2.stride(0), o2.stride(0), cols, BLOCK=block, num_warps=num_warps
    )
    return out
