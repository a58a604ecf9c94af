"""silu_and_mul_triton == silu_and_mul_reference."""

import pytest
import torch
from kernel_testing import assert_close_rel, poisoned_outputs

from nreft_engine.kernels import activation as mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 1536), (5, 8960), (3, 100)])
def test_silu_and_mul_matches_reference(dtype, rows, inter):
    gate = (3 * torch.randn(rows, inter)).to(dtype)
    up = torch.randn(rows, inter).to(dtype)
    ref = mod.silu_and_mul_reference(gate, up)
    with poisoned_outputs(mod):
        out = mod.silu_and_mul_triton(gate, up)
    assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_strided_views_of_fused_gate_up(dtype):
    """gate and up as the two halves of one fused projection output (row stride 2 * inter), 3-D input."""
    gate_up = torch.randn(2, 3, 2 * 200).to(dtype)
    gate, up = gate_up[..., :200], gate_up[..., 200:]
    ref = mod.silu_and_mul_reference(gate, up)
    with poisoned_outputs(mod):
        out = mod.silu_and_mul_triton(gate, up)
    assert out.shape == (2, 3, 200)
    assert_close_rel(out, ref, dtype)
