"""Off-policy corrections: exact on-policy behaviour with no skip, unbiasedness and variance on a bandit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_train_support import tiny_policy
from tiny_models import make_tiny_model

from nreft_engine import Engine, SamplingParams
from nreft_engine.train.config import TrainConfig
from nreft_engine.train.corrections import CORRECTIONS, CorrectionConfig, correction_weights, ratio_stats
from nreft_engine.train.data import arithmetic_task
from nreft_engine.train.logprobs import LogitFilter, group_logprobs
from nreft_engine.train.loop import Trainer
from nreft_engine.train.objectives import ObjectiveConfig, group_advantages, policy_loss
from nreft_engine.train.update import _pad


def digit_reward(prompts, completions, completion_ids, **columns):
    """A dense reward a random tiny model gets some of: the fraction of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_unknown_correction_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown correction 'ips'.*none, is, tis, retrace, mask, seq_geo"):
        CorrectionConfig("ips")


def test_formulas_on_known_ratios():
    log_ratio = torch.tensor([[math.log(0.25), math.log(3.0), 0.0], [math.log(2.0), 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    w, _ = correction_weights(log_ratio, mask, CorrectionConfig("tis", clip=2.0))
    assert torch.allclose(w[0], torch.tensor([0.25, 2.0, 1.0]))
    w, hit = correction_weights(log_ratio, mask, CorrectionConfig("mask", mask_low=0.5, mask_high=2.5))
    assert torch.allclose(w[0], torch.tensor([0.0, 0.0, 1.0])) and hit[0, :2].all() and not hit[1].any()
    w, _ = correction_weights(log_ratio, mask, CorrectionConfig("retrace", trace_lambda=0.5))
    assert torch.allclose(w[0], torch.tensor([0.125, 0.0625, 0.03125]))
    w, _ = correction_weights(log_ratio, mask, CorrectionConfig("seq_geo", clip=5.0))
    assert torch.allclose(w[0], torch.full((3,), (0.25 * 3.0) ** (1 / 3)))
    assert torch.allclose(w[1], torch.full((3,), 2.0))
    stats = ratio_stats(log_ratio, mask, hit)
    assert stats["ratio_min"] == pytest.approx(0.25) and stats["ratio_max"] == pytest.approx(3.0)
    assert 0 < stats["ess_fraction"] < 1 and stats["frac_corrected"] == pytest.approx(0.5)
    assert stats["kl_behaviour_target"] > 0


def test_without_skipping_ratios_are_one_and_all_corrections_equal_grpo(tmp_path):
    model, tok = tiny_policy(seed=2)
    cfg = TrainConfig(prompts_per_step=3, group_size=4, max_tokens=6, skip_ratio=0.0, temperature=0.9,
                      top_k=40)
    trainer = Trainer(model, tok, arithmetic_task(0), [digit_reward], digit_reward, cfg, str(tmp_path),
                      "tiny", kv_cache_memory=2**24)
    rollout = trainer.rollout(0, arithmetic_task(0).train[:3])
    advantages = group_advantages(rollout.rewards)
    assert advantages.abs().sum() > 0
    results = {}
    for name in CORRECTIONS:
        model.zero_grad()
        total = 0.0
        for i, group in enumerate(rollout.completions):
            logp = _pad(group_logprobs(model, rollout.prompt_ids[i], group, trainer.filter))
            mask = _pad([[1.0] * len(c) for c in group]).bool()
            behaviour = _pad(rollout.behaviour_logprobs[i])
            assert (logp.detach() - behaviour)[mask].abs().max() < 1e-5
            loss, _, corrected = policy_loss(logp, logp.detach(), behaviour, advantages[i], mask,
                                             ObjectiveConfig(), CorrectionConfig(name), normalizer=20.0)
            loss.backward()
            total += loss.item()
            assert not corrected.any() or name == "retrace"  # retrace flags ρ < 1 by a hair; weights stay 1
        results[name] = (total, _grads(model).clone())
    base_loss, base_grad = results["none"]
    for name, (loss, grad) in results.items():
        assert loss == pytest.approx(base_loss, rel=1e-4, abs=1e-5), name  # retrace multiplies up to T ratios
        # ratios are 1 within 1e-5, so gradients agree to that order of the largest gradient entry
        assert torch.allclose(grad, base_grad, rtol=1e-4, atol=1e-4 * base_grad.abs().max().item()), name


# --- unbiasedness on an enumerable problem ----------------------------------------------------------------
# One prompt, completions of a single token from a vocabulary of 8: every outcome can be enumerated. The
# target is a tiny random model; the behaviour is the same model with layer 1 skipped (sampled by the engine).

VOCAB, PROMPT, SKIP = 8, [1, 3, 4, 5], [1]


def _without_layers(model, skipped):
    nested = copy.deepcopy(model)
    layers = [layer for i, layer in enumerate(nested.model.layers) if i not in skipped]
    nested.model.layers = torch.nn.ModuleList(layers)
    nested.config.num_hidden_layers = len(layers)
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    return nested


@pytest.fixture(scope="module")
def bandit():
    model = make_tiny_model("llama", seed=5, vocab_size=VOCAB)
    outcomes = [[y] for y in range(VOCAB)]
    with torch.no_grad():
        behaviour = torch.cat(group_logprobs(_without_layers(model, SKIP), PROMPT, outcomes, LogitFilter()))
        target = torch.cat(group_logprobs(model, PROMPT, outcomes, LogitFilter()))
    reward = torch.linspace(-1.0, 1.0, VOCAB)
    # exact on-policy policy gradient: ∇ Σ_y π_θ(y) R(y); the loss is its negative
    model.zero_grad()
    (-(torch.cat(group_logprobs(model, PROMPT, outcomes, LogitFilter())).exp() * reward).sum()).backward()
    exact = _grads(model).clone()
    engine = Engine(model, kv_cache_memory=2**24)
    params = SamplingParams(n=250, max_tokens=1, ignore_eos=True, seed=11)
    outs = engine.generate([PROMPT] * 8, params, skip=SKIP)
    samples = [(c.token_ids[0], c.logprobs[0]) for o in outs for c in o.outputs]
    for y, lp in samples[:50]:
        assert lp == pytest.approx(behaviour[y].item(), abs=1e-4)  # the engine samples from the nested model
    counts = torch.bincount(torch.tensor([y for y, _ in samples]), minlength=VOCAB).double()
    return model, behaviour, target, reward, exact, counts / counts.sum(), len(samples)


def _per_outcome_grads(model, behaviour, reward, correction: CorrectionConfig) -> torch.Tensor:
    """g(y) = ∇ loss of the single completion y under `correction`, for every y: [VOCAB, params]."""
    rows = []
    for y in range(VOCAB):
        model.zero_grad()
        logp = group_logprobs(model, PROMPT, [[y]], LogitFilter())[0][None]
        mask = torch.ones(1, 1, dtype=torch.bool)
        loss, _, _ = policy_loss(logp, logp.detach(), behaviour[y].reshape(1, 1), reward[y].reshape(1), mask,
                                 ObjectiveConfig(), correction, normalizer=1.0)
        loss.backward()
        rows.append(_grads(model).clone())
    return torch.stack(rows).double()


def _moments(grads: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean and total variance (trace of the covariance) of g(y) under y ~ probs."""
    mean = probs @ grads
    return mean, float(probs @ (grads**2).sum(dim=1) - (mean**2).sum())


def test_is_is_unbiased_and_tis_mask_trade_variance(bandit):
    model, behaviour, target, reward, exact, frequencies, n = bandit
    beta = behaviour.double().exp()
    ratio = (target - behaviour).exp()
    assert ratio.max() > 1.5 and ratio.min() < 0.7  # the nested model really is off-policy
    g_is = _per_outcome_grads(model, behaviour, reward, CorrectionConfig("is"))
    mean, var = _moments(g_is, beta)
    assert torch.allclose(mean, exact.double(), rtol=1e-4, atol=1e-6)  # exact expectation
    # Monte-Carlo: the engine's behaviour samples estimate the on-policy gradient within their error
    error = (frequencies @ g_is - exact.double()).norm()
    assert error < 4 * math.sqrt(var / n)
    g_none = _per_outcome_grads(model, behaviour, reward, CorrectionConfig("none"))
    assert (_moments(g_none, beta)[0] - exact.double()).norm() > 4 * math.sqrt(var / n)  # the test has power

    cap = float(ratio.max()) * 1.01  # nothing clipped or masked: exactly `is`
    assert torch.equal(_per_outcome_grads(model, behaviour, reward, CorrectionConfig("tis", clip=cap)), g_is)
    wide = CorrectionConfig("mask", mask_low=float(ratio.min()) * 0.99, mask_high=cap)
    assert torch.equal(_per_outcome_grads(model, behaviour, reward, wide), g_is)
    for tight in (CorrectionConfig("tis", clip=1.0), CorrectionConfig("mask", mask_low=0.5, mask_high=1.5)):
        assert _moments(_per_outcome_grads(model, behaviour, reward, tight), beta)[1] < var, tight.name
