"""rope_write_kv_triton (RoPE on q and k fused with the paged-cache write) == rope_write_kv_reference."""

import pytest
import torch
from kernel_testing import assert_close_rel, poisoned_outputs

from nreft_engine.kernels import rope as mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("page", [16, 32])
def test_rope_write_kv_matches_reference(dtype, head_dim, group, page):
    gen = torch.Generator().manual_seed(head_dim * 100 + group * 10 + page)
    kv_heads = 2
    heads = group * kv_heads
    tokens, num_blocks, max_pos = 10, 6, 4096
    # q, k, v as strided views of one fused projection output (as the model produces them)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    cos, sin = mod.rope_cos_sin(max_pos, head_dim)
    # random distinct slots across the whole (non-contiguous) cache, some padding (-1)
    slots = torch.randperm(num_blocks * page, generator=gen)[:tokens]
    slots[[2, 7, 9]] = -1
    shape = (num_blocks, page, kv_heads, head_dim)
    kc_ref = torch.full(shape, float("nan"), dtype=dtype)
    vc_ref = torch.full(shape, float("nan"), dtype=dtype)
    kc, vc = kc_ref.clone(), vc_ref.clone()
    q_ref, k_ref = mod.rope_write_kv_reference(q, k, v, positions, cos, sin, kc_ref, vc_ref, slots)
    with poisoned_outputs(mod):
        q_rot, k_rot = mod.rope_write_kv_triton(q, k, v, positions, cos, sin, kc, vc, slots)
    assert_close_rel(q_rot, q_ref, dtype)
    assert_close_rel(k_rot, k_ref, dtype)
    # exactly the slots the reference wrote are written (the rest stay NaN), with the same values
    assert torch.equal(torch.isnan(kc), torch.isnan(kc_ref))
    assert torch.equal(torch.isnan(vc), torch.isnan(vc_ref))
    written = ~torch.isnan(kc_ref)
    assert_close_rel(kc[written], kc_ref[written], dtype)
    assert torch.equal(vc[written], vc_ref[written])  # v is copied, not computed
