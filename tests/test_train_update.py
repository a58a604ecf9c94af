"""The update phase: the packed path (groups per micro-batch, kept LM-head logits, fused AdamW) computes the
per-group path's loss, gradients and optimizer step."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import make_tiny_model

from nreft_engine.train.config import TrainConfig
from nreft_engine.train.corrections import CorrectionConfig
from nreft_engine.train.logprobs import LogitFilter, group_logprobs
from nreft_engine.train.objectives import ObjectiveConfig
from nreft_engine.train.update import Updater, make_optimizer, micro_batches

FILTER = LogitFilter(temperature=0.9)


def _rollout(model: torch.nn.Module) -> tuple:
    """5 groups of 3: prompts of 2..9 tokens, completions of 1..6; behaviour log-probs = the model's own
    plus noise (an off-policy gap), rewards with one all-equal group (no gradient without a KL term)."""
    gen = torch.Generator().manual_seed(11)
    prompts, completions, behaviour = [], [], []
    for g in range(5):
        prompts.append(torch.randint(3, 128, (2 + (g * 3) % 8,), generator=gen).tolist())
        group = [torch.randint(3, 128, (1 + (g + j * 2) % 6,), generator=gen).tolist() for j in range(3)]
        completions.append(group)
        with torch.no_grad():
            own = group_logprobs(model, prompts[-1], group, FILTER)
        behaviour.append([(lp + 0.3 * torch.randn(lp.shape, generator=gen)).tolist() for lp in own])
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2], [0.0, 1.0, 1.0], [0.3, 0.9, 0.1], [1, 0, 0]])
    return prompts, completions, behaviour, rewards


def _update(path: str, settings: dict) -> tuple[dict, list[torch.Tensor], list[torch.Tensor], int]:
    """One update of a fresh tiny model on the fixed rollout: record, gradients, new weights, and the least
    any parameter's version counter moved (what the engine watches to re-pack its weight copies)."""
    model = make_tiny_model("llama", seed=2)
    model.set_attn_implementation("sdpa")
    config = TrainConfig(lr=1e-3, grad_clip=1e9, update_path=path, **settings)
    optimizer = make_optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    reference = copy.deepcopy(model).requires_grad_(False) if config.objective.kl_beta > 0 else None
    rollout = _rollout(model)
    versions = [p._version for p in model.parameters()]
    record = Updater(model, optimizer, schedule, config, FILTER, reference)(*rollout)
    moved = min(p._version - v for p, v in zip(model.parameters(), versions))
    return record, [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in
                                                                   model.parameters()], moved


@pytest.mark.parametrize("settings", [
    {},
    {"max_update_tokens": 30, "head_memory_mb": 0},
    {"max_update_tokens": 40, "objective": ObjectiveConfig(aggregation="sequence", kl_beta=0.1),
     "correction": CorrectionConfig(name="retrace")},
    {"ppo_epochs": 2, "correction": CorrectionConfig(name="seq_geo", seq_mode="mask")},
])
def test_packed_path_has_the_per_group_loss_gradients_and_step(settings):
    old, old_grads, old_weights, old_moved = _update("per-group", settings)
    new, new_grads, new_weights, new_moved = _update("packed", settings)
    assert old["update_micro_batches"] == old["trained_groups"] > new["update_micro_batches"]
    # the loss sums terms of either sign, so its rounding scales with the terms, not with their small sum (an
    # AVX2 EPYC's two paths differed by 3.7e-7 on a loss of -0.0369: 1e-5 of it, fp32 rounding of the terms)
    assert new["loss"] == pytest.approx(old["loss"], rel=1e-5, abs=1e-6)
    assert new["grad_norm"] == pytest.approx(old["grad_norm"], rel=1e-4)
    for key in ("ratio_mean", "ess_fraction", "frac_corrected", "kl_behaviour_target"):
        assert new[key] == pytest.approx(old[key], rel=1e-5, abs=1e-7), key
    assert (new["trained_groups"], new["train_tokens"]) == (old["trained_groups"], old["train_tokens"])
    for a, b in zip(new_grads, old_grads):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    for a, b, grad in zip(new_weights, old_weights, old_grads):
        # fused AdamW takes the per-parameter AdamW's step, where the gradient is not rounding noise (there
        # a first Adam step is lr * sign(g) either way); after 2 epochs the gradients of the 1st are gone
        clear = grad.abs() > 1e-3 * grad.abs().max() if settings.get("ppo_epochs", 1) == 1 else []
        assert torch.allclose(a[clear], b[clear], atol=1e-6)
    # every parameter's version moves with each step, though a fused step does not move it by itself
    assert min(old_moved, new_moved) >= settings.get("ppo_epochs", 1)


def test_bfloat16_update_stays_close_to_float32():
    fp32, fp32_grads, _, _ = _update("packed", {})
    bf16, bf16_grads, _, _ = _update("packed", {"update_dtype": "bfloat16"})
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05, abs=1e-3)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in bf16_grads]),
                                                torch.cat([g.flatten() for g in fp32_grads]), dim=0)
    assert cos > 0.98


def test_micro_batches_pack_consecutive_groups_up_to_the_budget():
    assert micro_batches([10, 10, 10, 25, 5, 5], 20) == [[0, 1], [2], [3], [4, 5]]
    assert micro_batches([10, 10], 0) == [[0], [1]]
    assert micro_batches([], 100) == []


def test_update_settings_out_of_range_are_named():
    for bad, message in (({"update_path": "fast"}, "update_path='fast': must be one of packed, per-group"),
                         ({"max_update_tokens": 0}, "max_update_tokens=0"),
                         ({"update_dtype": "float16"}, "update_dtype='float16'")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).check()


def test_bfloat16_needs_the_packed_path():
    with pytest.raises(ValueError, match="update_dtype='bfloat16' needs update_path='packed'"):
        _update("per-group", {"update_dtype": "bfloat16"})
