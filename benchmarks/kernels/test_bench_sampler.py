"""The sampler hot path over the full vocabulary: filtered (temperature 0.7, top-k 50, top-p 0.9, min-p 0.05)
and plain (temperature 1 alone, how RL rollouts sample)."""

import pytest
import torch
from kernel_bench import BATCHES, DEVICE, IMPLS, MODELS, kernel, run_benchmark

from nreft_engine.kernels import sampler

FILTERS = {"filtered": (0.7, 50, 0.9, 0.05), "plain": (1.0, 0, 1.0, 0.0)}  # temperature, top-k, top-p, min-p


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("filters", list(FILTERS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", list(MODELS))
def test_sample(benchmark, copy_bandwidth, model, batch, filters, impl):
    vocab = MODELS[model]["vocab"]
    fn = kernel(sampler, "sample", impl)
    temperature, top_k, top_p, min_p = FILTERS[filters]

    def make():
        logits = 4 * torch.randn(
            batch, vocab, device=DEVICE
        )  # fp32 logits, as the lm head's output is upcast
        return (
            logits,
            torch.full((batch,), temperature, device=DEVICE),
            torch.full((batch,), top_k, device=DEVICE, dtype=torch.int64),
            torch.full((batch,), top_p, device=DEVICE),
            torch.full((batch,), min_p, device=DEVICE),
            torch.rand(batch, device=DEVICE),
        )

    moved = batch * vocab * 4 + batch * 32  # the logits once; parameters and outputs
    run_benchmark(
        benchmark, copy_bandwidth, fn, make, moved, model=model, batch=batch, filters=filters, impl=impl
    )
