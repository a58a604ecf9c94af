"""RoPE on q and k fused with writing k and v into their paged-cache slots: the torch reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_cos_sin(
    max_pos: int, dim: int, base: float = 10000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables [max_pos, dim / 2] of the plain RoPE frequencies base^(-2i / dim), for tests and
    benchmarks (the engine takes its model's own: models/weights.py)."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    ang = torch.arange(max_pos, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim of x [T, heads, D] by cos/sin [T, D/2] (HF rotate_half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def write_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k/v [T, KVH, D] into caches [blocks, block_size, KVH, D] at flat slots (negative = skip)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def rope_write_kv_reference(
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
    """Rotate q and k at `positions`, store rotated k and v in the cache, return (q_rot, k_rot)."""
    c, s = cos[positions], sin[positions]
    q_rot, k_rot = apply_rope(q, c, s), apply_rope(k, c, s)
    write_kv_reference(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot, k_rot


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    stride_st,
    stride_sh,
    stride_dt,
    stride_dh,
    tok,
    n_heads,
    c,
    s,
    HALF: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """Rotate all heads of one token (HF rotate_half on the two halves of D); return the rotated halves."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < n_heads) & (d < HALF)
    base = src_ptr + tok * stride_st + heads * stride_sh + d
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (f1 * c - f2 * s).to(x1.dtype)
    o2 = (f2 * c + f1 * s).to(x1.dtype)
    out = dst_ptr + tok * stride_dt + heads * stride_dh + d
    tl.store(out, o1, mask=mask)
    tl.store(out + HALF, o2, mask=mask)
    return o1, o2, mask


@triton.jit
def _rope_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    qo_ptr,
    ko_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_ct,
    stride_ch,  # cache viewed as [slots, KVH, D]
    n_q_heads,
    n_kv_heads,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    QH_PAD: tl.constexpr,
    KVH_PAD: tl.constexpr,
):
    """One token per program: rotate q and k, store q_rot/k_rot, write k_rot and v into the cache slot."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, HALF_PAD)[None, :]
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=d < HALF, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_sin + d, mask=d < HALF, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr,
        qo_ptr,
        stride_qt,
        stride_qh,
        stride_qot,
        stride_qoh,
        tok,
        n_q_heads,
        c,
        s,
        HALF,
        QH_PAD,
        HALF_PAD,
    )
    k1, k2, kmask = _rotate_heads(
        k_ptr,
        ko_ptr,
        stride_kt,
        stride_kh,
        stride_kot,
        stride_koh,
        tok,
        n_kv_heads,
        c,
        s,
        HALF,
        KVH_PAD,
        HALF_PAD,
    )
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, KVH_PAD)[:, None]
        kc = kc_ptr + slot * stride_ct + heads * stride_ch + d
        tl.store(kc, k1.to(kc_ptr.dtype.element_ty), mask=kmask)
        tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty), mask=kmask)
        vsrc = v_ptr + tok * stride_vt + heads * stride_vh + d
        v1 = tl.load(vsrc, mask=kmask, other=0.0)
        v2 = tl.load(vsrc + HALF, mask=kmask, other=0.0)
        vc = vc_ptr + slot * stride_ct + heads * stride_ch + d
        tl.store(vc, v1.to(vc_ptr.dtype.element_ty), mask=kmask)
        tl.store(vc + HALF, v2.to(vc_ptr.dtype.element_ty), mask=kmask)


def rope_write_kv_triton(
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
    """Triton version of `rope_write_kv_reference` (one launch for q, k and the cache writes)."""
    tokens, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    q_rot = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_rot = torch.empty_like(k, memory_format=torch.contiguous_format)
    if tokens == 0:
        return q_rot, k_rot
    assert dim % 2 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    kc = k_cache.view(-1, kv_heads, dim)
    vc = v_cache.view(-1, kv_heads, dim)
    half = dim // 2
    _rope_write_kv_kernel[(tokens,)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        kc,
        vc,
        slot_mapping,
        q_rot,
        k_rot,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        sin.stride(0),
        q_rot.stride(0),
        q_rot.stride(1),
        k_rot.stride(0),
        k_rot.stride(1),
        kc.stride(0),
        kc.stride(1),
        q_heads,
        kv_heads,
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        QH_PAD=triton.next_power_of_2(q_heads),
        KVH_PAD=triton.next_power_of_2(kv_heads),
        num_warps=4,
    )
    return q_rot, k_rot
