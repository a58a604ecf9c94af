"""prefill_attention_triton (causal flash attention, packed varlen prompts) == prefill_attention_reference."""

import pytest
import torch
from kernel_testing import assert_close_rel, poisoned_outputs

from nreft_engine.kernels import prefill_attention as mod

# prompt lengths: 1, 15, 17 and lengths that are not multiples of the tiles (BLOCK_M 64 / BLOCK_N 16..64)
LENGTHS = [15, 1, 17, 83]


def _packed(dtype, head_dim, group, lengths, kv_heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    heads = group * kv_heads
    tokens = sum(lengths)
    # q, k, v as strided views of one fused projection output
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, head_dim**-0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_prefill_attention_matches_reference(dtype, head_dim, group):
    q, k, v, cu, scale = _packed(dtype, head_dim, group, LENGTHS, seed=group + head_dim)
    ref = mod.prefill_attention_reference(q, k, v, cu, scale)
    with poisoned_outputs(mod):
        out = mod.prefill_attention_triton(q, k, v, cu, scale)
    assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (64, 64)])
def test_prefill_attention_tile_shapes_and_empty_prompt(block_m, block_n):
    """Other tile shapes, a zero-length entry in cu_seqlens, and a prompt spanning several query tiles."""
    q, k, v, cu, scale = _packed(torch.float32, 64, 4, [40, 0, 1, 130], kv_heads=1, seed=block_m)
    ref = mod.prefill_attention_reference(q, k, v, cu, scale)
    with poisoned_outputs(mod):
        out = mod._prefill_attention_launch(q, k, v, cu, scale, block_m=block_m, block_n=block_n)
    assert_close_rel(out, ref, torch.float32)
