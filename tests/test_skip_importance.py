"""`skip_importance` in the trainer, end to end on a model with identity layers: the importance measured,
the skip sets it weights, the adaptive count that settles on exactly those layers, and its checkpoint."""

from __future__ import annotations

import pytest
import torch
from test_cli_errors import tiny_dir, tiny_train  # noqa: F401 (tiny_dir: a fixture)
from test_train_support import tiny_policy, token_reward
from train_testing import train_until_killed

from nreft_engine import Engine, SkipPolicy
from nreft_engine.cli import main as cli_main
from nreft_engine.train.config import TrainConfig
from nreft_engine.train.data import arithmetic_task, batch_at, render_prompts
from nreft_engine.train.loop import Trainer
from nreft_engine.train.metrics import read_metrics

NUM_LAYERS = 6
IDENTITY = (2, 3)  # of the skippable layers 1..4
TARGET, BAND = 0.9, 0.05


def identity_policy():
    """The tiny policy with IDENTITY's o_proj and down_proj zeroed and frozen: those layers stay the identity
    on the residual stream however the others train."""
    model, tok = tiny_policy(seed=0, num_hidden_layers=NUM_LAYERS)
    with torch.no_grad():
        for i in IDENTITY:
            layer = model.model.layers[i]
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight.zero_()
                linear.weight.requires_grad_(False)
    return model, tok


def importance_trainer(out_dir, **overrides):
    model, tok = identity_policy()
    settings = {"steps": 7, "prompts_per_step": 2, "group_size": 4, "max_tokens": 5, "eval_max_tokens": 5,
                "lr": 3e-3, "temperature": 1.0, "skip_ratio": "auto", "target_ess": TARGET, "ess_band": BAND,
                "protect_first": 1, "protect_last": 1, "save_every": 0, "skip_importance": True,
                "skip_temperature": 1e-3, "importance_every": 3, "importance_prompts": 8}
    cfg = TrainConfig(**{**settings, **overrides})
    return Trainer(model, tok, arithmetic_task(0, num_heldout=4), [token_reward], token_reward, cfg,
                   str(out_dir), "tiny-identity", kv_cache_memory=2**24)


def records(trainer, kind):
    return [r for r in read_metrics(trainer.metrics_path) if r["type"] == kind]


def test_identity_layers_rank_lowest_are_skipped_first_and_the_count_settles_on_them(tmp_path):
    trainer = importance_trainer(tmp_path / "run")
    cfg = trainer.config
    calibration = render_prompts(trainer.tokenizer, batch_at(trainer.task, 0, 8, cfg.seed), cfg.system_prompt)
    before = Engine(trainer.model, kv_cache_memory=2**22).layer_importance(calibration)
    trainer.train()

    # importance, measured by the engine on the first 8 train prompts, before the first step and every 3
    measured = records(trainer, "importance")
    assert [r["step"] for r in measured] == [0, 3, 6]
    assert measured[0]["layer_importance"] == pytest.approx(before, abs=1e-9)
    for r in measured:
        values = r["layer_importance"]
        assert all(values[i] < 1e-6 for i in IDENTITY) and min(values[i] for i in (1, 4)) > 1e-3
        assert sorted(range(1, 5), key=values.__getitem__)[:2] == sorted(IDENTITY, key=values.__getitem__)

    # the importance-weighted policy skips them first: one of them, then both, only then another layer
    policy = {n: SkipPolicy(n / NUM_LAYERS, importance=before, temperature=1e-3, seed=0) for n in (1, 2, 3)}
    for _ in range(20):
        assert set(policy[1].plan(NUM_LAYERS).skipped) < set(IDENTITY)
        assert policy[2].plan(NUM_LAYERS).skipped == IDENTITY
        assert set(policy[3].plan(NUM_LAYERS).skipped) > set(IDENTITY)

    # the controller, on the ESS the trainer measures: exact (1) with only identity layers skipped, so one
    # more layer; then the ESS is still exact, but every other layer is infinitely more important than the
    # skipped ones (importance_ceiling 2): it holds at 2 and never tries a third
    steps = records(trainer, "train")
    assert [r["num_skipped_layers"] for r in steps] == [1, 2, 2, 2, 2, 2, 2]
    for r in steps:
        assert set(r["skipped_layers"]) <= set(IDENTITY) and r["ess_fraction"] > 0.9999


def test_a_resumed_run_draws_the_same_skip_sets_from_the_saved_importance(tmp_path, monkeypatch):
    """A fixed skip ratio weighted by importance (temperature 1: the draws vary); the importance measured
    after step 2 is in the checkpoint of step 2, so the run resumed there does not measure it again."""
    settings = {"skip_ratio": 0.5, "target_ess": None, "ess_band": None, "skip_temperature": 1.0,
                "importance_every": 2, "save_every": 2, "steps": 5}
    full = importance_trainer(tmp_path / "full", **settings)
    full.train()
    sets = [r["skipped_layers"] for r in records(full, "train")]
    assert len(set(map(tuple, sets))) > 1 and all(len(s) == 3 for s in sets)

    killed = importance_trainer(tmp_path / "killed", **settings)
    train_until_killed(killed, monkeypatch, 3)
    calls = []
    measure = Engine.layer_importance

    def counted(self, prompts):
        calls.append(len(prompts))
        return measure(self, prompts)

    monkeypatch.setattr(Engine, "layer_importance", counted)
    resumed = importance_trainer(tmp_path / "killed", **settings)
    resumed.train()
    assert len(calls) == 1  # after step 4 only: the importance of step 2 came from the checkpoint
    assert [r["skipped_layers"] for r in records(resumed, "train")] == sets
    again, first = records(resumed, "importance"), records(full, "importance")
    assert [r["step"] for r in again] == [r["step"] for r in first] == [0, 2, 4]
    for a, b in zip(again, first):
        assert a["layer_importance"] == pytest.approx(b["layer_importance"], abs=1e-9)


def test_cli_run_with_skip_importance_logs_the_vector(tmp_path, tiny_dir):  # noqa: F811
    out = tmp_path / "out"
    options = ("--skip-ratio", "0.5", "--skip-importance", "--skip-temperature", "0.5",
               "--importance-prompts", "4")
    assert cli_main(tiny_train(tiny_dir, out, *options)) == 0
    got = read_metrics(str(out / "metrics.jsonl"))
    assert [r["type"] for r in got] == ["eval", "importance", "train", "eval"]
    assert len(got[1]["layer_importance"]) == 4 and all(v > 0 for v in got[1]["layer_importance"])
    assert len(got[2]["skipped_layers"]) == 2
