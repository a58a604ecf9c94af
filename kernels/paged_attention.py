"""Paged decode attention (one query token per sequence over its block table): torch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nreft_engine.kernels.attention_dot import LOG2E, attention_dot, online_softmax_step


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of q [B, H, D] over each sequence's first context_lens[b] cached tokens; returns
    [B, H, D]."""
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    width = -(-int(context_lens.max()) // block_size)
    table = block_tables[:, :width].long()
    length = width * block_size
    mask = torch.arange(length, device=q.device)[None, :] < context_lens[:, None]
    invalid = ~mask[:, None, :, None]  # stale slots may hold anything, NaN included: 0 * NaN would leak
    k = k_cache[table].view(batch, length, kv_heads, dim).transpose(1, 2).masked_fill(invalid, 0)
    v = v_cache[table].view(batch, length, kv_heads, dim).transpose(1, 2).masked_fill(invalid, 0)
    qg = q.view(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(batch, heads, dim)


# --------------------------------------------------------------------------------------------------
# Triton kernels: split-KV flash-decoding (stage 1) + log-sum-exp merge of the splits (stage 2)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    bt_ptr,
    ctx_ptr,
    out_ptr,
    opart_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_ps,  # partial outputs [B, H, S, D] (fp32)
    stride_lb,
    stride_lh,  # log-sum-exps (base 2) [B, H, S]
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTITION: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (batch, kv heads, splits). A program attends the GROUP query heads of one kv head to the
    tokens [split * PARTITION, min((split + 1) * PARTITION, context)) of one sequence, so each K/V
    tile is loaded once for the whole GQA group. Tokens are gathered through the block table one
    tile of BLOCK_N at a time, which works for any page size and any (non-contiguous) block table."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    start = split * PARTITION
    if start < ctx:
        end = tl.minimum(start + PARTITION, ctx)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        gmask = g < GROUP
        dmask = d < HEAD_DIM
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=gmask[:, None] & dmask[None, :],
            other=0.0,
        )
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        k_base = kc_ptr + kvh.to(tl.int64) * stride_kh
        v_base = vc_ptr + kvh.to(tl.int64) * stride_vh
        offs_n = tl.arange(0, BLOCK_N)
        for tile in range(start, end, BLOCK_N):
            toks = tile + offs_n
            tmask = toks < end
            phys = tl.load(bt_ptr + b * stride_btb + toks // PAGE, mask=tmask, other=0).to(tl.int64)
            slot_off = toks % PAGE
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(
                k_base + phys[:, None] * stride_kb + slot_off[:, None] * stride_kt + d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            v = tl.load(
                v_base + phys[:, None] * stride_vb + slot_off[:, None] * stride_vt + d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            s = attention_dot(q, tl.trans(k), IEEE, UPCAST)
            s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, IEEE, UPCAST)
        out = acc / l_i[:, None]
        omask = gmask[:, None] & dmask[None, :]
        if SINGLE_SPLIT:
            tl.store(
                out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=omask,
            )
        else:
            tl.store(
                opart_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + d[None, :],
                out,
                mask=omask,
            )
            tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i), mask=gmask)


@triton.jit
def _paged_decode_merge_kernel(
    ctx_ptr,
    opart_ptr,
    lse_ptr,
    out_ptr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PARTITION: tl.constexpr,
    S_PAD: tl.constexpr,
    S_CHUNK: tl.constexpr,
):
    """Grid (batch, heads): combine the splits' partial outputs with their log-sum-exps (base 2)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    ctx = tl.load(ctx_ptr + b)
    n_splits = tl.cdiv(ctx, PARTITION)
    s_all = tl.arange(0, S_PAD)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s_all, mask=s_all < n_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    acc = tl.zeros([D_PAD], tl.float32)
    total = 0.0
    for s0 in range(0, n_splits, S_CHUNK):
        s = s0 + tl.arange(0, S_CHUNK)
        smask = s < n_splits
        w = tl.exp2(tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf")) - m)
        o = tl.load(
            opart_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
            mask=smask[:, None] & dmask[None, :],
            other=0.0,
        )
        acc += tl.sum(w[:, None] * o, axis=0)
        total += tl.sum(w, axis=0)
    out = (acc / total).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out, mask=dmask)


def _decode_partition(batch: int, kv_heads: int, max_tokens: int, block_n: int) -> int:
    """Tokens per split: enough (batch x kv head x split) programs to fill an H100 (132 SMs) about
    four times over, splits of 64..512 tokens (a multiple of the tile). Host-side shapes only: no sync.
    `max_tokens` comes from the block table's width, so a runner should pass tables no wider than the
    batch's longest sequence needs (programs past a sequence's end exit at once, but the split size
    is chosen for the width)."""
    target_programs = 4 * 132
    want_splits = max(1, -(-target_programs // max(1, batch * kv_heads)))
    part = triton.next_power_of_2(max(1, -(-max_tokens // want_splits)))
    return max(block_n, min(512, max(64, part)))


def _paged_decode_attention_launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partition_size: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """The two launches behind `paged_decode_attention_triton`; split and tile sizes and the split kernel's
    warps / pipeline stages can be forced (tests and tuning sweeps), else they are chosen from the shapes."""
    batch, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    assert heads % kv_heads == 0, "query heads must be a multiple of kv heads"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert block_tables.stride(-1) == 1
    group = heads // kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    d_pad = triton.next_power_of_2(dim)
    if block_n is None:  # fp32 tiles (the tests' dtype) are halved to stay clear of register spills
        block_n = (64 if d_pad >= 128 else 128) // (2 if q.dtype == torch.float32 else 1)
    max_tokens = block_tables.shape[1] * page
    part = partition_size or _decode_partition(batch, kv_heads, max_tokens, block_n)
    assert part % block_n == 0, "the partition must be a multiple of the tile"
    n_splits = triton.cdiv(max_tokens, part)
    single = n_splits == 1
    if single:
        opart = lse = out  # unused
        p_strides, l_strides = (0, 0, 0), (0, 0)
    else:
        opart = torch.empty((batch, heads, n_splits, dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, heads, n_splits), dtype=torch.float32, device=q.device)
        p_strides, l_strides = opart.stride()[:3], lse.stride()[:2]
    ctx = context_lens if context_lens.dtype == torch.int32 else context_lens.to(torch.int32)
    g_pad = max(16, triton.next_power_of_2(group))
    _paged_decode_split_kernel[(batch, kv_heads, n_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        ctx,
        out,
        opart,
        lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        *p_strides,
        *l_strides,
        float(scale) * LOG2E,
        GROUP=group,
        G_PAD=g_pad,
        HEAD_DIM=dim,
        D_PAD=d_pad,
        PAGE=page,
        BLOCK_N=block_n,
        PARTITION=part,
        SINGLE_SPLIT=single,
        IEEE=q.dtype == torch.float32,
        UPCAST=not q.is_cuda and q.dtype != torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not single:
        s_pad = triton.next_power_of_2(n_splits)
        _paged_decode_merge_kernel[(batch, heads)](
            ctx,
            opart,
            lse,
            out,
            *p_strides,
            *l_strides,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=dim,
            D_PAD=d_pad,
            PARTITION=part,
            S_PAD=s_pad,
            S_CHUNK=min(16, s_pad),
            num_warps=4,
        )
    return out


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton version of `paged_decode_attention_reference` (no host sync: the grid comes from shapes)."""
    return _paged_decode_attention_launch(q, k_cache, v_cache, block_tables, context_lens, scale)
