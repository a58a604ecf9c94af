"""A run's output folder under stress: a changed config, a second run, damaged files, a kill mid-run."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os

import pytest
from test_train_support import tiny_trainer

from nreft_engine.cli import main as cli_main
from nreft_engine.train import run_dir
from nreft_engine.train.checkpoint import checkpoint_problem
from nreft_engine.train.data import arithmetic_task
from nreft_engine.train.loop import Trainer
from nreft_engine.train.metrics import read_metrics

TIMING_KEYS = {"rollout_tokens_per_s", "train_tokens_per_s", "rollout_s", "train_s"}
TRAIN_STEP = Trainer.train_step


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _steps_run(monkeypatch, dies_at: int | None = None) -> list[int]:
    """Record the steps Trainer.train_step runs from now on; with `dies_at`, that step is killed instead."""
    ran = []

    def spy(self, step):
        if step == dies_at:
            raise KeyboardInterrupt("killed")
        ran.append(step)
        return TRAIN_STEP(self, step)

    monkeypatch.setattr(Trainer, "train_step", spy)
    return ran


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The metrics of tiny runs of 3 and 4 steps that nothing interrupted (checkpoints every 2 steps)."""
    runs = {}
    for steps in (3, 4):
        trainer = tiny_trainer(tmp_path_factory.mktemp(f"full-{steps}"), steps=steps)
        trainer.train()
        runs[steps] = _strip(read_metrics(trainer.metrics_path))
    return runs


def test_killed_mid_write_after_step_2_of_3_resumes_at_its_checkpoint_logging_each_step_once(
    tmp_path, monkeypatch, caplog, uninterrupted
):
    _steps_run(monkeypatch, dies_at=2)
    with pytest.raises(KeyboardInterrupt):
        tiny_trainer(tmp_path, steps=3).train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 3, "rew')  # the kill cut a record short
    ran = _steps_run(monkeypatch)
    with caplog.at_level(logging.WARNING):
        tiny_trainer(tmp_path, steps=3).train()
    assert ran == [2]  # resumed at the checkpoint of step 2
    assert f"unfinished last line 4 of {tmp_path / 'metrics.jsonl'}" in caplog.text
    got = _strip(read_metrics(str(tmp_path / "metrics.jsonl")))
    assert [(r["type"], r["step"]) for r in got] == [("eval", 0), ("train", 1), ("train", 2), ("train", 3),
                                                     ("eval", 3)]
    assert got == uninterrupted[3]


def test_a_bad_line_before_the_last_one_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path} line 2 is not a JSON record"):
        read_metrics(str(path), partial_last=True)


def _snapshot(folder) -> dict:
    """Each file's mtime and bytes, but the lock's (each attempt to lock writes its pid there)."""
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != run_dir.LOCK_FILE}


def test_a_changed_config_is_refused_listing_each_difference(tmp_path):
    tiny_trainer(tmp_path, steps=2).train()
    before = _snapshot(tmp_path)
    other = tiny_trainer(tmp_path, steps=2, lr=1e-3, group_size=2,
                         task=arithmetic_task(0, difficulty=2, num_heldout=8))
    for allow in (False, True):  # none of these may change, allowed or not
        with pytest.raises(ValueError, match="holds a run with another config") as info:
            other.train(allow_config_change=allow)
        message = str(info.value)
        assert "lr: 0.003 -> 0.001" in message and "group_size: 4 -> 2" in message
        assert "problems_sha256: " in message and "steps" not in message
    assert _snapshot(tmp_path) == before


def test_extending_a_run_needs_allow_config_change_and_stretches_its_schedule(tmp_path):
    tiny_trainer(tmp_path, steps=2).train()
    longer = tiny_trainer(tmp_path, steps=4)
    with pytest.raises(ValueError, match=r"other settings \(steps: 2 -> 4\).*--allow-config-change"):
        longer.train()
    records = longer.train(allow_config_change=True)["records"]
    assert [(r["type"], r["step"]) for r in records] == [
        ("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert records[4]["lr"] == pytest.approx(3e-3 * longer._lr_factor(3))  # the cosine over 4 steps
    assert json.loads((tmp_path / "run_config.json").read_text())["steps"] == 4
    with pytest.raises(ValueError, match="steps=3 is below the step of the checkpoint .*step-000004"):
        tiny_trainer(tmp_path, steps=3).train(allow_config_change=True)


def _hold(path: str, conn) -> None:
    with run_dir.hold_run_dir(path):
        conn.send("held")
        conn.recv()


def test_a_second_run_on_the_same_output_dir_fails_at_once(tmp_path, capsys):
    out = str(tmp_path / "run")
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    holder = context.Process(target=_hold, args=(out, theirs))
    holder.start()
    try:
        assert ours.poll(30) and ours.recv() == "held"
        # fails on the lock, before the (unknown) model would fail to load
        assert cli_main(["train", "--output-dir", out, "--model", "no-such-model"]) == 2
        assert capsys.readouterr().err == f"nreft: error: {out} is in use by another run (pid {holder.pid})\n"
    finally:
        ours.send("release")
        holder.join(30)
    fd = run_dir._locked_fd(out)  # free again; and a second open file in this process conflicts with it
    try:
        with pytest.raises(ValueError, match=f"is in use by another run .pid {os.getpid()}."):
            run_dir._locked_fd(out)
    finally:
        os.close(fd)


def _damage(path, how: str) -> None:
    """Truncate `path` to half or flip a bit of its last byte (in a new file: the old one may be mapped)."""
    data = path.read_bytes()
    cut = path.with_name(path.name + ".damaged")
    cut.write_bytes(data[: len(data) // 2] if how == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    os.replace(cut, path)


@pytest.mark.parametrize("name, how", [("model.safetensors", "truncate"), ("trainer.pt", "truncate"),
                                       ("meta.json", "truncate"), ("model.safetensors", "flip a bit")])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(
    tmp_path, monkeypatch, caplog, uninterrupted, name, how
):
    tiny_trainer(tmp_path, steps=4).train()
    damaged = tmp_path / "checkpoints" / "step-000004" / name
    _damage(damaged, how)
    ran = _steps_run(monkeypatch)
    with caplog.at_level(logging.WARNING):
        tiny_trainer(tmp_path, steps=4).train()
    assert ran == [2, 3] and str(damaged) in caplog.text and "falling back" in caplog.text
    assert _strip(read_metrics(str(tmp_path / "metrics.jsonl"))) == uninterrupted[4]
    assert checkpoint_problem(str(damaged.parent)) is None  # written again


def test_every_checkpoint_damaged_is_an_error_naming_each_with_the_metrics_kept(tmp_path):
    tiny_trainer(tmp_path, steps=2, save_every=1).train()
    files = [tmp_path / "checkpoints" / f"step-00000{s}" / "model.safetensors" for s in (1, 2)]
    for file in files:
        _damage(file, "truncate")
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="every checkpoint under .* is damaged") as info:
        tiny_trainer(tmp_path, steps=2, save_every=1).train()
    assert all(str(file) in str(info.value) for file in files)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
