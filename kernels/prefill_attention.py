"""Causal attention over packed variable-length prompts, whole or in chunks over the paged cache: the torch
references, and the Triton kernel of whole prompts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

try:  # optional extra: `pip install nreft-engine[flash]`
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_varlen = None

from nreft_engine.kernels.attention_dot import LOG2E, attention_dot, online_softmax_step


def prefill_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] packed by cu_seqlens [B+1]; each sequence attends causally to itself.
    SDPA on 4-D [1, heads, T, D] views: the layout its flash kernels take (memory linear in T; a 3-D input
    falls back to the math path, which materializes [heads, T, T] scores)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        out[start:end] = _causal_sdpa(q[start:end], k[start:end], v[start:end], scale, None)
    return out


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Chunks of prompts over their paged K/V (chunked prefill): chunk b, rows cu_seqlens[b]:cu_seqlens[b+1]
    of q [T, H, D], holds the last queries of a sequence whose first context_lens[b] tokens (the chunk's own
    included) are in the cache at block_tables[b]; each query attends causally to the tokens up to itself."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    bounds, lens = cu_seqlens.tolist(), context_lens.tolist()
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        queries, context = end - start, lens[b]
        blocks = block_tables[b, : -(-context // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:context]
        v = v_cache[blocks].flatten(0, 1)[:context]
        mask = torch.ones(queries, context, dtype=torch.bool, device=q.device).tril(context - queries)
        out[start:end] = _causal_sdpa(q[start:end], k, v, scale, mask)
    return out


def _causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA of q [Tq, H, D] over k/v [Tk, KVH, D], causal (aligned at the start) or under `mask` [Tq, Tk]."""
    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).unsqueeze(0)

    out = F.scaled_dot_product_attention(
        heads_first(q), heads_first(k), heads_first(v), attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


# --------------------------------------------------------------------------------------------------
# Triton kernel (flash-attention forward over packed varlen prompts) + flash-attn when importable
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attend_tile(
    q,
    m_i,
    l_i,
    acc,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    q_pos,
    seq_len,
    lo,
    hi,
    qk_scale,
    d,
    dmask,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online-softmax accumulation of keys [lo, hi) (positions local to the sequence)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        kpos = n0 + offs_n
        kmask = kpos < seq_len
        kv_mask = kmask[:, None] & dmask[None, :]
        k = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        s = attention_dot(q, tl.trans(k), IEEE, UPCAST)
        s = s * qk_scale
        if MASKED:
            keep = (kpos[None, :] <= q_pos[:, None]) & kmask[None, :]
            s = tl.where(keep, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, IEEE, UPCAST)
    return m_i, l_i, acc


@triton.jit
def _prefill_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    cu_ptr,
    tile_cu_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    n_seqs,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (query tiles of all sequences, upper bound; query heads). tile_cu [B+1] is the prefix sum
    of each sequence's tile count, computed on the device, so the launch needs no host sync."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    n_tiles = tl.load(tile_cu_ptr + n_seqs)
    if pid < n_tiles:
        # the sequence owning this tile: largest b with tile_cu[b] <= pid
        lo = 0
        hi = n_seqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if tl.load(tile_cu_ptr + mid) <= pid:
                lo = mid
            else:
                hi = mid
        seq_start = tl.load(cu_ptr + lo).to(tl.int64)
        seq_len = tl.load(cu_ptr + lo + 1) - tl.load(cu_ptr + lo)
        m_start = (pid - tl.load(tile_cu_ptr + lo)) * BLOCK_M
        q_pos = m_start + tl.arange(0, BLOCK_M)
        qmask = q_pos < seq_len
        d = tl.arange(0, D_PAD)
        dmask = d < HEAD_DIM
        kvh = h // GROUP
        q = tl.load(
            q_ptr + (seq_start + q_pos[:, None]) * stride_qt + h * stride_qh + d[None, :],
            mask=qmask[:, None] & dmask[None, :],
            other=0.0,
        )
        k_base = k_ptr + seq_start * stride_kt + kvh * stride_kh
        v_base = v_ptr + seq_start * stride_vt + kvh * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        # keys before the tile's first query: no mask needed
        m_i, l_i, acc = _attend_tile(
            q,
            m_i,
            l_i,
            acc,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            q_pos,
            seq_len,
            0,
            m_start,
            qk_scale,
            d,
            dmask,
            BLOCK_N,
            False,
            IEEE,
            UPCAST,
        )
        # the diagonal: causal + length mask
        m_i, l_i, acc = _attend_tile(
            q,
            m_i,
            l_i,
            acc,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            q_pos,
            seq_len,
            m_start,
            tl.minimum(m_start + BLOCK_M, seq_len),
            qk_scale,
            d,
            dmask,
            BLOCK_N,
            True,
            IEEE,
            UPCAST,
        )
        out = acc / l_i[:, None]
        tl.store(
            o_ptr + (seq_start + q_pos[:, None]) * stride_ot + h * stride_oh + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=qmask[:, None] & dmask[None, :],
        )


def _prefill_attention_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    assert heads % kv_heads == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    n_seqs = cu_seqlens.numel() - 1
    if tokens == 0 or n_seqs <= 0:
        return out
    d_pad = triton.next_power_of_2(dim)
    if block_m is None:
        block_m = 128 if q.is_cuda and q.dtype != torch.float32 else 64
    if block_n is None:
        block_n = 64 if d_pad <= 128 else 32
    assert block_m % block_n == 0
    cu = cu_seqlens.to(torch.int32)
    lens = cu[1:] - cu[:-1]
    tile_cu = torch.zeros(n_seqs + 1, dtype=torch.int32, device=q.device)
    tile_cu[1:] = torch.cumsum((lens + block_m - 1) // block_m, 0)
    grid = (triton.cdiv(tokens, block_m) + n_seqs, heads)
    num_warps = 8 if (block_m >= 128 and d_pad >= 128) else 4
    _prefill_attention_kernel[grid](
        q,
        k,
        v,
        out,
        cu,
        tile_cu,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        n_seqs,
        float(scale) * LOG2E,
        GROUP=heads // kv_heads,
        HEAD_DIM=dim,
        D_PAD=d_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32,
        UPCAST=not q.is_cuda and q.dtype != torch.float32,
        num_warps=num_warps,
        num_stages=3,
    )
    return out


def prefill_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Triton version of `prefill_attention_reference`: flash-attn's varlen kernel for fp16/bf16 CUDA
    tensors when flash-attn is importable (it needs the longest length: one host sync), else ours."""
    if _flash_varlen is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu = cu_seqlens.to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        return _flash_varlen(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
    return _prefill_attention_launch(q, k, v, cu_seqlens, scale)
