"""FusedLinear (nreft_engine/linear.py): one matmul for several projections, kept in step with the model."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_model

from nreft_engine import Engine, SamplingParams
from nreft_engine.linear import FusedLinear


def _sources(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, 16, generator=gen).to(dtype) for n in (32, 8, 8)]
    biases = [torch.randn(n, generator=gen).to(dtype) for n in (32, 8, 8)]
    return weights, biases


@pytest.mark.parametrize("prepack", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_outputs_equal_one_linear_per_source(prepack, with_bias):
    weights, biases = _sources()
    biases = biases if with_bias else None
    fused = FusedLinear(weights, biases, prepack=prepack)
    x = torch.randn(5, 16)
    outs = fused(x)
    assert [o.shape for o in outs] == [(5, 32), (5, 8), (5, 8)]
    for i, (out, w) in enumerate(zip(outs, weights)):
        expected = F.linear(x, w, None if biases is None else biases[i])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_missing_biases_are_zero():
    weights, biases = _sources()
    fused = FusedLinear(weights, [biases[0], None, None], prepack=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fused(x)[1], F.linear(x, weights[1]), rtol=1e-5, atol=1e-5)


def test_in_place_updates_are_seen_after_refresh():
    weights, biases = _sources()
    fused = FusedLinear(weights, biases, prepack=True)
    assert not fused.refresh()  # nothing changed since construction
    x = torch.randn(3, 16)
    weights[2].mul_(-2.0)
    biases[1].add_(1.0)
    assert fused.refresh() and not fused.refresh()
    for i, out in enumerate(fused(x)):
        torch.testing.assert_close(out, F.linear(x, weights[i], biases[i]), rtol=1e-5, atol=1e-5)


def test_a_refreshed_plain_fused_weight_keeps_its_storage():
    """Where the fused weight is a plain tensor (CUDA), refresh copies into it: captured graphs read it."""
    weights, biases = _sources()
    with mock.patch("nreft_engine.ops.prepare_linear_weight", side_effect=lambda w: w):
        fused = FusedLinear(weights, biases, prepack=True)
        storage = fused.weight.data_ptr(), fused.bias.data_ptr()
        weights[0].add_(1.0)
        biases[2].mul_(3.0)
        assert fused.refresh()
    assert (fused.weight.data_ptr(), fused.bias.data_ptr()) == storage
    torch.testing.assert_close(fused.weight, torch.cat(weights))
    torch.testing.assert_close(fused.bias, torch.cat(biases))


def test_without_prepack_the_sources_are_used_in_place():
    weights, _ = _sources()
    fused = FusedLinear(weights, prepack=False)
    assert fused.weight is None and not fused.refresh()
    weights[0].zero_()
    assert torch.count_nonzero(fused(torch.randn(2, 16))[0]) == 0


def test_bias_count_must_match():
    weights, biases = _sources()
    with pytest.raises(ValueError, match="2 biases for 3 weights"):
        FusedLinear(weights, biases[:2], prepack=True)


@pytest.mark.parametrize("prepack", [True, False])
def test_engine_sees_an_optimizer_step(prepack):
    """AdamW updates every parameter in place; the next generate must use the new weights, packed or not."""
    model = make_tiny_model("qwen2")
    engine = Engine(model, kv_cache_memory=1 << 22, prepack_weights=prepack)
    assert engine.runner.prepack_weights is prepack
    ids = [5, 9, 3]
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=1)
    before = engine.generate([ids], params)[0].outputs[0]
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    out = model(torch.tensor([ids + before.token_ids]))
    out.logits.sum().backward()
    opt.step()
    after = engine.generate([ids], params)[0].outputs[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids + after.token_ids])).logits[0, len(ids) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(after.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(after.logprobs), expected, rtol=0, atol=1e-4)
    assert after.logprobs != before.logprobs


def test_default_packs_only_when_the_copies_fit_in_half_the_available_memory(caplog):
    """Two packed copies of the 2-D weights (tied ones counted once) must fit in half of available memory."""
    model = make_tiny_model("qwen2")
    matrices = {p.data_ptr(): p for p in model.parameters() if p.dim() == 2}
    copies = 2 * sum(p.numel() * p.element_size() for p in matrices.values())
    with mock.patch("nreft_engine.linear.available_memory", return_value=2 * copies):
        assert Engine(model, kv_cache_memory=1 << 22).runner.prepack_weights is True
    with (
        mock.patch("nreft_engine.linear.available_memory", return_value=2 * copies - 2),
        caplog.at_level("WARNING"),
    ):
        engine = Engine(model, kv_cache_memory=1 << 22)
    assert engine.runner.prepack_weights is False
    assert "prepack_weights=True" in caplog.text
    with mock.patch("nreft_engine.linear.available_memory", return_value=0):
        assert Engine(model, kv_cache_memory=1 << 22, prepack_weights=True).runner.prepack_weights is True


def test_bf16_without_native_bf16_matmuls_runs_widened_and_says_so(monkeypatch, caplog):
    """On a CPU whose oneDNN has no bf16 (AVX2), a bf16 engine packs float32 copies for oneDNN, logs one
    warning naming the path, and its behaviour log-probs are the model's (fp32 recompute of the same bf16
    weights, within bf16 rounding of the activations)."""
    from nreft_engine.kernels import cpu as cpu_kernels

    monkeypatch.setattr(cpu_kernels, "onednn_bf16", lambda: False)
    model = make_tiny_model("qwen2").to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="nreft_engine.linear"):
        engine = Engine(model, kv_cache_memory=1 << 22)
    assert engine.runner.prepack_weights is True
    assert caplog.text.count("without native bf16 matmuls") == 1
    assert "float32 copies" in caplog.text
    packed = engine.runner.decoder.linears[0].gate_up.weight
    assert packed.onednn.dtype == torch.float32 and packed.rows16.dtype == torch.bfloat16
    prompt = [5, 9, 17, 33, 8]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=0, ignore_eos=True)
    out = engine.generate([prompt, list(range(3, 40))], params)[0]
    full = model.float()
    for c in out.outputs:
        with torch.no_grad():
            logits = full(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=0, atol=0.1)
