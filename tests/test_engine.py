"""Engine behaviour on tiny random models: exactness against transformers, fork, preemption, bad input."""

import copy

import pytest
import torch
from tiny_models import make_tiny_model

from nreft_engine import Engine, LayerPlan, SamplingParams, SkipPolicy
from nreft_engine.cache import kv_cache_bytes
from nreft_engine.kernels.sampler import filter_logits
from nreft_engine.scheduler import Scheduler
from nreft_engine.sequence import UNIFORM_CHUNK, Sequence

PROMPTS = [
    [5, 9, 17, 33, 8], [3], list(range(10, 47)), [100, 101, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 9]
]
FAMILIES = ["llama", "qwen2", "qwen3", "llama3-rope", "llama-untied"]


def hf_greedy(model, prompt, max_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                         min_new_tokens=max_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def without_layers(model, skipped):
    """A copy of `model` with the decoder layers in `skipped` deleted (the behaviour model, for
    reference)."""
    reduced = copy.deepcopy(model)
    layers = reduced.model.layers
    reduced.model.layers = torch.nn.ModuleList(
        [layer for i, layer in enumerate(layers) if i not in set(skipped)]
    )
    reduced.config.num_hidden_layers = len(reduced.model.layers)
    for i, layer in enumerate(reduced.model.layers):
        layer.self_attn.layer_idx = i
    return reduced


def reference_logprobs(model, prompt, completion, params):
    """Log-probs of `completion` under `model` with the same temperature / top-k / top-p / min-p filter."""
    ids = torch.tensor([prompt + completion], device=model.device)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, len(prompt) - 1 : -1].cpu()
    rows = len(completion)
    filtered = filter_logits(
        logits,
        torch.full((rows,), params.temperature),
        torch.full((rows,), params.top_k),
        torch.full((rows,), params.top_p),
        torch.full((rows,), params.min_p),
    )
    return filtered.log_softmax(-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family):
    """Equal to HF greedy decoding, except that a near-tie (top-2 margin < 1e-4) may go either way.

    Random tiny models have near-ties that last-bit differences between BLAS calls can flip; the real-model
    test requires exact equality with `generate`.
    """
    model = make_tiny_model(family)
    engine = Engine(model, kv_cache_memory=1 << 22)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, min_tokens=24))
    for prompt, out in zip(PROMPTS, outs):
        tokens = out.outputs[0].token_ids
        expected = hf_greedy(model, prompt, 24)
        if tokens != expected:
            first = next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens[:first]])).logits[0, -1]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] < 1e-4, f"diverged at {first} with a clear margin"
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("skipped", [(), (1, 2)])
def test_behaviour_logprobs_are_exact(family, skipped):
    model = make_tiny_model(family)
    reference = without_layers(model, skipped)
    engine = Engine(model, kv_cache_memory=1 << 22)
    params = SamplingParams(
        n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.02, max_tokens=20, seed=1, ignore_eos=True
    )
    outs = engine.generate(PROMPTS, params, skip=list(skipped))
    for prompt, out in zip(PROMPTS, outs):
        assert out.skipped_layers == skipped
        for c in out.outputs:
            expected = reference_logprobs(reference, prompt, c.token_ids, params)
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
            assert c.cumulative_logprob == pytest.approx(sum(c.logprobs))


def test_stale_cache_contents_never_leak():
    """Unwritten cache slots may hold anything (even NaN) without changing any output."""
    model = make_tiny_model("llama")
    engine = Engine(model, kv_cache_memory=1 << 22)
    params = SamplingParams(n=2, temperature=0.9, max_tokens=20, seed=5, ignore_eos=True)
    clean = engine.generate(PROMPTS, params)
    engine.runner.kv_buffer.fill_(float("nan"))
    poisoned = engine.generate(PROMPTS, params)
    for a, b in zip(clean, poisoned):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5)


def test_same_seed_same_output_and_samples_differ():
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=7, ignore_eos=True)
    first = engine.generate(PROMPTS, params)
    second = engine.generate(PROMPTS, params)
    assert [[c.token_ids for c in o.outputs] for o in first] == [
        [c.token_ids for c in o.outputs] for o in second
    ]
    assert len({tuple(c.token_ids) for c in first[0].outputs}) > 1


def test_uniforms_drawn_in_chunks_are_the_one_at_a_time_stream():
    """Sequences pre-draw their uniforms in chunks; the values must be the generator's plain stream."""
    seq = Sequence(0, 0, [1, 2], SamplingParams(), torch.Generator().manual_seed(11))
    drawn = [seq.next_uniform() for _ in range(3 * UNIFORM_CHUNK + 5)]
    generator = torch.Generator().manual_seed(11)
    assert drawn == [torch.rand(1, generator=generator).item() for _ in range(len(drawn))]


def test_prompt_prefilled_once_for_n_samples_and_blocks_return():
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22, block_size=16)
    prompt = list(range(1, 57))  # 3.5 blocks
    engine.generate([prompt], SamplingParams(n=8, max_tokens=10, seed=0, ignore_eos=True))
    stats = engine.last_stats
    assert stats.prefill_tokens == len(prompt)
    assert stats.decode_tokens == 8 * 9
    assert stats.generated_tokens == 8 * 10
    assert stats.used_blocks_at_end == 0


def test_kv_bytes_scale_with_active_layers_and_admit_more_sequences():
    model = make_tiny_model("llama", num_hidden_layers=8)
    full = kv_cache_bytes(8, 100 * 16, 2, 16, 4)
    for k in range(1, 7):
        assert kv_cache_bytes(8 - k, 100 * 16, 2, 16, 4) * 8 == full * (8 - k)
    budget = 8 * 40 * 16 * 2 * 2 * 16 * 4  # 40 blocks for all 8 layers
    engine = Engine(model, kv_cache_memory=budget, block_size=16)
    params = SamplingParams(max_tokens=16, ignore_eos=True, seed=0)
    prompts = [[1 + i % 50] * 14 for i in range(128)]  # one block each at admission, two at the end
    engine.generate(prompts, params)
    full_stats = engine.last_stats
    engine.generate(prompts, params, skip=[1, 2, 3, 4])
    half_stats = engine.last_stats
    assert half_stats.num_blocks == 2 * full_stats.num_blocks
    assert half_stats.kv_cache_bytes == full_stats.kv_cache_bytes
    assert half_stats.peak_running >= 1.8 * full_stats.peak_running


def test_peak_kv_bytes_in_use_fall_with_the_skipped_layers():
    engine = Engine(make_tiny_model("llama", num_hidden_layers=8), kv_cache_memory=1 << 22, block_size=16)
    params = SamplingParams(n=2, max_tokens=20, ignore_eos=True, seed=0)
    engine.generate(PROMPTS, params)
    full = engine.last_stats
    engine.generate(PROMPTS, params, skip=[1, 2, 3, 4])
    half = engine.last_stats
    assert full.peak_used_blocks == half.peak_used_blocks > 0  # the same sequences, the same blocks
    assert half.peak_kv_cache_bytes * 2 == full.peak_kv_cache_bytes
    assert full.peak_kv_cache_bytes == full.peak_used_blocks * kv_cache_bytes(8, 16, 2, 16, 4)


def test_preemption_keeps_outputs_identical():
    model = make_tiny_model("qwen2")
    params = SamplingParams(n=4, temperature=1.0, max_tokens=40, seed=3, ignore_eos=True)
    big = Engine(model, kv_cache_memory=1 << 22).generate(PROMPTS, params)
    per_block = kv_cache_bytes(4, 16, 2, 16, 4)
    small_engine = Engine(model, kv_cache_memory=12 * per_block)
    small = small_engine.generate(PROMPTS, params)
    assert small_engine.last_stats.num_preemptions > 0
    assert small_engine.last_stats.used_blocks_at_end == 0
    for a, b in zip(big, small):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4)


def _completions(outputs):
    return [
        (c.token_ids, c.logprobs, c.finish_reason, c.top_logprobs) for out in outputs for c in out.outputs
    ]


@pytest.mark.parametrize("skip", [None, [1, 2]])
def test_async_scheduling_gives_the_same_outputs(skip):
    """Steps launched before the previous step's tokens reach the host (the CUDA default) give the same
    completions: stop tokens mid-flight (their ahead rows discarded), length limits, min_tokens, top-N
    log-probs, forked samples. At most 8 rows per decode step keep the CPU matmuls batch-invariant."""
    model = make_tiny_model("llama", vocab_size=64)
    params = [
        SamplingParams(n=3, temperature=1.0, max_tokens=25, seed=1, stop_token_ids=[3, 4, 5, 6]),
        SamplingParams(n=2, temperature=0.8, top_k=20, max_tokens=9, seed=2, min_tokens=4,
                       stop_token_ids=[3, 4], logprobs=2),
        SamplingParams(n=1, temperature=0, max_tokens=17, seed=3),
    ]
    prompts = PROMPTS[:3]
    sync_engine = Engine(model, kv_cache_memory=1 << 22, async_scheduling=False)
    async_engine = Engine(model, kv_cache_memory=1 << 22, async_scheduling=True)
    ahead = []
    schedule_ahead = Scheduler.schedule_ahead

    def counting(self, batch):
        ahead.append(schedule_ahead(self, batch))
        return ahead[-1]

    Scheduler.schedule_ahead = counting
    try:
        expected = sync_engine.generate(prompts, params, skip=skip)
        got = async_engine.generate(prompts, params, skip=skip)
    finally:
        Scheduler.schedule_ahead = schedule_ahead
    assert _completions(got) == _completions(expected)
    assert any(c[2] == "stop" for c in _completions(got)) and any(c[2] == "length" for c in _completions(got))
    assert sum(b is not None for b in ahead) > 10  # the async engine did run ahead
    assert async_engine.last_stats.generated_tokens == sync_engine.last_stats.generated_tokens
    assert async_engine.last_stats.used_blocks_at_end == 0


def test_skip_policy_draws_per_call_and_respects_protection():
    policy = SkipPolicy(0.5, protect_first=1, protect_last=1, seed=0)
    engine = Engine(make_tiny_model("llama", num_hidden_layers=8), kv_cache_memory=1 << 22)
    seen = set()
    for _ in range(5):
        out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2), skip=policy)
        skipped = out[0].skipped_layers
        assert len(skipped) == 4 and 0 not in skipped and 7 not in skipped
        seen.add(skipped)
    assert len(seen) > 1
    assert SkipPolicy(0.25, seed=5).plan(8) == SkipPolicy(0.25, seed=5).plan(8)


def test_stop_token_ids_min_tokens_and_top_logprobs():
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    greedy = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    tokens = greedy[0].outputs[0].token_ids
    stop_at = tokens[5]
    first = tokens.index(stop_at)
    out = engine.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], logprobs=3)
    )
    c = out[0].outputs[0]
    assert c.finish_reason == "stop" and c.token_ids == tokens[: first + 1]
    assert len(c.top_logprobs) == len(c.token_ids) and all(len(t) == 3 for t in c.top_logprobs)
    assert all(c.token_ids[i] == max(t, key=t.get) for i, t in enumerate(c.top_logprobs))
    held = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12,
                                                        stop_token_ids=[stop_at], min_tokens=first + 2))
    assert len(held[0].outputs[0].token_ids) > first + 1


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([[]], "prompt 0 is empty"),
        ([[1, 2], [1] * 300], "prompt 1 has 300 tokens; the model's context is 256"),
        ([[1] * 200], "needs 13 KV blocks but the cache holds only 8"),
        ([[1, 500]], "outside"),
        (["text"], "no tokenizer"),
    ],
)
def test_bad_input_errors_and_engine_stays_usable(prompts, match):
    per_block = kv_cache_bytes(4, 16, 2, 16, 4)
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=8 * per_block)
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, SamplingParams(max_tokens=4))
    out = engine.generate([[1, 2]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n": 0}, "n must be"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
     ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"min_p": 2.0}, "min_p")],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "policy, match",
    [(lambda: SkipPolicy(1.0), "skip ratio"), (lambda: SkipPolicy(-0.1), "skip ratio"),
     (lambda: SkipPolicy(0.5, protect_first=2, protect_last=2).plan(4), "eligible"),
     (lambda: LayerPlan(4, (0, 1, 2, 3)), "cannot skip all"), (lambda: LayerPlan(4, (7,)), "outside")],
)
def test_bad_skip(policy, match):
    with pytest.raises(ValueError, match=match):
        policy()


def test_empty_prompt_list():
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 20)
    assert engine.generate([], SamplingParams()) == []


def test_optimizer_step_is_seen_without_copy():
    model = make_tiny_model("llama")
    engine = Engine(model, kv_cache_memory=1 << 22)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = engine.generate([PROMPTS[0]], params)[0].outputs[0]
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    after = engine.generate([PROMPTS[0]], params)[0].outputs[0]
    assert after.token_ids != before.token_ids
    assert after.token_ids == hf_greedy(model, PROMPTS[0], 8)
