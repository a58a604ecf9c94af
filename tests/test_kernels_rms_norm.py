"""rms_norm_triton (residual add + RMSNorm, fused, in place on the residual) == rms_norm_reference."""

import pytest
import torch
from kernel_testing import assert_close_rel, poisoned_outputs

from nreft_engine.kernels import rms_norm as mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 576, 1000])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_matches_reference(dtype, hidden, with_residual):
    rows = 7
    x = torch.randn(rows, hidden).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    residual = torch.randn(rows, hidden).to(dtype) if with_residual else None
    res_ref = residual.clone() if with_residual else None
    res_tri = residual.clone() if with_residual else None
    y_ref, _ = mod.rms_norm_reference(x, weight, 1e-6, res_ref)
    with poisoned_outputs(mod):
        y, r = mod.rms_norm_triton(x, weight, 1e-6, res_tri)
    assert_close_rel(y, y_ref, dtype)
    if with_residual:
        assert r is res_tri, "residual_out must be the residual tensor, updated in place"
        if dtype == torch.float32:
            assert torch.equal(res_tri, res_ref), "the residual sum must round exactly as residual.add_"
        else:  # Triton's CPU interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest even)
            assert_close_rel(res_tri, res_ref, dtype)
    else:
        assert r is x


def test_rms_norm_3d_input_and_fp32_weight():
    """Leading dims are flattened; a fp32 weight with bf16 activations promotes the output like torch."""
    x = torch.randn(2, 3, 96).bfloat16()
    weight = torch.randn(96)
    residual = torch.randn(2, 3, 96).bfloat16()
    res_ref, res_tri = residual.clone(), residual.clone()
    y_ref, _ = mod.rms_norm_reference(x, weight, 1e-5, res_ref)
    with poisoned_outputs(mod):
        y, r = mod.rms_norm_triton(x, weight, 1e-5, res_tri)
    assert y.dtype == y_ref.dtype == torch.float32
    assert r is res_tri
    assert_close_rel(res_tri, res_ref, torch.bfloat16)
    assert_close_rel(y, y_ref, torch.bfloat16)


def test_rms_norm_strided_residual_written_in_place():
    """A residual that is a non-contiguous view still gets the sum written into its own storage."""
    x = torch.randn(5, 64)
    weight = torch.randn(64)
    big = torch.randn(5, 2, 64)
    big_ref = big.clone()
    y_ref, _ = mod.rms_norm_reference(x, weight, 1e-6, big_ref[:, 1])
    with poisoned_outputs(mod):
        y, _ = mod.rms_norm_triton(x, weight, 1e-6, big[:, 1])
    assert torch.equal(big, big_ref)
    assert_close_rel(y, y_ref, torch.float32)
