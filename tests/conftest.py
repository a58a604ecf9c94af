"""Shared fixtures. Triton runs in its CPU interpreter in tests (no GPU on CI).

`NREFT_TEST_DEVICE=cuda` runs the same kernel tests on a GPU instead: no interpreter, and every
`kernels/*_triton` (or `*_launch`) function a test calls gets its CPU inputs copied to the GPU (outputs and
in-place updates copied back), so the tests written on CPU tensors check the compiled kernels.
"""

import os
import sys

TEST_DEVICE = os.environ.get("NREFT_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_testing import run_on_device  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_kernels_on_test_device(monkeypatch):
    if TEST_DEVICE == "cpu":
        yield
        return
    from nreft_engine.kernels import activation, paged_attention, prefill_attention, rms_norm, rope, sampler

    for module in (activation, paged_attention, prefill_attention, rms_norm, rope, sampler):
        for name in dir(module):
            if name.endswith(("_triton", "_launch")):  # public entries and tile-size-taking launchers
                monkeypatch.setattr(module, name, run_on_device(getattr(module, name), TEST_DEVICE))
    yield


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (fp32) and its tokenizer, loaded once per test session."""
    from nreft_engine.models.loader import load_model

    return load_model("smollm2-135m-instruct", dtype=torch.float32)


def pytest_report_header(config):
    """The CPU and the instruction set each layer of code runs here (capped runs show their caps)."""
    from nreft_engine.bench import cpu_name
    from nreft_engine.kernels import cpu

    name = cpu_name()
    bf16 = "native" if cpu.onednn_bf16() else "none (float32 copies)"
    return (f"cpu: {name}; nreft kernels {cpu.isa()}, torch {torch.backends.cpu.get_cpu_capability()}, "
            f"oneDNN bf16 {bf16}")
