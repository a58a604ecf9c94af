"""The CUDA path, where a GPU is present (skipped elsewhere): the extension's CUDA cache ops equal its CPU
ones, and the engine on a GPU (Triton kernels, CUDA graphs) gives transformers' log-probs and the same
outputs as its own eager path."""

import pytest
import torch
from test_engine import PROMPTS, reference_logprobs
from tiny_models import make_tiny_model

from nreft_engine import _C, Engine, SamplingParams
from nreft_engine.transfer import to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_extension_was_built_with_cuda():
    assert _C.built_with_cuda


def test_host_to_device_copies_do_not_wait_for_queued_work():
    """Async scheduling needs the step inputs' copies (and the copy-on-write pairs) not to block the host."""
    k_cache, v_cache = (torch.zeros(1, 4, 16, 2, 8, device="cuda") for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of device time queued ahead of the copies
    queued = torch.cuda.Event()
    queued.record()
    ids = to_device([[1, 2, 3], [4, 5, 6]], torch.device("cuda"))
    _C.copy_blocks(k_cache, v_cache, torch.tensor([[0, 1]]))
    assert not queued.query(), "the host waited for the device"
    assert ids.tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_cuda_equals_cpu(dtype):
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(3, 8, 16, 2, 64, generator=gen).to(dtype) for _ in range(2))
    pairs = torch.tensor([[0, 5], [2, 7], [6, 1]])
    k_gpu, v_gpu = k_cache.cuda(), v_cache.cuda()
    _C.copy_blocks(k_gpu, v_gpu, pairs.cuda())
    _C.copy_blocks(k_cache, v_cache, pairs)
    assert torch.equal(k_gpu.cpu(), k_cache) and torch.equal(v_gpu.cpu(), v_cache)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("skip", [None, [1, 2]])
def test_engine_logprobs_on_cuda_equal_transformers(family, skip):
    model = make_tiny_model(family).cuda()
    engine = Engine(model, kv_cache_memory=1 << 24)
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=16, ignore_eos=True, seed=0)
    reference_model = model
    if skip:
        from test_engine import without_layers

        reference_model = without_layers(model, skip)
    for prompt, out in zip(PROMPTS, engine.generate(PROMPTS, params, skip=skip)):
        for c in out.outputs:
            expected = reference_logprobs(reference_model, prompt, c.token_ids, params)
            assert (torch.tensor(c.logprobs) - expected).abs().max().item() <= 1e-4
    assert engine.runner.graphs is not None and engine.last_stats.graph_captures > 0


def test_cuda_graphs_equal_eager_steps():
    model = make_tiny_model("llama").cuda()
    graphed = Engine(model, kv_cache_memory=1 << 24)
    eager = Engine(model, kv_cache_memory=1 << 24, enforce_eager=True)
    assert eager.runner.graphs is None
    params = [
        SamplingParams(n=3, temperature=1.0, max_tokens=m, ignore_eos=True, seed=i)
        for i, m in enumerate((9, 4, 13, 6))
    ]
    for skip in (None, [1], [1, 2], None):
        a = [
            (c.token_ids, c.logprobs) for o in graphed.generate(PROMPTS, params, skip=skip) for c in o.outputs
        ]
        b = [(c.token_ids, c.logprobs) for o in eager.generate(PROMPTS, params, skip=skip) for c in o.outputs]
        assert [t for t, _ in a] == [t for t, _ in b]
        for (_, la), (_, lb) in zip(a, b):
            assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5
    assert graphed.last_stats.graph_captures == 0  # the no-skip graphs were captured by the first call


def test_a_warm_generate_never_blocks_on_the_device():
    """With graphs captured, a generate call makes no blocking copy or stream sync (torch's sync debug mode
    raises on one): async scheduling and graph replays only overlap the host's work with the device's if so.
    Waiting on a step's own samples (a CUDA event) is allowed."""
    engine = Engine(make_tiny_model("qwen2").cuda(), kv_cache_memory=1 << 24)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, min_tokens=4, ignore_eos=True, seed=0)
    expected = engine.generate(PROMPTS, params, skip=[1])
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = engine.generate(PROMPTS, params, skip=[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.last_stats.graph_captures == 0
    got = [c.token_ids for o in outputs for c in o.outputs]
    assert got == [c.token_ids for o in expected for c in o.outputs]


def test_replayed_graphs_see_an_optimizer_step():
    """On CUDA the fused q/k/v and gate/up copies are the default and the decode graphs read them: after an
    AdamW step the next generate must replay the same graphs (no new capture) over the updated weights."""
    model = make_tiny_model("qwen2").cuda()
    engine = Engine(model, kv_cache_memory=1 << 24)
    assert engine.runner.prepack_weights
    params = SamplingParams(n=2, temperature=1.0, max_tokens=10, ignore_eos=True, seed=0)
    engine.generate(PROMPTS, params)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(torch.tensor([PROMPTS[0]], device="cuda")).logits.sum().backward()
    opt.step()
    outputs = engine.generate(PROMPTS, params)
    assert engine.last_stats.graph_captures == 0
    for prompt, out in zip(PROMPTS, outputs):
        for c in out.outputs:
            expected = reference_logprobs(model, prompt, c.token_ids, params)
            assert (torch.tensor(c.logprobs) - expected).abs().max().item() <= 1e-4
