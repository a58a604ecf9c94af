"""The adaptive skip count (skip_ratio="auto"): the controller's rule, its state, the trainer using it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_cli_errors import tiny_dir, tiny_train  # noqa: F401 (tiny_dir: a fixture)
from test_train_support import tiny_policy, token_reward
from train_testing import train_until_killed

from nreft_engine import SkipPolicy
from nreft_engine.cli import build_parser
from nreft_engine.cli import main as cli_main
from nreft_engine.train.command import train_config
from nreft_engine.train.config import TrainConfig
from nreft_engine.train.data import arithmetic_task
from nreft_engine.train.loop import Trainer
from nreft_engine.train.metrics import read_metrics
from nreft_engine.train.skip_control import SkipController, StepSkips, _controller, importance_ceiling


def test_moves_up_above_the_band_down_below_it_and_holds_inside():
    c = SkipController(target_ess=0.8, band=0.05, min_layers=0, max_layers=5, start=2)
    assert c.update(0.9) == 3  # ESS above target + band: the behaviour model can skip more
    assert c.update(0.7) == 2  # below target - band: skip fewer
    for ess in (0.8, 0.84, 0.76, 0.85, 0.75, None, float("nan")):  # inside the band (edges too) or no ESS
        assert c.update(ess) == 2


def test_the_count_stays_within_min_and_max():
    c = SkipController(target_ess=0.5, band=0.1, min_layers=1, max_layers=3, start=1)
    assert [c.update(1.0) for _ in range(5)] == [2, 3, 3, 3, 3]
    assert [c.update(0.0) for _ in range(5)] == [2, 1, 1, 1, 1]
    assert SkipController(0.5, 0.1, 2, 4).count == 2  # the default start: min_layers, or 1
    assert SkipController(0.5, 0.1, 0, 4).count == 1
    assert SkipController(0.5, 0.1, 0, 0).count == 0
    assert SkipController(0.5, 0.1, 0, 3, start=9).count == 3
    with pytest.raises(ValueError, match="min_layers <= max_layers"):
        SkipController(0.5, 0.1, 3, 2)
    with pytest.raises(ValueError, match="target_ess"):
        SkipController(0.0)


def cliff(count: int, fine: int = 2) -> float:
    """An ESS that jumps across any band from `fine` layers (exact) to one more (far off)."""
    return 1.0 if count <= fine else 0.3


def run(controller: SkipController, steps: int, ess=cliff) -> list[int]:
    """The count of each step, the controller updated by `ess(count)` after it."""
    counts = []
    for _ in range(steps):
        counts.append(controller.count)
        controller.update(ess(controller.count))
    return counts


def test_a_count_that_failed_is_retried_ever_more_rarely():
    counts = run(SkipController(target_ess=0.9, band=0.05, min_layers=0, max_layers=6, retry_wait=3), 40)
    probes = [step for step, count in enumerate(counts) if count == 3]
    assert counts[:3] == [1, 2, 3] and max(counts) == 3
    assert probes == [2, 6, 13, 26]  # 3, then 6, then 12 steps at 2 in between: the wait doubles
    assert counts[3:6] == [2, 2, 2] and counts[-1] == 2
    # once the count holds (the model got better), its failure is forgotten: the next one waits 3 steps again
    c = SkipController(target_ess=0.9, band=0.05, min_layers=0, max_layers=6, retry_wait=3)
    run(c, 13)
    assert c.count == 3  # the third try of 3, now with a model that can skip 3 layers
    assert run(c, 6, lambda count: cliff(count, fine=3)) == [3, 4, 3, 3, 3, 4]
    with pytest.raises(ValueError, match="retry_wait must be >= 1 step, got 0"):
        SkipController(0.9, retry_wait=0)


def test_the_wait_doubles_only_for_the_same_count():
    c = SkipController(target_ess=0.9, band=0.05, min_layers=0, max_layers=6, start=4, retry_wait=5)
    assert run(c, 8) == [4, 3, 2, 2, 2, 2, 2, 3]  # 4 failed, then 3 (a new count: 5 steps, not 10)
    assert run(c, 11) == [2] * 10 + [3]


def test_importance_ceiling_cuts_at_the_first_jump_and_caps_the_rises():
    # eligible layers 1..5 sorted by importance: 0, 0, 0.3, 0.5, 2.0 -> a jump after the two zeros
    importance = [9.0, 0.0, 0.5, 0.0, 0.3, 2.0, 9.0]
    assert importance_ceiling(importance, [1, 2, 3, 4, 5]) == 2
    assert importance_ceiling(importance, [2, 4, 5]) == 2  # 0.3, 0.5 (< 2x), then 2.0 (> 2x 0.5)
    assert importance_ceiling(importance, [2, 4]) == 2  # no jump: every eligible layer
    assert importance_ceiling(importance, [2, 4, 5], jump=5.0) == 3
    assert importance_ceiling([1e-9, 3e-9, 0.4, 0.5], [0, 1, 2, 3]) == 2  # ~0 (fp noise) counts as equal
    c = SkipController(target_ess=0.8, band=0.05, min_layers=0, max_layers=5, start=1)
    assert [c.update(1.0, ceiling=2) for _ in range(4)] == [2, 2, 2, 2]  # exact, yet no third layer
    assert c.update(1.0) == 3 and c.update(0.5, ceiling=2) == 2  # the ceiling caps rises, not falls


def test_state_dict_round_trip():
    c = SkipController(target_ess=0.8, band=0.05, min_layers=0, max_layers=6)
    for ess in (0.95, 0.95, 0.9, 0.8):
        c.update(ess)
    restored = SkipController(target_ess=0.8, band=0.05, min_layers=0, max_layers=6)
    restored.load_state_dict(c.state_dict())
    assert restored.state_dict() == c.state_dict() and restored.count == 4
    assert [restored.update(e) for e in (0.9, 0.5, 0.8)] == [c.update(e) for e in (0.9, 0.5, 0.8)]
    with pytest.raises(ValueError, match="outside"):
        SkipController(0.8, 0.05, 0, 2).load_state_dict(c.state_dict())


@pytest.mark.parametrize("split", [1, 3, 4, 7, 12, 20])
def test_resume_at_any_step_gives_the_same_counts(split):
    """A controller restored from the state saved after `split` steps (within a retry wait too) continues the
    uninterrupted one's counts."""
    def fresh():
        return SkipController(target_ess=0.9, band=0.05, min_layers=1, max_layers=5, retry_wait=2)

    whole = run(fresh(), 30)
    first = fresh()
    head = run(first, split)
    resumed = fresh()
    resumed.load_state_dict(first.state_dict())
    assert head + run(resumed, 30 - split) == whole
    assert len(set(whole)) > 1


def auto_skips(num_layers, **settings):
    cfg = TrainConfig(skip_ratio="auto", target_ess=0.8, skip_importance=False, **settings)
    return StepSkips(cfg, SimpleNamespace(num_layers=num_layers), tokenizer=None, task=None)


def test_an_adaptive_count_skips_what_that_fixed_ratio_does():
    skips = auto_skips(12, protect_first=2, protect_last=1, max_skip_layers=9)
    for seed in range(20):
        skips.controller.count = 3
        policy = SkipPolicy(0.25, protect_first=2, protect_last=1, seed=seed)
        assert skips.plan(seed) == policy.plan(12)  # round(0.25 * 12) = 3
        skips.controller.count = seed % 10
        plan = skips.plan(seed)
        assert len(plan.skipped) == seed % 10 and set(plan.skipped) <= set(range(2, 11))
    with pytest.raises(ValueError, match="min_skip_layers=10: the model has only 9 skippable layers"):
        auto_skips(12, protect_first=2, protect_last=1, min_skip_layers=10)


@pytest.mark.parametrize("settings, message", [
    ({"skip_ratio": 0.1, "target_ess": 0.8}, "target_ess 0.8: only with skip_ratio auto"),
    ({"skip_ratio": "auto", "target_ess": 1.5}, "target_ess=1.5: must be in (0, 1]"),
    ({"skip_ratio": "auto", "target_ess": 0.8, "ess_band": -0.1}, "ess_band=-0.1: must be in [0, 1)"),
    ({"skip_ratio": "auto", "target_ess": 0.8, "min_skip_layers": 3, "max_skip_layers": 2},
     "max_skip_layers 2: must be >= min_skip_layers 3"),
    ({"skip_ratio": "half"}, "skip_ratio='half': must be in [0, 1), or auto"),
    ({"skip_importance": False, "skip_temperature": 0.5}, "skip_temperature 0.5: only with skip_importance"),
    ({"skip_importance": False, "importance_every": 4}, "importance_every 4: only with skip_importance"),
    ({"skip_importance": True, "skip_temperature": 0.0}, "skip_temperature=0.0: must be > 0"),
    ({"skip_importance": True, "importance_every": -1}, "importance_every=-1: must be an integer >= 0"),
    ({"skip_importance": True, "importance_prompts": 0}, "importance_prompts=0: must be an integer >= 1"),
    ({"skip_importance": 1}, "skip_importance=1: must be True or False"),
])
def test_config_check_names_the_setting(settings, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**settings).check()
    assert message in str(err.value)


def test_the_default_holds_an_ess_of_0_6_skipping_the_least_important_layers():
    config = TrainConfig()
    config.check()
    assert (config.skip_ratio, config.skip_importance) == ("auto", True)
    assert _controller(config, 30).target_ess == 0.6 and config.skip_policy(0.1, 0).temperature == 0.1
    TrainConfig(skip_ratio=0.0).check()  # nothing skipped: the importance is not needed, and not measured


def test_cli_options_reach_the_config():
    parser = build_parser()
    args = parser.parse_args(["train", "--skip-ratio", "auto", "--target-ess", "0.7", "--ess-band", "0.1",
                              "--min-skip-layers", "2", "--max-skip-layers", "5"])
    config = train_config(args)
    assert (config.skip_ratio, config.target_ess, config.ess_band) == ("auto", 0.7, 0.1)
    assert (config.min_skip_layers, config.max_skip_layers) == (2, 5)
    config.check(cli=True)
    assert (config.skip_importance, config.skip_temperature, config.importance_every) == (True, None, None)
    assert not train_config(parser.parse_args(["train", "--no-skip-importance"])).skip_importance
    args = parser.parse_args(["train", "--skip-importance", "--skip-temperature", "0.2", "--importance-every",
                              "5", "--importance-prompts", "16"])
    config = train_config(args)
    assert (config.skip_importance, config.skip_temperature) == (True, 0.2)
    assert (config.importance_every, config.importance_prompts) == (5, 16)
    config.check(cli=True)
    with pytest.raises(ValueError, match="--skip-temperature 0.2: only with --skip-importance"):
        argv = ["train", "--no-skip-importance", "--skip-temperature", "0.2"]
        train_config(parser.parse_args(argv)).check(cli=True)
    with pytest.raises(ValueError, match="--target-ess 0.7: only with --skip-ratio auto"):
        argv = ["train", "--skip-ratio", "0.1", "--target-ess", "0.7"]
        train_config(parser.parse_args(argv)).check(cli=True)
    with pytest.raises(ValueError, match="--skip-ratio: 'lots' is neither a number nor 'auto'"):
        parser.parse_args(["train", "--skip-ratio", "lots"])


def _auto_trainer(out_dir, **overrides):
    """A 6-layer tiny policy (4 skippable layers) with the adaptive skip count."""
    model, tok = tiny_policy(seed=0, num_hidden_layers=6)
    settings = {"steps": 6, "prompts_per_step": 2, "group_size": 4, "max_tokens": 5, "eval_max_tokens": 5,
                "lr": 3e-3, "temperature": 1.0, "skip_ratio": "auto", "target_ess": 0.9, "ess_band": 0.02,
                "protect_first": 1, "protect_last": 1, "save_every": 2}
    cfg = TrainConfig(**{**settings, **overrides})
    return Trainer(model, tok, arithmetic_task(0, num_heldout=4), [token_reward], token_reward, cfg,
                   str(out_dir), "tiny-6", kv_cache_memory=2**24)


def _counts(path):
    steps = [r for r in read_metrics(path) if r["type"] == "train"]
    assert all(r["num_skipped_layers"] == len(r["skipped_layers"]) for r in steps)
    return [r["num_skipped_layers"] for r in steps], [r.get("ess_fraction") for r in steps]


def test_trainer_follows_the_rule_and_resume_reproduces_the_counts(tmp_path, monkeypatch):
    full = _auto_trainer(tmp_path / "full")
    full.train()
    counts, ess = _counts(full.metrics_path)
    assert len(counts) == 6 and counts[0] == 1 and len(set(counts)) > 1  # the tiny model's ESS moves it
    rule = SkipController(0.9, 0.02, 0, 4, start=1)
    assert counts == [rule.count] + [rule.update(e) for e in ess[:-1]]

    killed = _auto_trainer(tmp_path / "killed")
    train_until_killed(killed, monkeypatch, 3)
    resumed = _auto_trainer(tmp_path / "killed")
    resumed.train()
    assert _counts(resumed.metrics_path) == (counts, ess)
    assert resumed.skips.controller.state_dict() == full.skips.controller.state_dict()


def test_min_skip_layers_beyond_the_model_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="min_skip_layers=5: the model has only 4 skippable layers"):
        _auto_trainer(tmp_path / "out", min_skip_layers=5)


def test_cli_run_with_auto_logs_the_counts_and_sums_them_up(tmp_path, capsys, tiny_dir):  # noqa: F811
    out = tmp_path / "out"
    assert cli_main(tiny_train(tiny_dir, out, "--steps", "2", "--skip-ratio", "auto", "--target-ess", "0.8",
                               "--max-skip-layers", "2")) == 0
    assert "(skip auto: " in capsys.readouterr().out
    counts, _ = _counts(str(out / "metrics.jsonl"))
    assert counts[0] == 1 and len(counts) == 2 and all(0 <= c <= 2 for c in counts)
