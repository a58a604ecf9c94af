"""Full-model log-probs: same values and gradients as the plain computation, a fraction of its peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import make_tiny_model

from nreft_engine.train.logprobs import LogitFilter, group_logprobs

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
