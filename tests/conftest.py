"""Shared fixtures. Triton runs in its CPU interpreter in tests (no GPU on CI)."""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (fp32) and its tokenizer, loaded once per test session."""
    from nreft_engine.models.loader import load_model

    return load_model("smollm2-135m-instruct", dtype=torch.float32)
