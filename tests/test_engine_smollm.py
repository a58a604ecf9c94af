"""Acceptance on the real embedded model (SmolLM2-135M-Instruct, fp32, CPU)."""

import pytest
import torch
from test_engine import reference_logprobs, without_layers

from nreft_engine import Engine, SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is 12 + 30?", "Name a color of the sky.", "Write one sentence about dogs.",
    "What is 7 times 6?", "Who wrote Hamlet?", "Count from one to five.",
    "What is the boiling point of water?", "Say hello in French.",
]


@pytest.fixture(scope="module")
def engine_and_prompts(smollm):
    model, tokenizer = smollm
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        for q in QUESTIONS
    ]
    return Engine(model, tokenizer, kv_cache_memory=1 << 28), [list(p) for p in prompts]


def test_greedy_equals_transformers_generate(engine_and_prompts):
    engine, prompts = engine_and_prompts
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=64, min_tokens=64))
    model = engine.model
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            expected = model.generate(
                torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False
            )
        assert out.outputs[0].token_ids == expected[0, len(prompt):].tolist()


@pytest.mark.parametrize("skipped", [(), (3, 10, 17, 24)])
def test_sampled_logprobs_equal_recomputed(engine_and_prompts, skipped):
    engine, prompts = engine_and_prompts
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_tokens=32, seed=11)
    outs = engine.generate(prompts, params, skip=list(skipped))
    reference = without_layers(engine.model, skipped) if skipped else engine.model
    worst = 0.0
    for prompt, out in zip(prompts, outs):
        assert out.skipped_layers == skipped
        for c in out.outputs:
            expected = reference_logprobs(reference, prompt, c.token_ids, params)
            worst = max(worst, (torch.tensor(c.logprobs) - expected).abs().max().item())
    assert worst <= 1e-4
