"""The sampler's hot path: temperature / top-k / top-p / min-p filtering, sampling, exact log-prob.

The torch reference. Filtering masks tokens with -inf; every threshold keeps ties, so the same logits
always give the same kept set (the trainer re-applies `filter_logits` to recompute behaviour log-probs).
Sampling is inverse-CDF over the kept tokens in vocabulary order with one given uniform draw per row.
"""

from __future__ import annotations

import torch


def filter_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Tempered fp32 logits [B, V] with filtered-out tokens at -inf. Temperature 0 is treated as 1.

    top_k <= 0 keeps all; top_p = 1 keeps all; min_p = 0 keeps all. Order: temperature, top-k, top-p, min-p.
    Differentiable with respect to `logits` (the masks are constants).
    """
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(torch.float32)
    scaled = logits.float() / t[:, None]
    vocab = scaled.shape[-1]
    needs_sort = bool(((top_k > 0) & (top_k < vocab)).any() or (top_p < 1).any())
    if needs_sort:
        with torch.no_grad():
            sorted_vals = scaled.detach().sort(dim=-1, descending=True).values
            k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab)).long()
            kth = sorted_vals.gather(1, (k - 1)[:, None])
            sorted_vals = sorted_vals.masked_fill(sorted_vals < kth, float("-inf"))
            probs = sorted_vals.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            # top_p >= 1 keeps all: without the guard, fp32 cumsum rounding reaching 1.0 dropped the tail of
            # rows that asked for no top-p whenever another row of the batch needed the sort
            drop = (mass_before >= top_p[:, None].float()) & (top_p < 1)[:, None]
            drop[:, 0] = False
            last_kept = (~drop).sum(dim=-1, keepdim=True) - 1
            threshold = torch.maximum(sorted_vals.gather(1, last_kept), kth)
        scaled = scaled.masked_fill(scaled.detach() < threshold, float("-inf"))
    if bool((min_p > 0).any()):
        with torch.no_grad():
            probs = scaled.detach().softmax(dim=-1)
            floor = min_p[:, None].float() * probs.max(dim=-1, keepdim=True).values
            drop = probs < floor
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniform: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row with the given uniforms; return (tokens int64 [B], log-probs fp32 [B])."""
    logprobs = filter_logits(logits, temperature, top_k, top_p, min_p).log_softmax(dim=-1)
    cdf = logprobs.exp().cumsum(dim=-1)
    target = (uniform.float() * cdf[:, -1])[:, None]
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(1)
    sampled = torch.minimum(sampled, torch.full_like(sampled, cdf.shape[-1] - 1))
    greedy = logprobs.argmax(dim=-1)
    tokens = torch.where(temperature > 0, sampled, greedy)
    fallen_off = logprobs.gather(1, tokens[:, None]).squeeze(1) == float("-inf")
    tokens = torch.where(fallen_off, greedy, tokens)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


# --------------------------------------------------------------------------------------------------
# Triton kernel: the whole hot path for one row per program, no sort and no host sync.
#
# Thresholds are found by a search over the fp32 values themselves, mapped to order-preserving int32
# keys, testing N_CAND candidate thresholds per pass over the row (so ~8 passes instead of 32):
#   top-k : the largest t with  #{x >= t} >= k            -> the k-th largest value (ties kept);
#   top-p : the smallest t >= kth with  mass{x > t} < p * mass{x >= kth}   -> the value of the last
#           token the reference keeps in sorted order (its mass_before < p), so ties are kept alike;
#   min-p : exp(x - max) >= min_p  (prob >= min_p * max prob).
# Then one pass for the normalizer and one (early-exit) pass for inverse-CDF sampling in vocab order.
# --------------------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _order_key(x):
    """fp32 -> int32 with the same order (x < y  <=>  key(x) < key(y)); -0.0 and +0.0 share key 0."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(bits == -2147483648, 0, key)


@triton.jit
def _load_scaled(row_ptr, offs, vocab, t):
    """Tempered fp32 logits of one chunk (exactly as torch divides), -inf past the vocabulary."""
    mask = offs < vocab
    x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    return tl.math.div_rn(x, t), mask


@triton.jit
def _sample_kernel(
    logits_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr, u_ptr, tok_ptr, lp_ptr,
    stride_row, vocab,
    BLOCK: tl.constexpr, N_CAND: tl.constexpr,
):
    """One row per program. Keys are int32; candidate thresholds are computed in int64 (no overflow)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    temp = tl.load(temp_ptr + row).to(tl.float32)
    t = tl.where(temp > 0, temp, 1.0)
    top_k = tl.load(topk_ptr + row).to(tl.int64)
    top_p = tl.load(topp_ptr + row).to(tl.float32)
    min_p = tl.load(minp_ptr + row).to(tl.float32)
    offs0 = tl.arange(0, BLOCK)
    cand_j = tl.arange(0, N_CAND).to(tl.int64)
    NO_KEY: tl.constexpr = -2147483647 - 1

    # pass 1: max (and its first index, for greedy), smallest key
    m = float("-inf")
    arg = 0
    min_key = 2147483647
    for start in range(0, vocab, BLOCK):
        offs = start + offs0
        x, mask = _load_scaled(row_ptr, offs, vocab, t)
        cm = tl.max(x, axis=0)
        cidx = tl.min(tl.where(x == cm, offs, 2147483647), axis=0)
        take = cm > m
        arg = tl.where(take, cidx, arg)
        m = tl.where(take, cm, m)
        min_key = tl.minimum(min_key, tl.min(tl.where(mask, _order_key(x), 2147483647), axis=0))
    max_key = _order_key(m)
    thresh = min_key  # keeps everything

    # top-k: the largest t in [lo, hi] with count(key >= t) >= k (lo always satisfies)
    if (top_k > 0) & (top_k < vocab):
        lo = thresh.to(tl.int64)
        hi = max_key.to(tl.int64)
        while lo < hi:
            step = tl.maximum((hi - lo + N_CAND - 1) // N_CAND, 1)
            cands64 = tl.minimum(lo + (cand_j + 1) * step, hi)
            cands = cands64.to(tl.int32)
            counts = tl.zeros([N_CAND], tl.int32)
            for start in range(0, vocab, BLOCK):
                offs = start + offs0
                x, mask = _load_scaled(row_ptr, offs, vocab, t)
                key = tl.where(mask, _order_key(x), NO_KEY)
                counts += tl.sum((key[None, :] >= cands[:, None]).to(tl.int32), axis=1)
            sat = counts.to(tl.int64) >= top_k
            new_lo = tl.max(tl.where(sat, cands64, lo), axis=0)
            hi = tl.min(tl.where(sat, hi, cands64 - 1), axis=0)
            lo = new_lo
        thresh = lo.to(tl.int32)

    # top-p: the smallest t in [kth, max] with mass(key > t) < p * mass(key >= kth) (hi always "satisfies")
    if top_p < 1.0:
        z = 0.0
        for start in range(0, vocab, BLOCK):
            offs = start + offs0
            x, mask = _load_scaled(row_ptr, offs, vocab, t)
            z += tl.sum(tl.where(_order_key(x) >= thresh, tl.exp(x - m), 0.0), axis=0)
        limit = top_p * z
        lo = thresh.to(tl.int64)
        hi = max_key.to(tl.int64)
        while lo < hi:
            step = tl.maximum((hi - lo + N_CAND - 1) // N_CAND, 1)
            cands64 = tl.minimum(lo + cand_j * step, hi)
            cands = cands64.to(tl.int32)
            mass = tl.zeros([N_CAND], tl.float32)
            for start in range(0, vocab, BLOCK):
                offs = start + offs0
                x, mask = _load_scaled(row_ptr, offs, vocab, t)
                key = _order_key(x)
                w = tl.where(key >= thresh, tl.exp(x - m), 0.0)
                mass += tl.sum(tl.where(key[None, :] > cands[:, None], w[None, :], 0.0), axis=1)
            sat = mass < limit
            new_hi = tl.min(tl.where(sat, cands64, hi), axis=0)
            lo = tl.max(tl.where(sat, lo, cands64 + 1), axis=0)
            hi = new_hi
        thresh = hi.to(tl.int32)

    # normalizer of the kept set (top-k/top-p threshold, then min-p)
    z = 0.0
    for start in range(0, vocab, BLOCK):
        offs = start + offs0
        x, mask = _load_scaled(row_ptr, offs, vocab, t)
        w = tl.exp(x - m)
        keep = (_order_key(x) >= thresh) & (w >= min_p) & mask
        z += tl.sum(tl.where(keep, w, 0.0), axis=0)
    log_z = tl.log(z)

    # inverse CDF in vocabulary order: the first token whose running mass exceeds u * z
    token = arg
    if temp > 0:
        target = tl.load(u_ptr + row).to(tl.float32) * z
        hit = 2147483647
        running = 0.0
        start = 0
        while (start < vocab) & (hit == 2147483647):
            offs = start + offs0
            x, mask = _load_scaled(row_ptr, offs, vocab, t)
            w = tl.exp(x - m)
            keep = (_order_key(x) >= thresh) & (w >= min_p) & mask
            w = tl.where(keep, w, 0.0)
            cdf = running + tl.cumsum(w, axis=0)
            hit = tl.min(tl.where((cdf > target) & mask, offs, 2147483647), axis=0)
            running += tl.sum(w, axis=0)
            start += BLOCK
        # nothing exceeded the target (rounding): the reference clamps to the last token
        token = tl.where(hit == 2147483647, vocab - 1, hit)
        # a token outside the kept set (only through rounding at the very end) falls back to greedy
        xt = tl.math.div_rn(tl.load(row_ptr + token).to(tl.float32), t)
        kept = (_order_key(xt) >= thresh) & (tl.exp(xt - m) >= min_p) & (xt > float("-inf"))
        token = tl.where(kept, token, arg)
    x_tok = tl.math.div_rn(tl.load(row_ptr + token).to(tl.float32), t)
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(lp_ptr + row, x_tok - m - log_z)


def sample_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniform: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `sample_reference`: same tokens and log-probs for the same uniforms; one launch,
    no host sync (so it can be captured in a CUDA graph)."""
    batch, vocab = logits.shape
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return tokens, logprobs
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    block = min(1024 if logits.is_cuda else 4096, triton.next_power_of_2(vocab))
    _sample_kernel[(batch,)](
        logits, temperature.contiguous(), top_k.contiguous(), top_p.contiguous(), min_p.contiguous(),
        uniform.contiguous(), tokens, logprobs,
        logits.stride(0), vocab,
        BLOCK=block, N_CAND=16,
        num_warps=8,
    )
    return tokens, logprobs
