"""Residual add + RMSNorm, fused: the torch reference (the Triton kernel sits beside it)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rmsnorm(x + residual) * weight, x + residual); the sum is written into `residual`."""
    if residual is not None:
        x = residual.add_(x)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    stride_x,
    stride_r,
    stride_y,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row per program: (x + residual) -> residual (in place), rmsnorm(.) * weight -> y."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # the sum, rounded as residual.add_ rounds
        tl.store(res_ptr + row * stride_r + cols, s, mask=mask)
    else:
        s = x
    h = s.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    normed = (h * rstd).to(s.dtype)  # cast to the input dtype before the weight multiply (HF Llama)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rms_norm_reference` (same signature, same results; `residual` updated in place)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    sum_dtype = residual.dtype if residual is not None else x.dtype
    out_dtype = torch.result_type(weight, torch.empty((), dtype=sum_dtype))
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if rows == 0:
        return y, (residual if residual is not None else x)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    r2, copy_back = None, False
    if residual is not None:
        if residual.is_contiguous():
            r2 = residual.view(-1, hidden)
        elif residual.dim() == 2 and residual.stride(-1) == 1:
            r2 = residual
        else:  # an unusual layout: work on a contiguous copy, written back below
            r2, copy_back = residual.contiguous().view(-1, hidden), True
    block = triton.next_power_of_2(hidden)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _rms_norm_kernel[(rows,)](
        x2,
        r2 if r2 is not None else x2,
        w,
        y,
        x2.stride(0),
        r2.stride(0) if r2 is not None else 0,
        hidden,
        hidden,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    if residual is None:
        return y, x
    if copy_back:
        residual.copy_(r2.view(residual.shape))
    return y, residual
