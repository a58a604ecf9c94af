"""The engine with every op forced through the Triton kernels (CPU interpreter) equals the torch path."""

import pytest
import torch
from tiny_models import make_tiny_model

from nreft_engine import Engine, SamplingParams, ops

PROMPTS = [[5, 9, 17, 33, 8], list(range(10, 29))]


@pytest.fixture
def forced_triton():
    ops.configure(force_triton=True)
    yield
    ops.configure()


def test_forced_triton_path_equals_torch_path(request):
    model = make_tiny_model("qwen3", num_hidden_layers=2)
    engine = Engine(model, kv_cache_memory=1 << 22)
    greedy = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)
    sampled = SamplingParams(n=2, temperature=0.8, top_p=0.9, top_k=50, max_tokens=6, seed=4, ignore_eos=True)
    torch_outs = [engine.generate(PROMPTS, p, skip=[1]) for p in (greedy, sampled)]
    request.getfixturevalue("forced_triton")
    engine.runner.kv_buffer.fill_(float("nan"))  # stale slots must never be read
    triton_outs = [engine.generate(PROMPTS, p, skip=[1]) for p in (greedy, sampled)]
    for a_outs, b_outs in zip(torch_outs, triton_outs):
        for a, b in zip(a_outs, b_outs):
            for ca, cb in zip(a.outputs, b.outputs):
                assert ca.token_ids == cb.token_ids
                assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4)
