"""nreft_engine._C.write_kv / copy_blocks (CPU) against plain torch indexing, and their argument checks."""

import pytest
import torch

from nreft_engine import _C

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def caches(shape, dtype):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def ref_write_kv(k, v, k_cache, v_cache, slots):
    keep = slots >= 0
    heads, dim = k.shape[1:]
    k_cache.view(-1, heads, dim)[slots[keep]] = k[keep]
    v_cache.view(-1, heads, dim)[slots[keep]] = v[keep]


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_indexing(dtype):
    num_blocks, block_size, heads, dim, tokens = 5, 4, 2, 8, 7
    k_cache, v_cache = caches((num_blocks, block_size, heads, dim), dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k, v = torch.randn(tokens, heads, dim).to(dtype), torch.randn(tokens, heads, dim).to(dtype)
    slots = torch.tensor([19, 0, -1, 6, 7, -5, 12])
    _C.write_kv(k, v, k_cache, v_cache, slots)
    ref_write_kv(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_write_kv_strided_inputs_and_cache_layer_view():
    """k, v sliced out of a fused qkv tensor; the caches are one layer of a 5-D cache."""
    tokens, heads, dim = 6, 3, 4
    qkv = torch.randn(tokens, 3 * heads, dim)
    k, v = qkv[:, heads : 2 * heads], qkv[:, 2 * heads :]
    k_cache, v_cache = caches((2, 4, 2, heads, dim), torch.float32)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([3, 2, 1, 0, 7, -1])
    _C.write_kv(k, v, k_cache[1], v_cache[1], slots)
    ref_write_kv(k, v, k_ref[1], v_ref[1], slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_write_kv_no_tokens_is_a_no_op():
    k_cache, v_cache = caches((2, 2, 1, 4), torch.float32)
    before = k_cache.clone()
    empty = torch.empty(0, 1, 4)
    _C.write_kv(empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int64))
    assert torch.equal(k_cache, before)


K, CACHE = (3, 2, 4), (4, 2, 2, 4)  # shapes that fit together


@pytest.mark.parametrize(
    "k_shape, v_shape, cache_shape, slots, slot_dtype, exc, match",
    [
        # the whole message: a static libstdc++ in _C beside torch's shared one broke its formatting
        ((3, 8), (3, 8), CACHE, [0, 1, 2], torch.int64, ValueError, r"k must be \[T, KVH, D\], got shape \[3, 8\]$"),
        (K, (3, 2, 5), CACHE, [0, 1, 2], torch.int64, ValueError, "shape mismatch"),
        (K, K, (4, 2, 3, 4), [0, 1, 2], torch.int64, ValueError, "does not match"),
        (K, K, (8, 2, 4), [0, 1, 2], torch.int64, ValueError, "4 dims"),
        (K, K, CACHE, [0, 1], torch.int64, ValueError, "slot_mapping must be"),
        (K, K, CACHE, [0, 1, 2], torch.float32, TypeError, "slot_mapping must be int64"),
        (K, K, CACHE, [0, 8, 2], torch.int64, ValueError, r"slot_mapping\[1\] = 8"),
    ],
)
def test_write_kv_bad_arguments_raise_and_write_nothing(
    k_shape, v_shape, cache_shape, slots, slot_dtype, exc, match
):
    k_cache, v_cache = caches(cache_shape, torch.float32)
    before = k_cache.clone()
    with pytest.raises(exc, match=match):
        _C.write_kv(
            torch.ones(k_shape), torch.ones(v_shape), k_cache, v_cache, torch.tensor(slots, dtype=slot_dtype)
        )
    assert torch.equal(k_cache, before)


def test_write_kv_dtype_mismatch():
    k_cache, v_cache = caches(CACHE, torch.bfloat16)
    k = torch.ones(K)
    with pytest.raises(TypeError, match="dtype"):
        _C.write_kv(k, k, k_cache, v_cache, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="dtype mismatch"):
        _C.write_kv(k, k, k_cache, v_cache.float(), torch.tensor([0, 1, 2]))


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
        ([0, 2], ValueError, r"\[N, 2\]"),
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
