"""Helpers shared by the trainer tests (import: `from train_testing import ...`)."""

from __future__ import annotations

import pytest

from nreft_engine.train.loop import Trainer


def train_until_killed(trainer: Trainer, monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Run `trainer.train()` as a process killed when it starts step `step` (0-based) would: a
    KeyboardInterrupt out of that step, after the checkpoints of the steps before it."""
    original = Trainer.train_step

    def dies(self, at):
        if at == step:
            raise KeyboardInterrupt("killed")
        return original(self, at)

    monkeypatch.setattr(Trainer, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(Trainer, "train_step", original)
