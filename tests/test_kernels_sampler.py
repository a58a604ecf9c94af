"""sample_triton (temperature / top-k / top-p / min-p, inverse-CDF sampling, exact log-prob) ==
sample_reference, draw for draw; and its token frequencies match the filtered target distribution."""

import pytest
import torch
from kernel_testing import poisoned_outputs

from nreft_engine.kernels import sampler as mod


def _params(vocab):
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 1.0, 0.5, 1.0, 2.0, 0.0, 1.0, 0.9, 1.0, 0.6])
    top_k = torch.tensor([0, 5, 0, 50, 3, 0, 7, vocab, 1, 20, vocab + 10, -1, 2, 40])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.8, 1.0, 0.5, 0.95, 0.3, 1.0, 0.7, 0.0, 0.99, 1.0, 0.6])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.05, 0.0, 0.0, 0.2, 0.0, 0.01, 0.0, 0.3])
    return temperature, top_k.int(), top_p, min_p


def _check_same(logits, params, uniform, **kwargs):
    """Same tokens as the reference, and the same log-probs. The only tolerated difference is a draw whose
    uniform falls within fp32 rounding (1e-5 of the mass) of a CDF step: the reference's running sum and
    the kernel's chunked one round differently there, so either neighbouring token is a correct draw."""
    ref_tok, ref_lp = mod.sample_reference(logits, *params, uniform)
    with poisoned_outputs(mod):
        tok, lp = mod.sample_triton(logits, *params, uniform, **kwargs)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    logprobs = mod.filter_logits(logits, *params).log_softmax(-1)
    for row in (tok != ref_tok).nonzero().flatten().tolist():
        cdf = logprobs[row].double().exp().cumsum(0)
        target = float(uniform[row]) * float(cdf[-1])
        step = min(int(tok[row]), int(ref_tok[row]))
        assert params[0][row] > 0 and abs(float(cdf[step]) - target) < 1e-5, (row, tok[row], ref_tok[row])
    assert (tok != ref_tok).sum() <= 1
    torch.testing.assert_close(lp, logprobs.gather(1, tok[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    same = tok == ref_tok
    torch.testing.assert_close(lp[same], ref_lp[same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 5003])
def test_sampler_matches_reference(dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    params = _params(vocab)
    batch = params[0].numel()
    logits = 3 * torch.randn(batch, vocab, generator=gen)
    # integer-valued rows: many exact ties, at the top-k / top-p thresholds and at the maximum (greedy
    # must take the first maximal index)
    logits[::2] = torch.randint(-6, 7, (batch // 2 + batch % 2, vocab), generator=gen).float()
    logits[-1, vocab - 24 :] = float("-inf")  # masked vocabulary padding
    logits = logits.to(dtype)
    uniform = torch.rand(batch, generator=gen)
    uniform[0], uniform[1] = 0.0, 1.0 - 2**-24
    _check_same(logits, params, uniform)


def test_sampler_no_filter_rows_beside_filtered_rows():
    """top_p = 1 and top_k = 0 keep every token, whatever the other rows of the batch ask for."""
    gen = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(4, 3000, generator=gen)
    params = (
        torch.ones(4),
        torch.tensor([0, 5, 0, 0]).int(),
        torch.tensor([1.0, 1.0, 0.5, 1.0]),
        torch.zeros(4),
    )
    uniform = torch.tensor([0.9999, 0.5, 0.5, 0.99999])  # deep in the tail of rows 0 and 3
    _check_same(logits, params, uniform)
    kept = mod.filter_logits(logits, *params).isfinite()
    assert kept[0].all() and kept[3].all()


def _plain(batch, vocab, temperature=1.0):
    """Parameters that filter nothing (the chunked fast path), top-k off either way."""
    top_k = torch.tensor([0, -1, vocab])[torch.arange(batch) % 3].int()
    return torch.full((batch,), temperature), top_k, torch.ones(batch), torch.zeros(batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,chunk", [(1000, 64), (777, 16)])
def test_sampler_plain_rows_across_chunks(dtype, vocab, chunk):
    """Rows with no filter sample from the chunk their uniform falls in: uniforms at both ends, -inf logits
    (a whole chunk, the start of the sampled chunk, the vocabulary's tail), greedy ties across chunks."""
    gen = torch.Generator().manual_seed(vocab)
    batch = 12
    temperature, top_k, top_p, min_p = _plain(batch, vocab)
    temperature[[1, 2]] = torch.tensor([0.5, 2.0])
    logits = 3 * torch.randn(batch, vocab, generator=gen)
    uniform = torch.rand(batch, generator=gen)
    uniform[:4] = torch.tensor([0.0, 1e-7, 0.999999, 1.0 - 2**-24])
    logits[4, 2 * chunk : 3 * chunk] = float("-inf")  # a whole chunk
    logits[5] = -4.0  # nearly all mass in chunk 3, which starts with -inf
    logits[5, 3 * chunk : 4 * chunk] = 4.0
    logits[5, 3 * chunk : 3 * chunk + chunk // 2] = float("-inf")
    uniform[5] = 0.5
    logits[6, : 2 * chunk + 5] = float("-inf")  # the first kept token, in the third chunk
    uniform[6] = 0.0
    logits[7, vocab - chunk - 7 :] = float("-inf")  # padding over the last two chunks, deep in the tail
    uniform[7] = 1.0 - 2**-24
    # greedy: integer rows tie their maximum across chunks; the first index wins
    temperature[8:] = 0.0
    logits[8:] = torch.randint(-6, 6, (batch - 8, vocab), generator=gen).float()
    logits[8, [3 * chunk + 1, chunk + 9, vocab - 1]] = 6.0
    logits[9, : chunk + 3] = float("-inf")
    logits = logits.to(dtype)
    params = (temperature, top_k, top_p, min_p)
    _check_same(logits, params, uniform, chunk=chunk)
    tok, _ = mod.sample_triton(logits, *params, uniform, chunk=chunk)
    assert tok[8] == chunk + 9
    assert tok[6] == 2 * chunk + 5
    assert 3 * chunk + chunk // 2 <= tok[5] < 4 * chunk


def test_sampler_plain_and_filtered_rows_in_one_batch():
    """Plain rows take the fast path beside filtered rows (a row per program on the GPU; under the
    interpreter each 16-row program of this batch is either all plain or takes the full path)."""
    gen = torch.Generator().manual_seed(7)
    batch, vocab = 32, 5003
    logits = 3 * torch.randn(batch, vocab, generator=gen)
    plain = _plain(batch, vocab, temperature=0.9)
    filtered = _params(vocab)
    params = tuple(p.clone() for p in plain)
    for p, f in zip(params, filtered):
        p[18 : 18 + f.numel()] = f
    params[0][[2, 20]] = 0.0
    uniform = torch.rand(batch, generator=gen)
    uniform[[0, 16]] = 1.0 - 2**-24
    _check_same(logits, params, uniform, chunk=512)


def test_sampler_filtered_draws_across_tiles():
    """Filtered rows find the tile of their draw from the tiles' sums, then scan that tile: draws on either
    side of a tile boundary (4096, the tile width on the GPU and under the interpreter), past massless tiles,
    at both ends of the CDF, and a greedy row."""
    gen = torch.Generator().manual_seed(11)
    batch, vocab = 6, 2 * 4096 + 300
    logits = 3 * torch.randn(batch, vocab, generator=gen)
    logits[:2, 4095:4097] = 20.0  # top-2 keeps exactly 4095 and 4096, one per tile
    logits[2, : 4096 + 100] = float("-inf")  # no kept token before the second tile's 100th
    logits[4, 4096 : 2 * 4096] = float("-inf")  # a whole massless tile between kept ones
    params = (
        torch.tensor([1.0, 1.0, 0.8, 1.2, 1.0, 0.0]),
        torch.tensor([2, 2, 0, 0, 50, 0]).int(),
        torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 0.5]),
        torch.tensor([0.0, 0.0, 1e-3, 0.0, 0.0, 0.0]),
    )
    uniform = torch.tensor([0.499, 0.501, 0.0, 1.0 - 2**-24, 0.7, 0.5])
    _check_same(logits, params, uniform)
    tok, _ = mod.sample_triton(logits, *params, uniform)
    first_kept = int(mod.filter_logits(logits, *params)[2].isfinite().nonzero()[0])
    assert tok[:3].tolist() == [4095, 4096, first_kept] and first_kept >= 4096 + 100


def _chi_square_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; categories expecting < 5 draws are pooled."""
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor(float(obs.numel() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p,chunk",
    [(0.8, 12, 0.9, 0.02, None), (1.0, 0, 1.0, 0.0, 8)],  # filtered; plain, over 3 chunks
)
def test_sampler_frequencies_match_target_distribution(temperature, top_k, top_p, min_p, chunk):
    gen = torch.Generator().manual_seed(1234)
    vocab, draws = 24, 20000
    row = 1.5 * torch.randn(vocab, generator=gen)
    logits = row.expand(draws, vocab).contiguous()
    params = (
        torch.full((draws,), temperature),
        torch.full((draws,), top_k, dtype=torch.int32),
        torch.full((draws,), top_p),
        torch.full((draws,), min_p),
    )
    uniform = torch.rand(draws, generator=gen)
    tok, lp = mod.sample_triton(logits, *params, uniform, chunk=chunk)
    target = mod.filter_logits(row[None], *(p[:1] for p in params)).softmax(-1)[0].double()
    counts = torch.bincount(tok, minlength=vocab).double()
    assert counts[target == 0].sum() == 0, "sampled a filtered-out token"
    pvalue = _chi_square_pvalue(counts, target * draws)
    assert pvalue > 1e-3, f"token frequencies do not match the target distribution (p = {pvalue:.2e})"
    # every draw's log-prob is that of its token under the distribution it was drawn from
    torch.testing.assert_close(lp.double(), target.log()[tok], rtol=1e-5, atol=1e-5)
