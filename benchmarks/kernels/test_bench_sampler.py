"""The sampler hot path: temperature 0.7, top-k 50, top-p 0.9, min-p 0.05 over the full vocabulary."""

import pytest
import torch
from kernel_bench import BATCHES, DEVICE, IMPLS, MODELS, kernel, run_benchmark
from nreft_engine.kernels import sampler


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", list(MODELS))
def test_sample(benchmark, copy_bandwidth, model, batch, impl):
    vocab = MODELS[model]["vocab"]
    fn = kernel(sampler, "sample", impl)

    def make():
        logits = 4 * torch.randn(
            batch, vocab, device=DEVICE
        )  # fp32 logits, as the lm head's output is upcast
        return (
            logits,
            torch.full((batch,), 0.7, device=DEVICE),
            torch.full((batch,), 50, device=DEVICE, dtype=torch.int32),
            torch.full((batch,), 0.9, device=DEVICE),
            torch.full((batch,), 0.05, device=DEVICE),
            torch.rand(batch, device=DEVICE),
        )

    moved = batch * vocab * 4 + batch * 32  # the logits once; parameters and outputs
    run_benchmark(benchmark, copy_bandwidth, fn, make, moved, model=model, batch=batch, impl=impl)
