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
    _bench(benchmark, copy_bandwidth, kernel(paged_attention, "paged_decode_attention", impl), model, batch,
           context, impl=impl)


# (tokens per split, tile, warps, pipeline stages). On an H200 (2026-11-27, at 9881875) every setting ran
# 42.4-61.1 us per call in a graph; the best (1024, 128, 8, 3) was within noise of the default
# (512, 64, 4, 3), and one split of 2048 (no merge launch) was slower: see benchmarks/RESULTS.md.
SWEEP = [
    (512, 64, 4, 3),
    (512, 64, 8, 3),
    (512, 64, 4, 4),
    (512, 128, 8, 3),
    (1024, 64, 4, 3),
    (1024, 64, 8, 4),
    (1024, 128, 8, 3),
    (2048, 64, 4, 3),
    (2048, 64, 8, 4),
    (2048, 128, 8, 3),
    (256, 64, 4, 2),
    (256, 64, 8, 4),
]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a tuning sweep of the Triton kernel's launch parameters")
@pytest.mark.parametrize("partition, block_n, warps, stages", SWEEP)
def test_paged_decode_launch_sweep(benchmark, copy_bandwidth, partition, block_n, warps, stages):
    """The acceptance shape (Qwen2.5-1.5B, batch 64 x context 2048) at fixed launch parameters."""

    def fn(*args):
        return paged_attention._paged_decode_attention_launch(
            *args, partition_size=partition, block_n=block_n, num_warps=warps, num_stages=stages
        )

    _bench(benchmark, copy_bandwidth, fn, "qwen2.5-1.5b", 64, 2048, impl="triton", partition=partition,
           block_n=block_n, warps=warps, stages=stages)


def _bench(benchmark, copy_bandwidth, fn, model, batch, context, **info):
    cfg = MODELS[model]
    h, kvh, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    kv_bytes = 2 * batch * context * kvh * d * ES
    if kv_bytes > (16 << 30 if DEVICE.type == "cuda" else 2 << 30):
        pytest.skip("KV cache larger than this benchmark allows on this device")
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
        **info,
    )
