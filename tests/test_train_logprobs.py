"""Full-model log-probs: same values and gradients as the plain computation, a fraction of its peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import make_tiny_model

from nreft_engine.train import logprobs
from nreft_engine.train.logprobs import (
    LogitFilter,
    batch_logprobs,
    group_logprobs,
    head_logprobs,
    packed_logprobs,
)

PROMPT = [1, 5, 7, 9]
COMPLETIONS = [[3, 4, 5], [6], [7, 8, 9, 10, 11, 12]]


def _naive(model, prompt, completions, filt):
    """The straightforward computation: full logits of every sequence, log-softmax, gather."""
    out = []
    for c in completions:
        logits = model(torch.tensor([prompt + c])).logits[0, len(prompt) - 1: -1]
        out.append(filt(logits).log_softmax(-1).gather(1, torch.tensor(c)[:, None]).squeeze(1))
    return out


@pytest.mark.parametrize("filt", [
    LogitFilter(), LogitFilter(temperature=0.7, top_p=0.95), LogitFilter(temperature=0.0),
])
def test_values_and_gradients_match_the_plain_computation(filt):
    model = make_tiny_model("llama", seed=3)
    got = group_logprobs(model, PROMPT, COMPLETIONS, filt, chunk_size=4)
    want = _naive(model, PROMPT, COMPLETIONS, filt)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)

    def finite(xs):
        return sum(x[x.isfinite()].sum() for x in xs)

    finite(got).backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    finite(want).backward()
    for a, b in zip(chunked, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


_MEASURE = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[2])
from tiny_models import make_tiny_model
from nreft_engine.train.logprobs import LogitFilter, group_logprobs
torch.set_num_threads(1)
model = make_tiny_model("llama", seed=0, vocab_size=49152, num_hidden_layers=2, max_position_embeddings=2048,
                         hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
gen = torch.Generator().manual_seed(0)
prompt = torch.randint(0, 49152, (8,), generator=gen).tolist()
completions = torch.randint(0, 49152, (8, 1016), generator=gen).tolist()  # 8 x 1024 tokens with the prompt
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "naive":
    ids = torch.tensor([prompt + c for c in completions])
    logits = model(ids).logits[:, len(prompt) - 1:-1]
    lp = logits.float().log_softmax(-1).gather(2, torch.tensor(completions)[..., None]).squeeze(-1)
else:
    lp = torch.stack(group_logprobs(model, prompt, completions, LogitFilter(), chunk_size=512))
lp.sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
grad = torch.cat([p.grad.flatten() for p in model.parameters()])
print(json.dumps({"peak_kib": peak - before, "sum": lp.sum().item(), "grad_norm": grad.norm().item()}))
"""


def _measure_both() -> tuple[dict, dict]:
    """Run the naive and the chunked computation in two fresh processes at once (one core each)."""
    here = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _MEASURE, mode, here], stdout=subprocess.PIPE, text=True,
                         env=env)
        for mode in ("naive", "chunked")
    ]
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    naive, chunked = (json.loads(o.strip().splitlines()[-1]) for o in outs)
    return naive, chunked


def test_memory_is_under_half_of_the_full_logits_computation():
    """8 x 1024 tokens, vocabulary 49152, forward + backward, peak RSS measured in fresh processes."""
    naive, chunked = _measure_both()
    assert chunked["peak_kib"] < naive["peak_kib"] / 2, (chunked, naive)
    assert chunked["sum"] == pytest.approx(naive["sum"], rel=1e-5)
    assert chunked["grad_norm"] == pytest.approx(naive["grad_norm"], rel=1e-4)


GROUPS = [([1, 5, 7, 9], [[3, 4, 5], [6], [7, 8, 9, 10, 11, 12]]),
          ([4, 2], [[9, 9], [5, 6, 7, 8], []]),
          ([8, 3, 3, 6, 1, 2, 7], [[10], [11, 12, 13]])]


@pytest.mark.parametrize("family", ["llama", "llama-untied", "qwen2"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", [batch_logprobs, packed_logprobs])
def test_groups_batched_together_match_each_group_alone(layout, attention, family, monkeypatch):
    """Prompts of different lengths (padded, masked) and completions of different lengths (one empty) in one
    batch, in both layouts; the packed one must not fall back to the two forwards here."""
    model = make_tiny_model(family, seed=5)
    model.set_attn_implementation(attention)
    monkeypatch.setattr(logprobs, "batch_logprobs", None if layout is packed_logprobs else batch_logprobs)
    filt = LogitFilter(temperature=0.7)
    got = layout(model, GROUPS, filt, chunk_size=5, keep_bytes=1 << 30)
    want = [_naive(model, prompt, completions, filt) for prompt, completions in GROUPS]
    for g_group, w_group in zip(got, want):
        assert [g.shape for g in g_group] == [w.shape for w in w_group]
        for g, w in zip(g_group, w_group):
            assert torch.allclose(g, w, atol=1e-5)
    grads = []
    for result in (got, want):
        model.zero_grad()
        sum(lp.sum() for group in result for lp in group).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("keep_chunks, calls", [(0, 6), (1, 5), (3, 3)])
def test_head_logits_are_recomputed_only_past_the_memory_budget(monkeypatch, keep_chunks, calls):
    """3 chunks: each checkpointed chunk runs twice (forward, backward), each kept chunk once."""
    model = make_tiny_model("llama", seed=1)
    hidden = torch.randn(12, 64, requires_grad=True)
    weight, targets = model.get_output_embeddings().weight, torch.arange(12)
    count = []
    real = logprobs._chunk_logprobs
    monkeypatch.setattr(logprobs, "_chunk_logprobs", lambda *args: count.append(1) or real(*args))
    budget = keep_chunks * 4 * weight.shape[0] * 4  # fp32 logits of 4 rows
    out = head_logprobs(hidden, weight, targets, LogitFilter(), chunk_size=4, keep_bytes=budget)
    out.sum().backward()
    assert len(count) == calls
    grad = hidden.grad.clone()
    hidden.grad = None
    with torch.no_grad():
        assert torch.allclose(out, head_logprobs(hidden, weight, targets, LogitFilter(), chunk_size=12))
    real(hidden, weight, targets, LogitFilter())[0].sum().backward()
    assert torch.allclose(grad, hidden.grad, atol=1e-6)


@pytest.mark.parametrize("setup", ["sliding window", "long rows", "flex attention"])
def test_packed_rows_fall_back_to_two_forwards_where_the_mask_would_differ(setup, monkeypatch):
    """A sliding window the rows reach, rows past PACKED_ROW_TOKENS, an attention without custom masks: the
    two-forward layout runs instead, with the model's own masks, and gives the plain computation's values."""
    overrides = {"sliding_window": 6, "use_sliding_window": True, "max_window_layers": 0} \
        if setup == "sliding window" else {}
    model = make_tiny_model("qwen2", seed=2, **overrides)
    if setup == "long rows":
        monkeypatch.setattr(logprobs, "PACKED_ROW_TOKENS", 8)
    if setup == "flex attention":
        monkeypatch.setattr(logprobs, "_MASKABLE_ATTENTION", ())
    calls = []
    monkeypatch.setattr(logprobs, "batch_logprobs", lambda *a: calls.append(1) or batch_logprobs(*a))
    groups = GROUPS[:1]
    got = packed_logprobs(model, groups, LogitFilter())
    assert calls == [1]
    for g, w in zip(got[0], _naive(model, *groups[0], LogitFilter())):
        assert torch.allclose(g, w, atol=1e-5)


def test_tied_embeddings_get_one_dense_gradient():
    """The tied lookup's sparse gradient is summed into the LM head's: a dense gradient, as without it."""
    model = make_tiny_model("llama", seed=4)
    sum(lp.sum() for group in packed_logprobs(model, GROUPS, LogitFilter()) for lp in group).backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad.layout == torch.strided
    packed = grad.clone()
    model.zero_grad()
    sum(lp.sum() for group in batch_logprobs(model, GROUPS, LogitFilter()) for lp in group).backward()
    assert (packed - grad).abs().max() <= 1e-5 * grad.abs().max()


@pytest.mark.parametrize("layout", [batch_logprobs, packed_logprobs])
def test_an_empty_prompt_is_refused(layout):
    with pytest.raises(ValueError, match=r"groups \[1\] have an empty prompt"):
        layout(make_tiny_model("llama"), [([1], [[2]]), ([], [[3]])], LogitFilter())
