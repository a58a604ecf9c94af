"""Speed defaults measured on the machine that runs (nreft_engine/tuning.py, linear.training_prepack)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from nreft_engine import ops, tuning
from nreft_engine.linear import training_prepack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_batch_rows_is_timed_once_per_process(dtype, monkeypatch):
    monkeypatch.delenv(tuning.SMALL_BATCH_ROWS_ENV, raising=False)
    rows = tuning.small_batch_rows(dtype)
    assert rows in (0, *tuning._CANDIDATE_ROWS)
    assert tuning.small_batch_rows(dtype) == rows  # cached: one process, one choice
    assert ops.prepare_linear_weight(torch.randn(32, 16).to(dtype)).small_batch_rows == rows


def test_small_batch_rows_can_be_pinned(monkeypatch):
    monkeypatch.setenv(tuning.SMALL_BATCH_ROWS_ENV, "3")
    assert tuning.small_batch_rows(torch.float32) == 3
    assert ops.prepare_linear_weight(torch.randn(32, 16)).small_batch_rows == 3
    monkeypatch.setenv(tuning.SMALL_BATCH_ROWS_ENV, "four")
    with pytest.raises(ValueError, match="NREFT_SMALL_BATCH_ROWS='four': must be a whole number"):
        tuning.small_batch_rows(torch.float32)


def test_best_time_is_the_fastest_call_after_a_warm_up():
    calls = []
    assert tuning.best_time(lambda: calls.append(1), repeats=4) >= 0
    assert len(calls) == 5


def test_training_prepack_is_timed_on_the_model_and_logged(caplog):
    model = make_tiny_model("llama")
    with caplog.at_level("INFO", logger="nreft_engine.linear"):
        assert training_prepack(model, rows=64, decode_steps=0) is False  # nothing to save
        assert isinstance(training_prepack(model, rows=64, decode_steps=10**6), bool)
    assert caplog.text.count("trainer's engine") == 2 and "re-packing costs" in caplog.text
    ops.configure(use_cpu_kernels=False)
    try:
        assert training_prepack(model, rows=64, decode_steps=10**6) is False  # no packed layout to gain
    finally:
        ops.configure()
    assert training_prepack(model.to(torch.float16), rows=64, decode_steps=10**6) is False
