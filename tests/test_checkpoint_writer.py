"""Checkpoints written from a thread: the state of the moment of `save`, errors raised at the next wait,
and a run that ends (or is killed) only once the checkpoint in flight is on disk."""

from __future__ import annotations

import os
import threading

import pytest
import safetensors.torch
import torch
from test_train_support import tiny_trainer

from nreft_engine.train import checkpoint_writer
from nreft_engine.train.checkpoint import checkpoint_problem, load_checkpoint
from nreft_engine.train.checkpoint_writer import CheckpointWriter


def _held_writes(monkeypatch) -> threading.Event:
    """Background writes start only once the returned event is set (the trainer has moved on by then)."""
    go, finish = threading.Event(), checkpoint_writer.write_checkpoint

    def held(*args):
        assert go.wait(30)
        return finish(*args)

    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", held)
    return go


def test_a_background_checkpoint_holds_the_state_of_the_moment_of_save(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path / "run", save_every=0)
    trainer.train_step(0)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in trainer.optimizer.state.items()}
    rng = torch.get_rng_state()
    go = _held_writes(monkeypatch)
    writer = CheckpointWriter(background=True)
    writer.save(str(tmp_path / "ckpt"), 1, trainer.model, trainer.optimizer, trainer.lr_scheduler,
                trainer.fingerprint)
    assert not os.path.exists(tmp_path / "ckpt" / "step-000001")  # still in flight
    trainer.train_step(1)  # training goes on: weights, AdamW moments and the RNG all move
    assert any(not torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    go.set()
    writer.wait()
    path = str(tmp_path / "ckpt" / "step-000001")
    assert checkpoint_problem(path) is None
    restored = tiny_trainer(tmp_path / "other", save_every=0)
    assert load_checkpoint(path, restored.model, restored.optimizer, restored.lr_scheduler,
                           restored.fingerprint) == 1
    for k, v in restored.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    saved = [restored.optimizer.state[p]["exp_avg"] for p in restored.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(saved, moments.values()))
    assert torch.equal(torch.get_rng_state(), rng)
    # tied weights are stored once
    assert len(safetensors.torch.load_file(os.path.join(path, "model.safetensors"))) == len(
        {p.data_ptr() for p in trainer.model.state_dict().values()})


def test_a_failed_background_write_is_raised_at_the_next_wait_naming_the_checkpoint(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path / "run", save_every=0)

    def full(*args, **kwargs):
        raise RuntimeError("unexpected pos 768 vs 662")

    monkeypatch.setattr(torch, "save", full)
    writer = CheckpointWriter(background=True)
    root = tmp_path / "ckpt"
    writer.save(str(root), 3, trainer.model, trainer.optimizer, trainer.lr_scheduler, trainer.fingerprint)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*step-000003 .*unexpected pos"):
        writer.wait()
    writer.wait()  # raised once
    assert os.listdir(root) == []  # no partial checkpoint, no temporary folder


def test_a_killed_run_finishes_the_checkpoint_in_flight_and_resumes_from_it(tmp_path, monkeypatch):
    """With background_save, the step after a save is killed while that save's write is still held back:
    the run does not end before the checkpoint is on disk, and the rerun starts right after it."""
    trainer = tiny_trainer(tmp_path, steps=4, background_save=True)
    go = _held_writes(monkeypatch)
    step = trainer.train_step

    def killed(at):
        if at == 2:
            go.set()
            raise KeyboardInterrupt("killed")
        return step(at)

    monkeypatch.setattr(trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert checkpoint_problem(str(tmp_path / "checkpoints" / "step-000002")) is None
    ran = []
    rerun = tiny_trainer(tmp_path, steps=4, background_save=True)
    resumed_step = rerun.train_step
    monkeypatch.setattr(rerun, "train_step", lambda at: ran.append(at) or resumed_step(at))
    rerun.train()
    assert ran == [2, 3]
