"""nreft_engine._C.copy_blocks (CPU) against plain torch indexing, and its argument checks."""

import pytest
import torch

from nreft_engine import _C

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def caches(shape, dtype):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_matches_indexing(dtype):
    k_cache, v_cache = caches((3, 6, 2, 2, 4), dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    src_dst = torch.tensor([[1, 4], [1, 5], [0, 2]])  # one source to several destinations is allowed
    _C.copy_blocks(k_cache, v_cache, src_dst)
    k_ref[:, src_dst[:, 1]] = k_ref[:, src_dst[:, 0]]
    v_ref[:, src_dst[:, 1]] = v_ref[:, src_dst[:, 0]]
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_copy_blocks_empty_is_a_no_op():
    k_cache, v_cache = caches((1, 2, 2, 1, 4), torch.float32)
    before = k_cache.clone()
    _C.copy_blocks(k_cache, v_cache, torch.empty(0, 2, dtype=torch.int64))
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize(
    "pairs, exc, match",
    [
        ([[0, 6]], ValueError, "block id 6"),
        ([[-1, 2]], ValueError, "block id -1"),
        ([[0, 2], [1, 2]], ValueError, "appears twice"),
        ([[0, 2], [2, 3]], ValueError, "both a source and a destination"),
        # the whole message: a static libstdc++ in _C beside torch's shared one broke its formatting
        ([0, 2], ValueError, r"^copy_blocks: src_dst must be \[N, 2\], got shape \[2\]$"),
    ],
)
def test_copy_blocks_bad_pairs_raise_and_copy_nothing(pairs, exc, match):
    k_cache, v_cache = caches((2, 6, 2, 1, 4), torch.float32)
    before = k_cache.clone()
    with pytest.raises(exc, match=match):
        _C.copy_blocks(k_cache, v_cache, torch.tensor(pairs))
    assert torch.equal(k_cache, before)


def test_copy_blocks_bad_caches_raise():
    k_cache, v_cache = caches((2, 6, 2, 1, 4), torch.float32)
    pairs = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="5 dims"):
        _C.copy_blocks(k_cache[0], v_cache[0], pairs)
    with pytest.raises(ValueError, match="shape mismatch"):
        _C.copy_blocks(k_cache, v_cache[:, :5], pairs)
    with pytest.raises(TypeError, match="int64"):
        _C.copy_blocks(k_cache, v_cache, pairs.int())
    with pytest.raises(ValueError, match="contiguous"):
        _C.copy_blocks(k_cache.transpose(1, 2), v_cache.transpose(1, 2), pairs)
