"""The sampler's hot path: temperature / top-k / top-p / min-p filtering, sampling, exact log-prob.

The torch reference. Filtering masks tokens with -inf; every threshold keeps ties, so the same logits
always give the same kept set (the trainer re-applies `filter_logits` to recompute behaviour log-probs).
Sampling is inverse-CDF over the kept tokens in vocabulary order with one given uniform draw per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
# Triton kernels: the whole hot path with no sort and no host sync, in two launches.
#
# Rows with no filter ("plain": top-k off, top-p 1, min-p 0, any temperature) take a split-vocabulary fast
# path: `_chunk_stats_kernel` reduces every CHUNK-wide slice of every row in parallel (its max, the max's
# first index, and sum exp(x - max)); `_sample_kernel` then combines a row's chunk stats into the max and
# the normalizer, picks the chunk the uniform falls in, and scans only that chunk.
#
# Other rows walk their row serially. Thresholds are found by a search over the fp32 values themselves,
# mapped to order-preserving int32 keys, testing N_CAND candidate thresholds per pass over the row (so ~8
# passes instead of 32):
#   top-k : the largest t with  #{x >= t} >= k            -> the k-th largest value (ties kept);
#   top-p : the smallest t >= kth with  mass{x > t} < p * mass{x >= kth}   -> the value of the last
#           token the reference keeps in sorted order (its mass_before < p), so ties are kept alike;
#   min-p : exp(x - max) >= min_p  (prob >= min_p * max prob).
# Then one pass for the normalizer and, for inverse-CDF sampling in vocab order, one early-exit pass over
# the tiles' sums to find the tile of the draw, whose tokens are then scanned.
# --------------------------------------------------------------------------------------------------

# A program handles ROWS rows as one [ROWS, BLOCK] tile (ROWS = 1 on the GPU: a row per program; more
# under the CPU interpreter, whose cost is per op, not per element). Every loop runs until all its rows are
# done; a finished row just stops changing. The tempered logits x = logit / t are recomputed in every pass
# (exactly as torch divides; "+ 0.0" turns -0.0 into +0.0) with their order-preserving int32 keys
# key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  (x < y <=> key(x) < key(y)), by `_tempered_tile`.


@triton.jit
def _tempered_tile(row_ptr, offs, vocab, rmask, t):
    """A tile of tempered fp32 logits at `offs` of each row (-inf where masked), with its mask and its
    order-preserving int32 keys; `row_ptr`, `rmask` and `t` come expanded to the rank of `offs`."""
    mask = rmask & (offs < vocab)
    x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.math.div_rn(x, t) + 0.0
    bits = x.to(tl.int32, bitcast=True)
    return mask, x, bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _chunk_stats_kernel(
    logits_ptr,
    temp_ptr,
    cmax_ptr,
    carg_ptr,
    csum_ptr,
    n_rows,
    stride_row,
    vocab,
    num_chunks,
    ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """For ROWS rows and one CHUNK-wide slice of the vocabulary: the max m of the tempered logits, its
    first index, and sum exp(x - m) (0 for a slice that is all -inf)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    chunk = tl.program_id(1)
    rmask = rows < n_rows
    temp = tl.load(temp_ptr + rows, mask=rmask, other=1.0).to(tl.float32)
    t = tl.where(temp > 0, temp, 1.0)
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row
    offs = chunk * CHUNK + tl.arange(0, CHUNK)[None, :]
    _, x, _ = _tempered_tile(row_ptr[:, None], offs, vocab, rmask[:, None], t[:, None])
    m = tl.max(x, axis=1)
    arg = tl.min(tl.where(x == m[:, None], offs, 2147483647), axis=1)
    z = tl.sum(tl.exp(x - tl.where(m > float("-inf"), m, 0.0)[:, None]), axis=1)
    out = rows * num_chunks + chunk
    tl.store(cmax_ptr + out, m, mask=rmask)
    tl.store(carg_ptr + out, arg, mask=rmask)
    tl.store(csum_ptr + out, z, mask=rmask)


@triton.jit
def _plain_rows(
    row_ptr,
    rows,
    rmask,
    t,
    u,
    vocab,
    cmax_ptr,
    carg_ptr,
    csum_ptr,
    num_chunks,
    ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_CHUNKS_P2: tl.constexpr,
):
    """Rows with no filter, from their chunk stats: (max, its first index, key threshold, log of the
    normalizer, inverse-CDF token), reading the logits of the one chunk the uniform falls in."""
    BIG: tl.constexpr = 2147483647
    c = tl.arange(0, NUM_CHUNKS_P2)
    cmask = rmask[:, None] & (c < num_chunks)[None, :]
    stat = rows[:, None] * num_chunks + c[None, :]
    cmax = tl.load(cmax_ptr + stat, mask=cmask, other=float("-inf"))
    m = tl.where(rmask, tl.max(cmax, axis=1), 0.0)  # rows past the batch: keep the math finite
    arg = tl.min(tl.where(cmax == m[:, None], tl.load(carg_ptr + stat, mask=cmask, other=BIG), BIG), axis=1)
    mass = tl.load(csum_ptr + stat, mask=cmask, other=0.0) * tl.exp(cmax - m[:, None])
    z = tl.sum(mass, axis=1)
    target = u * z
    # Only a chunk or token with mass can be drawn (a parallel scan's prefix sums are not always monotone,
    # so one over a massless stretch may exceed the target first); where rounding leaves none above the
    # target, the last one with mass.
    last = tl.max(tl.where(mass > 0, c[None, :], 0), axis=1)
    above = (tl.cumsum(mass, axis=1) > target[:, None]) & (mass > 0)
    chunk = tl.min(tl.where(above, c[None, :], last[:, None]), axis=1)
    before = tl.sum(tl.where(c[None, :] < chunk[:, None], mass, 0.0), axis=1)

    offs = chunk[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    x = tl.load(row_ptr[:, None] + offs, mask=rmask[:, None] & (offs < vocab), other=float("-inf"))
    w = tl.exp(tl.math.div_rn(x.to(tl.float32), t[:, None]) + 0.0 - m[:, None])
    above = (before[:, None] + tl.cumsum(w, axis=1) > target[:, None]) & (w > 0)
    hit = tl.min(tl.where(above, offs, BIG), axis=1)
    token = tl.where(hit == BIG, tl.max(tl.where(w > 0, offs, chunk[:, None] * CHUNK), axis=1), hit)
    thresh = tl.full([ROWS], -2147483648, tl.int32)  # every key passes
    return m, arg, thresh, tl.log(tl.where(rmask, z, 1.0)), token


@triton.jit
def _filtered_rows(
    row_ptr,
    rmask,
    t,
    u,
    sampling,
    top_k,
    top_p,
    min_p,
    vocab,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    N_CAND: tl.constexpr,
):
    """Any rows, walking each row: (max, its first index, top-k/top-p key threshold, log of the kept set's
    normalizer, inverse-CDF token). Keys are int32; candidate thresholds are computed in int64 (no
    overflow). Each pass keeps per-lane partials and reduces across lanes once, after its loop (a
    cross-lane reduction per tile would serialize the loop). The searches compare every logit with N_CAND
    candidates: to keep their [N_CAND, SEARCH_BLOCK] partials in registers, they sum each run of
    BLOCK // SEARCH_BLOCK adjacent logits (one thread's vector load) into one partial first."""
    BIG: tl.constexpr = 2147483647
    FOLD: tl.constexpr = BLOCK // SEARCH_BLOCK
    offs2 = tl.arange(0, BLOCK)[None, :]
    # a tile as [1, FOLD, SEARCH_BLOCK], FOLD indexing within the runs of adjacent logits
    offs3 = (tl.arange(0, FOLD)[:, None] + tl.arange(0, SEARCH_BLOCK)[None, :] * FOLD)[None, :, :]
    row2, rmask2, t2 = row_ptr[:, None], rmask[:, None], t[:, None]
    row3, rmask3, t3 = row2[:, :, None], rmask2[:, :, None], t2[:, :, None]
    cand_j = tl.arange(0, N_CAND).to(tl.int64)

    # pass 1: max (and its first index, for greedy), smallest key
    lane_m = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
    lane_arg = tl.zeros([ROWS, BLOCK], tl.int32)
    lane_min_key = tl.full([ROWS, BLOCK], BIG, tl.int32)
    for start in range(0, vocab, BLOCK):
        mask, x, key = _tempered_tile(row2, start + offs2, vocab, rmask2, t2)
        take = x > lane_m  # strictly: a lane keeps the first index of its max
        lane_arg = tl.where(take, start + offs2, lane_arg)
        lane_m = tl.where(take, x, lane_m)
        lane_min_key = tl.minimum(lane_min_key, tl.where(mask, key, BIG))
    m = tl.max(lane_m, axis=1)
    arg = tl.min(tl.where(lane_m == m[:, None], lane_arg, BIG), axis=1)
    m = tl.where(rmask, m, 0.0)  # rows past the batch: keep the math finite
    m_bits = m.to(tl.int32, bitcast=True)
    max_key = m_bits ^ ((m_bits >> 31) & 0x7FFFFFFF)
    thresh = tl.minimum(tl.min(lane_min_key, axis=1), max_key)  # keeps everything
    m2, m3 = m[:, None], m[:, None, None]

    # top-k: the largest t in [lo, hi] with count(key >= t) >= k (lo always satisfies)
    do_k = (top_k > 0) & (top_k < vocab) & rmask
    lo = thresh.to(tl.int64)
    hi = tl.where(do_k, max_key.to(tl.int64), lo)
    while tl.max((lo < hi).to(tl.int32), axis=0) > 0:
        step = tl.maximum((hi - lo + N_CAND - 1) // N_CAND, 1)
        cands64 = tl.minimum(lo[:, None] + (cand_j[None, :] + 1) * step[:, None], hi[:, None])
        cands = cands64.to(tl.int32)[:, :, None, None]
        counts = tl.zeros([ROWS, N_CAND, SEARCH_BLOCK], tl.int32)
        for start in range(0, vocab, BLOCK):
            # no mask: masked lanes hold the key of -inf, the smallest, below the candidates of any row
            # still searching
            _, _, key = _tempered_tile(row3, start + offs3, vocab, rmask3, t3)
            counts += tl.sum((key[:, None, :, :] >= cands).to(tl.int32), axis=2)
        sat = tl.sum(counts, axis=2).to(tl.int64) >= top_k[:, None]
        new_lo = tl.max(tl.where(sat, cands64, lo[:, None]), axis=1)
        hi = tl.min(tl.where(sat, hi[:, None], cands64 - 1), axis=1)
        lo = new_lo
    thresh = lo.to(tl.int32)
    thresh2, thresh3 = thresh[:, None], thresh[:, None, None]

    # top-p: the smallest t in [kth, max] with mass(key > t) < p * mass(key >= kth) (hi always "satisfies")
    do_p = (top_p < 1.0) & rmask
    z = tl.zeros([ROWS], tl.float32)
    if tl.max(do_p.to(tl.int32), axis=0) > 0:
        lane_z = tl.zeros([ROWS, BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            _, x, key = _tempered_tile(row2, start + offs2, vocab, rmask2, t2)
            lane_z += tl.where(key >= thresh2, tl.exp(x - m2), 0.0)
        z = tl.sum(lane_z, axis=1)
    limit = top_p * z
    lo = thresh.to(tl.int64)
    hi = tl.where(do_p, max_key.to(tl.int64), lo)
    while tl.max((lo < hi).to(tl.int32), axis=0) > 0:
        step = tl.maximum((hi - lo + N_CAND - 1) // N_CAND, 1)
        cands64 = tl.minimum(lo[:, None] + cand_j[None, :] * step[:, None], hi[:, None])
        cands = cands64.to(tl.int32)[:, :, None, None]
        mass = tl.zeros([ROWS, N_CAND, SEARCH_BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            _, x, key = _tempered_tile(row3, start + offs3, vocab, rmask3, t3)
            w = tl.where(key >= thresh3, tl.exp(x - m3), 0.0)
            mass += tl.sum(tl.where(key[:, None, :, :] > cands, w[:, None, :, :], 0.0), axis=2)
        sat = tl.sum(mass, axis=2) < limit[:, None]
        new_hi = tl.min(tl.where(sat, cands64, hi[:, None]), axis=1)
        lo = tl.max(tl.where(sat, lo[:, None], cands64 + 1), axis=1)
        hi = new_hi
    thresh = hi.to(tl.int32)
    thresh2 = thresh[:, None]

    # normalizer of the kept set (top-k/top-p threshold, then min-p: prob >= min_p * max prob)
    lane_z = tl.zeros([ROWS, BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        mask, x, key = _tempered_tile(row2, start + offs2, vocab, rmask2, t2)
        w = tl.exp(x - m2)
        lane_z += tl.where((key >= thresh2) & (w >= min_p[:, None]) & mask, w, 0.0)
    z = tl.sum(lane_z, axis=1)

    # inverse CDF in vocabulary order: the first token whose running mass exceeds u * z. Find its tile from
    # the tiles' sums (the last tile with mass if rounding leaves the total short of u * z), then scan it.
    target = u * z
    done = ~sampling  # rows not sampling need no token
    tile = tl.zeros([ROWS], tl.int32)
    before = tl.zeros([ROWS], tl.float32)  # the mass of the tiles before `tile`
    running = tl.zeros([ROWS], tl.float32)
    start = 0
    while (start < vocab) & (tl.min(done.to(tl.int32), axis=0) == 0):
        mask, x, key = _tempered_tile(row2, start + offs2, vocab, rmask2, t2)
        w = tl.exp(x - m2)
        s = tl.sum(tl.where((key >= thresh2) & (w >= min_p[:, None]) & mask, w, 0.0), axis=1)
        at = ~done & (s > 0)
        tile = tl.where(at, start, tile)
        before = tl.where(at, running, before)
        running += s
        done = done | (running > target)
        start += BLOCK
    offs = tile[:, None] + offs2
    mask, x, key = _tempered_tile(row2, offs, vocab, rmask2, t2)
    w = tl.exp(x - m2)
    w = tl.where((key >= thresh2) & (w >= min_p[:, None]) & mask, w, 0.0)
    cdf = before[:, None] + tl.cumsum(w, axis=1)
    hit = tl.min(tl.where((cdf > target[:, None]) & (w > 0), offs, BIG), axis=1)
    # nothing exceeded the target (rounding): the last kept token
    token = tl.where(hit == BIG, tl.max(tl.where(w > 0, offs, 0), axis=1), hit)
    return m, arg, thresh, tl.log(tl.where(rmask, z, 1.0)), token


@triton.jit
def _sample_kernel(
    logits_ptr,
    temp_ptr,
    topk_ptr,
    topp_ptr,
    minp_ptr,
    u_ptr,
    cmax_ptr,
    carg_ptr,
    csum_ptr,
    tok_ptr,
    lp_ptr,
    n_rows,
    stride_row,
    vocab,
    num_chunks,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    N_CAND: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_CHUNKS_P2: tl.constexpr,
):
    """A program whose rows are all plain samples them from the chunk stats; any other program walks its
    rows (right for plain rows too). Both paths then share the greedy choice, the fallback and the
    log-prob."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row
    temp = tl.load(temp_ptr + rows, mask=rmask, other=1.0).to(tl.float32)
    t = tl.where(temp > 0, temp, 1.0)
    top_k = tl.load(topk_ptr + rows, mask=rmask, other=0).to(tl.int64)
    top_p = tl.load(topp_ptr + rows, mask=rmask, other=1.0).to(tl.float32)
    min_p = tl.load(minp_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    sampling = (temp > 0) & rmask
    filtered = ((top_k > 0) & (top_k < vocab)) | (top_p < 1.0) | (min_p > 0.0)
    if tl.max((filtered & rmask).to(tl.int32), axis=0) == 0:
        m, arg, thresh, log_z, token = _plain_rows(
            row_ptr, rows, rmask, t, u, vocab, cmax_ptr, carg_ptr, csum_ptr, num_chunks,
            ROWS, CHUNK, NUM_CHUNKS_P2
        )
    else:
        m, arg, thresh, log_z, token = _filtered_rows(
            row_ptr, rmask, t, u, sampling, top_k, top_p, min_p, vocab, ROWS, BLOCK, SEARCH_BLOCK, N_CAND
        )

    # a sampled token outside the kept set (only through rounding at the very end) falls back to greedy
    xt = tl.math.div_rn(tl.load(row_ptr + token, mask=rmask, other=0.0).to(tl.float32), t) + 0.0
    xt_bits = xt.to(tl.int32, bitcast=True)
    xt_key = xt_bits ^ ((xt_bits >> 31) & 0x7FFFFFFF)
    kept = (xt_key >= thresh) & (tl.exp(xt - m) >= min_p) & (xt > float("-inf"))
    token = tl.where(sampling & kept, token, arg)
    x_tok = tl.math.div_rn(tl.load(row_ptr + token, mask=rmask, other=0.0).to(tl.float32), t)
    tl.store(tok_ptr + rows, token.to(tl.int64), mask=rmask)
    tl.store(lp_ptr + rows, x_tok - m - log_z, mask=rmask)


def sample_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniform: torch.Tensor,
    *,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `sample_reference`: same tokens and log-probs for the same uniforms; two launches,
    no host sync (so it can be captured in a CUDA graph). `chunk` (a power of two) overrides the width of
    the vocabulary slices of the plain-row fast path (tests use small ones)."""
    batch, vocab = logits.shape
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return tokens, logprobs
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.is_cuda:
        # A row per program, so each pass over a row is a serial loop over its tiles: 4096 wide (a
        # 151936-token vocabulary in 38 steps). The searches keep [16 candidates, 1024] partials (~8 passes
        # each): ~220 registers a thread, which 8 warps have (16 warps, 128 a thread, spill).
        # Chunks of the plain path: at least 1024 wide, at most 256 of them.
        rows, block, n_cand, num_warps = 1, min(4096, triton.next_power_of_2(vocab)), 16, 8
        search_block = min(1024, block)
        chunk = chunk or max(1024, triton.next_power_of_2(triton.cdiv(vocab, 256)))
    else:
        # Triton's CPU interpreter: its cost is per op, so make each op big (~1M elements at most)
        # (the searches fold their tiles 4 times, as on the GPU, so that the tests cover the fold)
        block = min(4096, triton.next_power_of_2(vocab))
        search_block = max(1, block // 4)
        rows = max(1, min(triton.next_power_of_2(batch), (1 << 16) // block))
        n_cand = max(16, min(256, (1 << 20) // (rows * block)))
        num_warps = 4
        chunk = chunk or min(triton.next_power_of_2(vocab), (1 << 16) // rows)
    num_chunks = triton.cdiv(vocab, chunk)
    temperature = temperature.contiguous()
    stats = (
        torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device),
        torch.empty(batch, num_chunks, dtype=torch.int32, device=logits.device),
        torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device),
    )
    grid = (triton.cdiv(batch, rows),)
    _chunk_stats_kernel[grid + (num_chunks,)](
        logits,
        temperature,
        *stats,
        batch,
        logits.stride(0),
        vocab,
        num_chunks,
        ROWS=rows,
        CHUNK=chunk,
        num_warps=4,
    )
    _sample_kernel[grid](
        logits,
        temperature,
        top_k.contiguous(),
        top_p.contiguous(),
        min_p.contiguous(),
        uniform.contiguous(),
        *stats,
        tokens,
        logprobs,
        batch,
        logits.stride(0),
        vocab,
        num_chunks,
        ROWS=rows,
        BLOCK=block,
        SEARCH_BLOCK=search_block,
        N_CAND=n_cand,
        CHUNK=chunk,
        NUM_CHUNKS_P2=triton.next_power_of_2(num_chunks),
        num_warps=num_warps,
    )
    return tokens, logprobs
