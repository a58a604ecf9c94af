"""Causal prefill attention over packed variable-length prompts (compute-bound: TFLOP/s reported too)."""

import pytest
import torch
from kernel_bench import DEVICE, DTYPE, FULL, IMPLS, MODELS, kernel, run_benchmark

from nreft_engine.kernels import prefill_attention

ES = torch.finfo(DTYPE).bits // 8
# (prompts, prompt length): one long prompt, or a batch of shorter ones (lengths jittered around it)
SHAPES = [(1, 512), (1, 2048), (64, 512)] + ([(1, 8192), (8, 2048)] if FULL else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prompts,length", SHAPES)
@pytest.mark.parametrize("model", list(MODELS))
def test_prefill_attention(benchmark, copy_bandwidth, model, prompts, length, impl):
    cfg = MODELS[model]
    h, kvh, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    fn = kernel(prefill_attention, "prefill_attention", impl)
    gen = torch.Generator().manual_seed(0)
    lens = (
        [length]
        if prompts == 1
        else torch.randint(length // 2, length * 3 // 2, (prompts,), generator=gen).tolist()
    )
    tokens = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    def make():
        qkv = torch.randn(tokens, h + 2 * kvh, d, device=DEVICE, dtype=DTYPE)
        return qkv[:, :h], qkv[:, h : h + kvh], qkv[:, h + kvh :], cu, d**-0.5

    moved = (2 * h + 2 * kvh) * tokens * d * ES
    flops = sum(2 * n * (n + 1) * h * d for n in lens)  # QK^T and PV over the causal half
    run_benchmark(
        benchmark,
        copy_bandwidth,
        fn,
        make,
        moved,
        flops=flops,
        model=model,
        prompts=prompts,
        tokens=tokens,
        impl=impl,
    )
