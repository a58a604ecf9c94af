"""Residual add + RMSNorm, SiLU-and-mul, RoPE + paged-cache write: one decode step's worth of tokens."""

import pytest
import torch
from kernel_bench import BATCHES, DEVICE, DTYPE, IMPLS, MODELS, kernel, run_benchmark

from nreft_engine.kernels import activation, rms_norm, rope
from nreft_engine.kernels.rope import rope_cos_sin

ES = torch.finfo(DTYPE).bits // 8


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", list(MODELS))
def test_rms_norm(benchmark, copy_bandwidth, model, batch, impl):
    hidden = MODELS[model]["hidden"]
    fn = kernel(rms_norm, "rms_norm", impl)

    def make():
        x = torch.randn(batch, hidden, device=DEVICE, dtype=DTYPE)
        return x, torch.ones(hidden, device=DEVICE, dtype=DTYPE), 1e-6, torch.randn_like(x)

    moved = (4 * batch * hidden + hidden) * ES  # x, residual in + out, y; weight
    run_benchmark(benchmark, copy_bandwidth, fn, make, moved, model=model, batch=batch, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", list(MODELS))
def test_silu_and_mul(benchmark, copy_bandwidth, model, batch, impl):
    inter = MODELS[model]["inter"]
    fn = kernel(activation, "silu_and_mul", impl)

    def make():
        gate_up = torch.randn(batch, 2 * inter, device=DEVICE, dtype=DTYPE)  # the fused projection's output
        return gate_up[:, :inter], gate_up[:, inter:]

    moved = 3 * batch * inter * ES
    run_benchmark(benchmark, copy_bandwidth, fn, make, moved, model=model, batch=batch, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", list(MODELS))
def test_rope_write_kv(benchmark, copy_bandwidth, model, batch, impl):
    cfg = MODELS[model]
    h, kvh, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    page, max_pos = 16, 8192
    fn = kernel(rope, "rope_write_kv", impl)
    cos, sin = rope_cos_sin(max_pos, d, device=DEVICE)
    num_blocks = batch * max_pos // page // 4

    def make():
        qkv = torch.randn(batch, h + 2 * kvh, d, device=DEVICE, dtype=DTYPE)
        positions = torch.randint(0, max_pos, (batch,), device=DEVICE)
        slots = torch.randperm(num_blocks * page, device=DEVICE)[:batch]
        kc = torch.empty(num_blocks, page, kvh, d, device=DEVICE, dtype=DTYPE)
        return (
            qkv[:, :h],
            qkv[:, h : h + kvh],
            qkv[:, h + kvh :],
            positions,
            cos,
            sin,
            kc,
            torch.empty_like(kc),
            slots,
        )

    moved = (2 * h + 5 * kvh) * batch * d * ES + batch * (d * 4 + 16)
    run_benchmark(benchmark, copy_bandwidth, fn, make, moved, model=model, batch=batch, impl=impl)
