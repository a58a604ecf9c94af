"""The trainer end to end on a tiny model: weight sharing with the engine, kill-and-resume, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_train_support import tiny_trainer as _trainer
from train_testing import train_until_killed

from nreft_engine import Engine, SamplingParams
from nreft_engine.cli import main as cli_main
from nreft_engine.train.data import render_prompts
from nreft_engine.train.logprobs import group_logprobs
from nreft_engine.train.metrics import read_metrics

TIMING_KEYS = {"rollout_tokens_per_s", "train_tokens_per_s", "rollout_s", "train_s"}


@pytest.mark.parametrize("prepack", [False, True])
def test_engine_reads_the_updated_weights(tmp_path, prepack):
    """The trainer's own engine (on the CPU: the model's weights in place, no packed copies), and one with
    packed copies, which must be re-packed after the fused optimizer step."""
    trainer = _trainer(tmp_path, skip_ratio=0.0)
    assert trainer.engine.runner.prepack_weights is False
    if prepack:
        trainer.engine = Engine(trainer.model, trainer.tokenizer, kv_cache_memory=2**24, prepack_weights=True)
    prompt = render_prompts(trainer.tokenizer, trainer.task.heldout[:1])
    params = SamplingParams(n=1, max_tokens=6, ignore_eos=True, seed=7)
    before = trainer.engine.generate(prompt, params)[0].outputs[0]
    record = trainer.update(trainer.rollout(0, trainer.task.train[:2]))
    assert record["grad_norm"] > 0
    # the same completion, scored by the trainer on the new weights, differs from the old behaviour log-probs
    with torch.no_grad():
        rescored = group_logprobs(trainer.model, prompt[0], [before.token_ids], trainer.filter)[0]
    assert (rescored - torch.tensor(before.logprobs)).abs().max() > 1e-3
    after = trainer.engine.generate(prompt, params)[0].outputs[0]  # no sync call: shared storage
    with torch.no_grad():
        trainer_logprobs = group_logprobs(trainer.model, prompt[0], [after.token_ids], trainer.filter)[0]
    assert torch.allclose(torch.tensor(after.logprobs), trainer_logprobs, atol=1e-4)


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    full = _trainer(tmp_path / "full")
    full.train()
    expected = read_metrics(full.metrics_path)

    killed = _trainer(tmp_path / "killed")
    train_until_killed(killed, monkeypatch, 2)
    resumed = _trainer(tmp_path / "killed")  # a fresh process would rebuild everything the same way
    resumed.train()
    got = read_metrics(resumed.metrics_path)

    def strip(records):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert strip(got) == strip(expected)
    assert any(r.get("grad_norm", 0) > 0 for r in got)
    assert os.path.isfile(tmp_path / "killed" / "metrics.png")


def test_checkpoint_from_another_model_is_refused_untouched(tmp_path):
    _trainer(tmp_path, steps=2).train()
    snapshot = {p: os.path.getmtime(p) for p in (tmp_path / "metrics.jsonl", tmp_path / "checkpoints")}
    lines = (tmp_path / "metrics.jsonl").read_text()
    other = _trainer(tmp_path, seed=1, steps=2)
    with pytest.raises(ValueError, match="holds a run with another config .model: 'tiny-0' -> 'tiny-1'."):
        other.train()
    os.remove(tmp_path / "run_config.json")  # a run of an older version: the checkpoint's fingerprint decides
    message = "is from another model .*model: checkpoint 'tiny-0' vs now 'tiny-1'"
    with pytest.raises(ValueError, match=message):
        other.train()
    assert (tmp_path / "metrics.jsonl").read_text() == lines
    assert all(os.path.getmtime(p) == t for p, t in snapshot.items())


def test_reward_of_wrong_length_fails_before_anything_is_written(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.rewards = [lambda prompts, completions, completion_ids, **kw: [1.0]]
    with pytest.raises(ValueError, match="returned 1 values for 8 completions"):
        trainer.train()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--correction", "ips"], "unknown correction 'ips'; valid corrections: none, is, tis"),
    (["--dataset", "gsm8k", "--data-path", "missing/train.jsonl"],
     "dataset file not found: missing/train.jsonl"),
    (["--dataset", "gsm8k"], "needs --data-path"),
    (["--dataset", "svamp", "--data-path", "{no_answer}"], "has no 'Answer' column"),
])
def test_cli_bad_input_is_a_clear_error_with_nothing_written(tmp_path, capsys, argv, message):
    no_answer = tmp_path / "svamp.json"
    no_answer.write_text(json.dumps([{"Body": "b", "Question": "q"}] * 3))
    out = tmp_path / "out"
    argv = [a.format(no_answer=no_answer) for a in argv]
    assert cli_main(["train", "--output-dir", str(out), "--model", "no-such-model", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
