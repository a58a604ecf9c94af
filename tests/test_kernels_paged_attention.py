"""paged_decode_attention_triton (split-KV flash-decoding + LSE merge) == paged_decode_attention_reference."""

import pytest
import torch
from kernel_testing import assert_close_rel, poisoned_outputs, random_block_tables

from nreft_engine.kernels import paged_attention as mod

# 1, 15, 17 (around a 16-token page), 64 (a multiple of the split), 151 (not a multiple of any split)
CONTEXTS = [1, 15, 17, 151, 64]


def _case(dtype, head_dim, group, page, contexts, kv_heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(contexts)
    heads = group * kv_heads
    need = sum(-(-c // page) for c in contexts)
    num_blocks = need + 7  # spare blocks never referenced
    k_cache = torch.randn(num_blocks, page, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, page, kv_heads, head_dim, generator=gen).to(dtype)
    tables = random_block_tables(batch, contexts, page, num_blocks, gen, pad_to=-(-max(contexts) // page) + 2)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    ctx = torch.tensor(contexts, dtype=torch.int32)
    return q, k_cache, v_cache, tables, ctx, head_dim**-0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("page", [16, 32])
def test_paged_decode_matches_reference(dtype, head_dim, group, page):
    q, kc, vc, tables, ctx, scale = _case(
        dtype, head_dim, group, page, CONTEXTS, seed=group * page + head_dim
    )
    ref = mod.paged_decode_attention_reference(q, kc, vc, tables, ctx, scale)
    with poisoned_outputs(mod):
        # the public entry (its own split size) and a small split that cuts every long context in many
        # pieces, including a last piece shorter than the split and splits that start mid-page
        out = mod.paged_decode_attention_triton(q, kc, vc, tables, ctx, scale)
        out_split = mod._paged_decode_attention_launch(
            q, kc, vc, tables, ctx, scale, partition_size=48, block_n=16
        )
    assert_close_rel(out, ref, dtype)
    assert_close_rel(out_split, ref, dtype)


@pytest.mark.parametrize("page", [16, 48])
def test_paged_decode_single_split_and_odd_page(page):
    """One split per sequence (written directly, no merge) and a page size that is not a power of 2."""
    q, kc, vc, tables, ctx, scale = _case(torch.float32, 64, 3, page, [1, 15, 17, 100], seed=page)
    ref = mod.paged_decode_attention_reference(q, kc, vc, tables, ctx, scale)
    with poisoned_outputs(mod):
        out = mod._paged_decode_attention_launch(
            q, kc, vc, tables, ctx, scale, partition_size=256, block_n=32
        )
    assert_close_rel(out, ref, torch.float32)


def test_paged_decode_long_context():
    """32k tokens (the longest supported context) next to a short one, through the public entry."""
    q, kc, vc, tables, ctx, scale = _case(torch.float32, 64, 4, 16, [32768, 5000], kv_heads=1, seed=7)
    ref = mod.paged_decode_attention_reference(q, kc, vc, tables, ctx, scale)
    with poisoned_outputs(mod):
        out = mod.paged_decode_attention_triton(q, kc, vc, tables, ctx, scale)
    assert_close_rel(out, ref, torch.float32)
