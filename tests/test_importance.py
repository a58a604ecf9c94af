"""Engine.layer_importance (block influence in the engine's forward) and SkipPolicy(importance=...)."""

import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_model

from nreft_engine import Engine, SamplingParams, SkipPolicy

PROMPTS = [[5, 9, 17, 33, 8], [3], list(range(10, 47)), [100, 101, 7, 7, 7, 7, 7, 7, 7, 7, 7, 9]]
IDENTITY = (2, 5)  # layers made the identity on the residual stream
NUM_LAYERS = 8


def identity_model(layers=IDENTITY, family="llama"):
    """A tiny model whose `layers` add nothing to the residual stream: o_proj and down_proj zeroed."""
    model = make_tiny_model(family, num_hidden_layers=NUM_LAYERS)
    with torch.no_grad():
        for i in layers:
            layer = model.model.layers[i]
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight.zero_()
                assert linear.bias is None
    return model


def hf_importance(model, prompts):
    """Block influence from transformers: hidden_states[i] is layer i's input, hidden_states[i + 1] its output
    except after the last layer (HF applies the final norm there), which a forward hook records."""
    last = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda module, args, out: last.append(out[0] if isinstance(out, tuple) else out)
    )
    sums, tokens = torch.zeros(NUM_LAYERS, dtype=torch.float64), 0
    try:
        with torch.no_grad():
            for prompt in prompts:
                states = model(torch.tensor([prompt]), output_hidden_states=True).hidden_states
                outs = [*states[1:NUM_LAYERS], last.pop()]
                for i in range(NUM_LAYERS):
                    cos = F.cosine_similarity(states[i][0].double(), outs[i][0].double(), dim=-1)
                    sums[i] += (1 - cos).sum()
                tokens += len(prompt)
    finally:
        hook.remove()
    return (sums / tokens).tolist()


def test_identity_layers_score_zero_and_lowest():
    engine = Engine(identity_model(), kv_cache_memory=1 << 22)
    importance = engine.layer_importance(PROMPTS)
    assert len(importance) == NUM_LAYERS
    for i, value in enumerate(importance):
        if i in IDENTITY:
            assert 0 <= value < 1e-6
        else:
            assert value > 1e-3
    assert set(sorted(range(NUM_LAYERS), key=importance.__getitem__)[: len(IDENTITY)]) == set(IDENTITY)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_matches_transformers(family):
    model = make_tiny_model(family, num_hidden_layers=NUM_LAYERS)
    ours = Engine(model, kv_cache_memory=1 << 22).layer_importance(PROMPTS)
    assert ours == pytest.approx(hf_importance(model, PROMPTS), abs=1e-5)


def test_chunked_prefill_and_unpacked_weights_agree():
    model = make_tiny_model("llama", num_hidden_layers=NUM_LAYERS)
    whole = Engine(model, kv_cache_memory=1 << 22).layer_importance(PROMPTS)
    chunked = Engine(model, kv_cache_memory=1 << 22, max_num_batched_tokens=8, prepack_weights=False)
    assert chunked.layer_importance(PROMPTS) == pytest.approx(whole, abs=1e-6)
    invariant = Engine(model, kv_cache_memory=1 << 22, batch_invariant=True)
    assert invariant.layer_importance(PROMPTS) == pytest.approx(whole, abs=1e-6)
    # and a per-prompt mean weighted by token count is the mean over all tokens
    per_prompt = [chunked.layer_importance([p]) for p in PROMPTS]
    total = sum(len(p) for p in PROMPTS)
    expected = [sum(len(p) * v[i] for p, v in zip(PROMPTS, per_prompt)) / total for i in range(NUM_LAYERS)]
    assert whole == pytest.approx(expected, abs=1e-6)


def test_remeasured_on_current_weights_and_engine_still_generates():
    model = make_tiny_model("llama", num_hidden_layers=NUM_LAYERS)
    engine = Engine(model, kv_cache_memory=1 << 22)
    params = SamplingParams(temperature=0, max_tokens=6)
    before = engine.generate(PROMPTS, params)
    assert engine.layer_importance(PROMPTS)[3] > 1e-3
    again = engine.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in before]
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    assert engine.layer_importance(PROMPTS)[3] < 1e-6


def test_bad_calibration_prompts():
    model = make_tiny_model("llama")
    engine = Engine(model, kv_cache_memory=1 << 22)
    with pytest.raises(ValueError, match="at least one"):
        engine.layer_importance([])
    with pytest.raises(TypeError, match="list of prompts"):
        engine.layer_importance([1, 2, 3])
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.layer_importance(["text"])
    with pytest.raises(ValueError, match="outside"):
        engine.layer_importance([[1, 100000]])
    one_block = Engine(model, kv_cache_memory=2 * 4 * 16 * 2 * 16 * 4, block_size=16)  # 1 block, 4 layers
    with pytest.raises(ValueError, match="17 tokens but the KV cache holds 16"):
        one_block.layer_importance([list(range(3, 20))])
    assert len(one_block.layer_importance([list(range(3, 19))] * 3)) == 4


def test_skipping_identity_layers_generates_what_the_full_model_does():
    engine = Engine(identity_model(), kv_cache_memory=1 << 22)
    importance = engine.layer_importance(PROMPTS)
    policy = SkipPolicy(ratio=len(IDENTITY) / NUM_LAYERS, importance=importance, temperature=1e-3, seed=0)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = engine.generate(PROMPTS, params)
    skipped = engine.generate(PROMPTS, params, skip=policy)
    for f, s in zip(full, skipped):
        assert f.skipped_layers == () and s.skipped_layers == IDENTITY
        assert s.outputs[0].token_ids == f.outputs[0].token_ids
        assert s.outputs[0].logprobs == pytest.approx(f.outputs[0].logprobs, abs=1e-5)


def test_low_temperature_skips_the_least_important_first():
    importance = [9.0, 0.5, 3.0, 0.1, 2.0, 0.0, 7.0, 4.0, 1.0, 0.2]
    policy = SkipPolicy(ratio=0.3, protect_first=0, protect_last=0, importance=importance, temperature=1e-4,
                        seed=1)
    for _ in range(20):
        assert policy.plan(10).skipped == (3, 5, 9)
    for key in range(20):
        assert policy.plan_for(10, key, 0).skipped == (3, 5, 9)
    # protected layers are never skipped, however unimportant
    policy = SkipPolicy(ratio=0.2, protect_first=1, protect_last=2, importance=[0.0] + [1.0] * 7 + [0.0] * 2,
                        temperature=1e-4, seed=0)
    assert all(0 not in policy.plan(10).skipped and not {8, 9} & set(policy.plan(10).skipped)
               for _ in range(20))


def frequencies(policy, num_layers, draws, keyed=False):
    counts = Counter()
    for n in range(draws):
        counts.update((policy.plan_for(num_layers, n) if keyed else policy.plan(num_layers)).skipped)
    return [counts[i] / draws for i in range(num_layers)]


@pytest.mark.parametrize("keyed", [False, True])
def test_high_temperature_is_uniform_and_middle_temperature_ordered(keyed):
    importance = [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 0.0]
    draws = 4000
    hot = SkipPolicy(ratio=0.25, importance=importance, temperature=1e6, seed=3)
    freq = frequencies(hot, 8, draws, keyed)
    assert freq[0] == freq[7] == 0
    for f in freq[1:7]:  # each eligible layer in 2 of 6 slots: 1/3, binomial sd ~0.0075
        assert abs(f - 1 / 3) < 0.04
    warm = SkipPolicy(ratio=0.25, importance=importance, temperature=0.5, seed=3)
    freq = frequencies(warm, 8, draws, keyed)
    assert freq[1] > freq[3] > freq[5] > freq[6]
    assert sum(freq) == pytest.approx(2)


def test_first_draw_probabilities_follow_the_documented_rule():
    importance = [0.0, 0.2, 0.4, 1.0, 0.0]
    temperature, draws = 0.7, 20000
    policy = SkipPolicy(ratio=0.2, importance=importance, temperature=temperature, seed=5)  # count 1
    eligible = [1, 2, 3]
    mean = sum(importance[i] for i in eligible) / len(eligible)
    weights = [math.exp(-importance[i] / (temperature * mean)) for i in eligible]
    freq = frequencies(policy, 5, draws)
    for i, w in zip(eligible, weights):
        assert abs(freq[i] - w / sum(weights)) < 0.015


def test_without_importance_draws_are_unchanged():
    for seed in (0, 7):
        policy = SkipPolicy(ratio=0.25, seed=seed)
        rng = random.Random(seed)
        for _ in range(10):
            assert policy.plan(12).skipped == tuple(sorted(rng.sample(range(1, 11), 3)))
        key_rng = random.Random(repr((seed, 4, 2)))
        assert policy.plan_for(12, 4, 2).skipped == tuple(sorted(key_rng.sample(range(1, 11), 3)))
    # temperature alone changes nothing
    assert [SkipPolicy(0.25, seed=1, temperature=0.1).plan(12) for _ in range(3)] == [
        SkipPolicy(0.25, seed=1).plan(12) for _ in range(3)
    ]


def test_all_zero_importance_is_uniform():
    policy = SkipPolicy(ratio=0.25, importance=[0.0] * 8, temperature=1e-3, seed=2)
    freq = frequencies(policy, 8, 3000)
    for f in freq[1:7]:
        assert abs(f - 1 / 3) < 0.05


def test_bad_importance_and_temperature():
    with pytest.raises(ValueError, match=r"\(1, -0.5\)"):
        SkipPolicy(0.25, importance=[0.0, -0.5, 1.0])
    with pytest.raises(ValueError, match="nan"):
        SkipPolicy(0.25, importance=[0.0, float("nan")])
    with pytest.raises(ValueError, match="inf"):
        SkipPolicy(0.25, importance=[float("inf"), 1.0])
    with pytest.raises(TypeError, match="sequence of floats"):
        SkipPolicy(0.25, importance=3.0)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            SkipPolicy(0.25, importance=[1.0] * 8, temperature=bad)
    policy = SkipPolicy(0.25, importance=[1.0] * 6)
    with pytest.raises(ValueError, match="has 6 values; the model has 8 layers"):
        policy.plan(8)
    with pytest.raises(ValueError, match="has 6 values; the model has 8 layers"):
        policy.plan_for(8, 0)
    assert SkipPolicy(0.25, importance=torch.tensor([1.0] * 8), temperature=math.inf).plan(8).num_active == 6
