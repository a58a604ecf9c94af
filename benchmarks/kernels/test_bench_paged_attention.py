"""Paged decode attention: one query token per sequence over its (non-contiguous) block table."""

import pytest
import torch
from kernel_bench import BATCHES, CONTEXTS, DEVICE, DTYPE, IMPLS, MODELS, kernel, run_benchmark
from nreft_engine.kernels import paged_attention

ES = torch.finfo(DTYPE).bits // 8
PAGE = 16


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", list(MODELS))
def test_paged_decode_attention(benchmark, copy_bandwidth, model, batch, context, impl):
    cfg = MODELS[model]
    h, kvh, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    kv_bytes = 2 * batch * context * kvh * d * ES
    if kv_bytes > (16 << 30 if DEVICE.type == "cuda" else 2 << 30):
        pytest.skip("KV cache larger than this benchmark allows on this device")
    fn = kernel(paged_attention, "paged_decode_attention", impl)
    blocks_per_seq = context // PAGE
    num_blocks = batch * blocks_per_seq

    def make():
        kc = torch.randn(num_blocks, PAGE, kvh, d, device=DEVICE, dtype=DTYPE)
        vc = torch.randn_like(kc)
        tables = torch.randperm(num_blocks, device=DEVICE, dtype=torch.int32).view(batch, blocks_per_seq)
        ctx = torch.full((batch,), context, device=DEVICE, dtype=torch.int32)
        q = torch.randn(batch, h, d, device=DEVICE, dtype=DTYPE)
        return q, kc, vc, tables, ctx, d**-0.5

    moved = kv_bytes + 2 * batch * h * d * ES + batch * blocks_per_seq * 4
    run_benchmark(
        benchmark,
        copy_bandwidth,
        fn,
        make,
        moved,
        flops=4 * batch * h * context * d,
        model=model,
        batch=batch,
        context=context,
        impl=impl,
    )
