"""The C++ CPU kernels of nreft_engine._C (csrc/cpu_kernels.cpp) == their torch references (kernels/*.py).

Every case runs on each instruction set this CPU supports (the kernels are compiled for AVX-512, AVX2 and
baseline x86-64, chosen at run time), with outputs poisoned with NaN so an unwritten element fails.
"""

import functools
import itertools
import os
import platform
from unittest import mock

import pytest
import torch
from kernel_testing import assert_close_rel, random_block_tables

from nreft_engine import ops
from nreft_engine.kernels import activation, cpu, paged_attention, rms_norm, rope, sampler
from nreft_engine.kernels.activation import silu_and_mul_reference
from nreft_engine.kernels.paged_attention import paged_decode_attention_reference
from nreft_engine.kernels.rms_norm import rms_norm_reference
from nreft_engine.kernels.rope import rope_cos_sin, rope_write_kv_reference
from nreft_engine.kernels.sampler import filter_logits, sample_reference

C = cpu._C
ISAS = ["avx512", "avx2", "base"]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=ISAS)
def isa(request):
    try:
        cpu.set_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    cpu.set_isa("")


def _nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


# ---------------------------------------- paged decode attention ----------------------------------------

CONTEXTS = [1, 15, 17, 100]


def _attn_case(dtype, head_dim, group, page, contexts, kv_heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(contexts)
    num_blocks = sum(-(-c // page) for c in contexts) + 7  # spare blocks never referenced
    k_cache = torch.randn(num_blocks, page, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, page, kv_heads, head_dim, generator=gen).to(dtype)
    tables = random_block_tables(batch, contexts, page, num_blocks, gen, pad_to=-(-max(contexts) // page) + 2)
    q = torch.randn(batch, group * kv_heads, head_dim, generator=gen).to(dtype)
    ctx = torch.tensor(contexts, dtype=torch.int32)
    return q, k_cache, v_cache, tables, ctx, head_dim**-0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "head_dim", [64, 128, 96]
)  # 64/128: the register-blocked kernels; 96: the generic one
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("page", [16, 32])
def test_paged_decode_attention(isa, dtype, head_dim, group, page):
    q, kc, vc, tables, ctx, scale = _attn_case(
        dtype, head_dim, group, page, CONTEXTS, seed=group * page + head_dim
    )
    ref = paged_decode_attention_reference(q, kc, vc, tables, ctx, scale)
    out = C.paged_decode_attention_cpu(q, kc, vc, tables, ctx, scale, out=_nan_like(q.shape, dtype))
    assert_close_rel(out, ref, dtype)
    assert_close_rel(cpu.paged_decode_attention_cpu(q, kc, vc, tables, ctx, scale), ref, dtype)


@pytest.mark.parametrize("head_dim", [64, 128, 32])
def test_paged_decode_attention_large_group_long_context(isa, head_dim):
    """A group of 32 query heads on one kv head, and contexts up to 2000 tokens."""
    q, kc, vc, tables, ctx, scale = _attn_case(
        torch.float32, head_dim, 32, 16, [2000, 3, 513], kv_heads=1, seed=3
    )
    ref = paged_decode_attention_reference(q, kc, vc, tables, ctx, scale)
    out = C.paged_decode_attention_cpu(q, kc, vc, tables, ctx, scale, out=_nan_like(q.shape, q.dtype))
    assert_close_rel(out, ref, torch.float32)


def test_paged_decode_attention_strided_q_and_int64_metadata():
    """q a view into a wider projection output; int64 tables / lengths go through the wrapper."""
    _, kc, vc, tables, ctx, scale = _attn_case(torch.float32, 64, 3, 16, CONTEXTS, seed=11)
    wide = torch.randn(len(CONTEXTS), 6, 3 * 64)
    q = wide[:, :, 64:128]
    assert not q.is_contiguous()
    ref = paged_decode_attention_reference(q.contiguous(), kc, vc, tables, ctx, scale)
    assert_close_rel(C.paged_decode_attention_cpu(q, kc, vc, tables, ctx, scale), ref, torch.float32)
    assert_close_rel(
        cpu.paged_decode_attention_cpu(q, kc, vc, tables.long(), ctx.long(), scale), ref, torch.float32
    )


def test_paged_decode_attention_rejects_bad_tables():
    q, kc, vc, tables, ctx, scale = _attn_case(torch.float32, 64, 1, 16, [20, 5], seed=5)
    bad = tables.clone()
    bad[0, 1] = kc.shape[0]  # a block the cache does not have, inside the sequence's context
    with pytest.raises(ValueError, match="out of range"):
        C.paged_decode_attention_cpu(q, kc, vc, bad, ctx, scale)
    with pytest.raises(ValueError, match="exceeds the block table"):
        C.paged_decode_attention_cpu(
            q, kc, vc, tables, torch.tensor([20, 16 * tables.shape[1] + 1], dtype=torch.int32), scale
        )
    with pytest.raises(ValueError, match="multiple of 16"):
        C.paged_decode_attention_cpu(q[..., :40], kc[..., :40], vc[..., :40], tables, ctx, scale)


def test_paged_decode_attention_falls_back_for_other_head_dims():
    q, kc, vc, tables, ctx, scale = _attn_case(torch.float32, 40, 2, 16, CONTEXTS, seed=9)
    ref = paged_decode_attention_reference(q, kc, vc, tables, ctx, scale)
    assert torch.equal(cpu.paged_decode_attention_cpu(q, kc, vc, tables, ctx, scale), ref)


# ---------------------------------------- residual add + RMSNorm ----------------------------------------


def _check_rms(x, weight, residual, eps=1e-6, out_dtype=None):
    res_ref = residual.clone() if residual is not None else None
    y_ref, _ = rms_norm_reference(x, weight, eps, res_ref)
    out_dtype = out_dtype or y_ref.dtype
    y = C.rms_norm_cpu(x, weight, eps, residual, out=_nan_like(x.shape, out_dtype))
    assert_close_rel(y, y_ref, out_dtype)
    if residual is not None:
        assert torch.equal(residual, res_ref), "the residual sum must round exactly as residual.add_"
    return y_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 1000, 64, 17])  # 1000 and 17: a scalar tail after the vectors
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("weight_dtype", ["same", "float32"])
def test_rms_norm(isa, dtype, hidden, with_residual, weight_dtype):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(9, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(
        dtype if weight_dtype == "same" else torch.float32
    )
    residual = torch.randn(9, hidden, generator=gen).to(dtype) if with_residual else None
    _check_rms(x, weight, residual)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_wrapper_returns_residual_in_place(dtype):
    x = torch.randn(5, 576).to(dtype)
    weight = torch.randn(576).to(dtype)
    residual = torch.randn(5, 576).to(dtype)
    res_ref = residual.clone()
    y_ref, _ = rms_norm_reference(x, weight, 1e-5, res_ref)
    y, r = cpu.rms_norm_cpu(x, weight, 1e-5, residual)
    assert r is residual and torch.equal(residual, res_ref)
    assert_close_rel(y, y_ref, dtype)
    y, r = cpu.rms_norm_cpu(x, weight, 1e-5)
    assert r is x


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_views(isa, dtype):
    """q/k norms over the last dim of [T, heads, D] views: contiguous, strided rows (a slice of a fused
    projection), and a layout whose leading dims share no row stride (transposed), residual included."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(64, generator=gen).to(dtype)
    fused = torch.randn(6, 4, 3 * 64, generator=gen).to(dtype)
    _check_rms(fused[..., :64].contiguous(), weight, None)
    _check_rms(fused[..., 64:128], weight, None)  # rows 192 apart
    x = torch.randn(4, 6, 64, generator=gen).to(dtype).transpose(0, 1)  # [6, 4, 64], no single row stride
    residual = torch.randn(4, 6, 64, generator=gen).to(dtype).transpose(0, 1)
    _check_rms(x, weight, residual)
    _check_rms(
        torch.randn(64, generator=gen).to(dtype), weight, torch.randn(64, generator=gen).to(dtype)
    )  # 1-D


def test_rms_norm_falls_back_for_mixed_dtypes():
    x = torch.randn(3, 32).bfloat16()
    residual = torch.randn(3, 32)  # fp32 residual stream, bf16 x: the reference's promotion rules
    res_ref = residual.clone()
    y_ref, _ = rms_norm_reference(x, torch.ones(32), 1e-6, res_ref)
    y, r = cpu.rms_norm_cpu(x, torch.ones(32), 1e-6, residual)
    assert r is residual and torch.equal(residual, res_ref) and torch.equal(y, y_ref)


# ---------------------------------------- silu(gate) * up ----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1536, 1000, 7])
def test_silu_and_mul(isa, dtype, cols):
    gen = torch.Generator().manual_seed(cols)
    gate = (6 * torch.randn(11, cols, generator=gen)).to(dtype)
    up = torch.randn(11, cols, generator=gen).to(dtype)
    ref = silu_and_mul_reference(gate, up)
    out = C.silu_and_mul_cpu(gate, up, out=_nan_like(gate.shape, dtype))
    assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_strided_halves(isa, dtype):
    """gate and up as the two halves of one fused [T, 2I] projection, with a leading batch dim."""
    fused = torch.randn(2, 5, 2 * 96).to(dtype)
    gate, up = fused[..., :96], fused[..., 96:]
    assert_close_rel(cpu.silu_and_mul_cpu(gate, up), silu_and_mul_reference(gate, up), dtype)


def test_silu_exp_range_and_special_values(isa):
    """The vector exp over its whole range (overflow, subnormal results) and inf / NaN inputs."""
    gate = torch.cat(
        [
            torch.linspace(-110, 110, 4001),
            torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0]),
        ]
    )
    up = torch.ones_like(gate)
    gate, up = gate.repeat(3, 1), up.repeat(3, 1)
    out = C.silu_and_mul_cpu(gate, up)
    torch.testing.assert_close(out, silu_and_mul_reference(gate, up), rtol=4e-7, atol=1e-38, equal_nan=True)
    # against float64 where exp(-x) is finite in fp32 (below, both give -0 where the true value is ~-1e-37)
    finite = gate > -88
    exact = (gate.double() / (1 + torch.exp(-gate.double()))).float()
    torch.testing.assert_close(out[finite], exact[finite], rtol=4e-7, atol=1e-38)


# ---------------------------------------- RoPE + paged-cache write ----------------------------------------


def _rope_case(dtype, head_dim, group, kv_heads=3, tokens=11, page=16, num_blocks=5, max_pos=32768, seed=0):
    """q, k, v as strided views of one fused [T, (H + 2 KVH) * D] projection, positions up to the end of
    the tables, some padding slots (-1), caches poisoned with NaN."""
    gen = torch.Generator().manual_seed(seed)
    heads = group * kv_heads
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split(sizes, dim=1))
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    positions[0] = max_pos - 1
    slots = torch.randperm(num_blocks * page, generator=gen)[:tokens]
    slots[[1, 4]] = -1
    cos, sin = rope_cos_sin(max_pos, head_dim)
    shape = (num_blocks, page, kv_heads, head_dim)
    return q, k, v, positions, cos, sin, _nan_like(shape, dtype), _nan_like(shape, dtype), slots


def _assert_cache_matches(cache, ref, dtype):
    """Exactly the slots the reference wrote are written (the rest stay NaN), with its values."""
    written = ~torch.isnan(ref)
    assert torch.equal(~torch.isnan(cache), written), "written slots differ from the reference's"
    assert_close_rel(cache[written], ref[written], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 80])  # 80: a scalar tail after the vectors of each half
@pytest.mark.parametrize("group", [1, 4])
def test_rope_write_kv(isa, dtype, head_dim, group):
    q, k, v, pos, cos, sin, kc, vc, slots = _rope_case(dtype, head_dim, group, seed=head_dim + group)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref, k_ref = rope_write_kv_reference(q, k, v, pos, cos, sin, kc_ref, vc_ref, slots)
    outs = {"q_out": _nan_like(q.shape, dtype), "k_out": _nan_like(k.shape, dtype)}
    q_rot, k_rot = C.rope_write_kv_cpu(q, k, v, pos, cos, sin, kc, vc, slots, **outs)
    assert_close_rel(q_rot, q_ref, dtype)
    assert_close_rel(k_rot, k_ref, dtype)
    _assert_cache_matches(kc, kc_ref, dtype)
    _assert_cache_matches(vc, vc_ref, dtype)
    assert torch.equal(vc.nan_to_num(), vc_ref.nan_to_num()), "v is copied, not computed"


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("positions", 4096, r"positions\[10\] = 4096 out of range \[0, 4096\)"),
        ("positions", -1, r"positions\[10\] = -1 out of range"),
        ("slots", 80, r"slot_mapping\[10\] = 80 out of range: the cache has 80 slots"),
    ],
)
def test_rope_write_kv_rejects_bad_positions_and_slots(name, value, match):
    """A bad last token fails the call before any token's k / v reaches the cache."""
    q, k, v, pos, cos, sin, kc, vc, slots = _rope_case(torch.float32, 64, 1, max_pos=4096)
    (pos if name == "positions" else slots)[-1] = value
    with pytest.raises(ValueError, match=match):
        cpu.rope_write_kv_cpu(q, k, v, pos, cos, sin, kc, vc, slots)
    assert kc.isnan().all() and vc.isnan().all()


def test_rope_write_kv_wrapper_int32_indices_and_fallback():
    """int32 positions / slots go through the wrapper; caches of another dtype fall back to the reference."""
    q, k, v, pos, cos, sin, kc, vc, slots = _rope_case(torch.float32, 64, 3)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref, k_ref = rope_write_kv_reference(q, k, v, pos, cos, sin, kc_ref, vc_ref, slots)
    q_rot, _ = cpu.rope_write_kv_cpu(q, k, v, pos.int(), cos, sin, kc, vc, slots.int())
    assert_close_rel(q_rot, q_ref, torch.float32)
    _assert_cache_matches(kc, kc_ref, torch.float32)
    kc16, vc16 = kc.bfloat16().fill_(float("nan")), vc.bfloat16().fill_(float("nan"))
    q16, k16 = cpu.rope_write_kv_cpu(q, k, v, pos, cos, sin, kc16, vc16, slots)
    assert torch.equal(q16, q_ref) and torch.equal(k16, k_ref)
    _assert_cache_matches(kc16, kc_ref.bfloat16(), torch.bfloat16)


# ---------------------------------------- sampling ----------------------------------------

LANES = cpu.softmax_lanes()  # of torch's fp32 softmax sums, which top-p's kept tokens can depend on

# every combination of (temperature (0 = greedy), top_k, top_p, min_p), top_k 0 and V meaning "off"
SAMPLE_SETTINGS = list(
    itertools.product([0.0, 0.5, 1.0, 1.3], [0, 1, 5, "V"], [1.0, 0.9, 0.5, 0.01], [0.0, 0.1])
)


@functools.cache
def _sample_case(dtype, vocab):
    """Each setting on three rows of one batch: normal logits, logits rounded to a few values (heavy ties,
    at the maximum too) and logits with -inf entries (masked vocabulary and its padding); the reference's
    tokens and log-probs for random uniforms, 0 and 1 - 2^-24 included."""
    gen = torch.Generator().manual_seed(vocab)
    kinds = 3
    rows = len(SAMPLE_SETTINGS) * kinds
    logits = 3 * torch.randn(rows, vocab, generator=gen)
    logits[1::kinds] = (logits[1::kinds] / 2).round()
    masked = logits[2::kinds]
    drop = torch.rand(masked.shape, generator=gen) < 0.3
    drop[:, -min(24, vocab // 4) :] = True
    drop[:, 0] = False
    masked[drop] = float("-inf")
    logits = logits.to(dtype)
    temperature, top_k, top_p, min_p = (
        torch.tensor([s[i] if s[i] != "V" else vocab for s in SAMPLE_SETTINGS]).repeat_interleave(kinds)
        for i in range(4)
    )
    params = (temperature.float(), top_k.long(), top_p.float(), min_p.float())
    uniform = torch.rand(rows, generator=gen)
    uniform[-6:-3], uniform[-3:] = 0.0, 1.0 - 2**-24
    return logits, params, uniform, sample_reference(logits, *params, uniform)


def _assert_same_samples(out, ref):
    tok, lp = out
    ref_tok, ref_lp = ref
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    bad = (tok != ref_tok).nonzero().flatten().tolist()
    assert not bad, f"rows {bad}: tokens {tok[bad].tolist()}, the reference's {ref_tok[bad].tolist()}"
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1003, 49152, 7])  # 1003, 7: a partial vector at the end of each row
def test_sample(isa, dtype, vocab):
    logits, params, uniform, ref = _sample_case(dtype, vocab)
    _assert_same_samples(C.sample_cpu(logits, *params, uniform, LANES), ref)


def test_sample_top_p_follows_the_references_fp32_softmax_sum(isa):
    """torch sums the sorted row's softmax denominator in fp32 lanes: with 40 leading tokens over 49k at -16,
    its rounding moves the mass before each leading token by up to 3e-5. With top_p just above the reference's
    mass before token i, it keeps token i, which the exact mass would drop."""
    vocab, positions = 49152, torch.tensor([5, 20, 30])
    row = torch.full((vocab,), -16.0)
    row[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:40]] = -0.1 * torch.arange(40.0)
    probs = row.sort(descending=True).values.softmax(-1)
    top_p = torch.nextafter((probs.cumsum(-1) - probs)[positions], torch.tensor(1.0))
    exact = (row.double() - row.max()).exp().sort(descending=True).values
    assert ((exact.cumsum(-1) - exact)[positions] / exact.sum() >= top_p).all()
    batch = 4 * len(positions)
    logits = row.expand(batch, vocab).contiguous()
    params = (torch.ones(batch), torch.zeros(batch, dtype=torch.int64), top_p.repeat(4), torch.zeros(batch))
    kept = filter_logits(logits, *params).isfinite().sum(-1)
    assert torch.equal(kept, (positions + 1).repeat(4))
    uniform = torch.rand(batch, generator=torch.Generator().manual_seed(1))
    ref = sample_reference(logits, *params, uniform)
    _assert_same_samples(C.sample_cpu(logits, *params, uniform, LANES), ref)


def test_sample_wrapper_strided_rows_and_other_dtypes():
    """Rows of a wider tensor; int32 top_k and float64 parameters go through the wrapper."""
    logits, (temperature, top_k, top_p, min_p), uniform, ref = _sample_case(torch.float32, 1003)
    wide = torch.full((logits.shape[0], 1100), float("nan"))
    wide[:, :1003] = logits
    out = cpu.sample_cpu(wide[:, :1003], temperature.double(), top_k.int(), top_p.double(), min_p, uniform)
    _assert_same_samples(out, ref)


@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
def test_sample_rejects_rows_without_finite_maximum(bad):
    logits = torch.randn(3, 40)
    if bad == "all -inf":
        logits[1] = float("-inf")
    else:
        logits[1, 5] = float(bad)
    params = (torch.ones(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), torch.zeros(3), torch.rand(3))
    with pytest.raises(ValueError, match="row 1 has no finite maximum"):
        C.sample_cpu(logits, *params, LANES)


def test_sample_falls_back_to_the_reference_under_autograd():
    logits = torch.randn(2, 50, requires_grad=True)
    params = (torch.ones(2), torch.tensor([0, 5]), torch.tensor([1.0, 0.9]), torch.zeros(2), torch.rand(2))
    _, lp = cpu.sample_cpu(logits, *params)
    lp.sum().backward()
    assert logits.grad is not None


# ---------------------------------------- dispatch ----------------------------------------


@pytest.mark.parametrize(
    "module,name",
    [
        (rms_norm, "rms_norm"),
        (activation, "silu_and_mul"),
        (paged_attention, "paged_decode_attention"),
        (rope, "rope_write_kv"),
        (sampler, "sample"),
    ],
)
def test_ops_dispatch_picks_cpu_kernels(module, name):
    t = torch.zeros(1)
    assert ops.choose_backends(False, True)[name].on(t) is getattr(cpu, f"{name}_cpu")
    assert ops.choose_backends(False, False)[name].on(t) is getattr(module, f"{name}_reference")
    assert ops.choose_backends(True, True)[name].on(t) is getattr(module, f"{name}_triton")
    assert ops.choose_backends(False, True)[name].cuda is getattr(module, f"{name}_triton")


def test_ops_backends_are_chosen_once_from_the_environment():
    x, weight = torch.randn(2, 8), torch.ones(8)
    cpu_kernel = mock.Mock(side_effect=cpu.rms_norm_cpu)
    try:
        with mock.patch.object(cpu, "rms_norm_cpu", cpu_kernel):
            with mock.patch.dict(os.environ, {"NREFT_CPU_KERNELS": "0", "NREFT_FORCE_TRITON": "0"}):
                ops.configure()
            with mock.patch.dict(os.environ, {"NREFT_CPU_KERNELS": "1"}):  # read at configure, not per call
                ops.rms_norm(x, weight, 1e-6)
            assert not cpu_kernel.called
            ops.configure()
            ops.rms_norm(x, weight, 1e-6)
            assert cpu_kernel.called
    finally:
        ops.configure()


def test_isa_selection():
    assert cpu.isa() in ISAS
    with pytest.raises(ValueError, match="unknown isa"):
        cpu.set_isa("sse9")
    cpu.set_isa("base")
    assert cpu.isa() == "base"
    cpu.set_isa("")
    assert cpu.isa() in ISAS


# ---------------------------------------- prepacked linear ----------------------------------------


@pytest.fixture(params=["native", "widened"])
def onednn_bf16(request, monkeypatch):
    """oneDNN's bf16 as this CPU has it, and as a CPU without native bf16 matmuls has it (a float32 copy)."""
    if request.param == "native" and not cpu.onednn_bf16():
        pytest.skip("this CPU's oneDNN has no native bf16 (the widened case covers it)")
    monkeypatch.setattr(cpu, "onednn_bf16", lambda: request.param == "native")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7, 8, 9, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("small_batch_rows", [0, 8])
def test_packed_linear_matches_f_linear(dtype, rows, bias, small_batch_rows, onednn_bf16):
    """Both layouts (the small-batch kernel up to `small_batch_rows`, oneDNN beyond), 90 outputs: a partial
    last block of 16; bf16 through oneDNN's own bf16 where the CPU has it, else through a float32 copy."""
    gen = torch.Generator().manual_seed(rows)
    weight = (torch.randn(90, 64, generator=gen) / 8).to(dtype)
    b = torch.randn(90, generator=gen).to(dtype) if bias else None
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    packed = cpu.pack_linear_weight(weight, small_batch_rows=small_batch_rows)
    assert packed.onednn.is_mkldnn and packed.rows16.shape == (6, 64, 16)
    widened = dtype == torch.bfloat16 and onednn_bf16 == "widened"
    assert packed.onednn.dtype == (torch.float32 if widened else dtype)
    out = ops.linear(x, packed, b)
    ref = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    assert out.dtype == dtype
    assert_close_rel(out, ref.to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 2, 64), (0, 64)])
def test_linear_rows16_matches_f_linear(isa, dtype, shape):
    """The small-batch kernel on every ISA, leading dims kept, rows in groups of 4 and a ragged last block."""
    gen = torch.Generator().manual_seed(len(shape))
    weight = (torch.randn(40, 64, generator=gen) / 8).to(dtype)
    b = torch.randn(40, generator=gen).to(dtype)
    x = torch.randn(shape, generator=gen).to(dtype)
    packed = C.pack_rows16(weight)
    assert torch.equal(packed[2, :, 8:], torch.zeros(64, 8, dtype=dtype))  # rows 40..47 are padding
    out = C.linear_rows16_cpu(x, packed, b, 40)
    ref = torch.nn.functional.linear(x.double(), weight.double(), b.double())
    assert out.shape == shape[:-1] + (40,) and out.dtype == dtype
    assert_close_rel(out, ref.to(dtype), dtype)


@pytest.mark.skipif(platform.system() != "Linux", reason="2 MiB-aligned own mappings are Linux-only")
def test_pack_rows16_puts_large_weights_on_their_own_2mib_aligned_memory():
    """A packed copy of >= 2 MiB is mmapped at a 2 MiB boundary (so it can get huge pages), computes the same
    results, and is unmapped when freed (repeated packing neither leaks nor crashes)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1100, 520, generator=gen) / 16  # 2.2 MiB packed
    x = torch.randn(2, 520, generator=gen)
    ref = torch.nn.functional.linear(x.double(), weight.double())
    for _ in range(20):
        packed = C.pack_rows16(weight)
        assert packed.data_ptr() % (2 << 20) == 0
        assert_close_rel(C.linear_rows16_cpu(x, packed, None, 1100), ref.float(), torch.float32)
        del packed


def test_linear_rows16_of_a_zero_width_weight_is_the_bias():
    packed = C.pack_rows16(torch.empty(4, 0))
    bias = torch.arange(4.0)
    assert torch.equal(C.linear_rows16_cpu(torch.empty(3, 0), packed, bias, 4), bias.expand(3, 4))


def test_linear_rows16_rejects_mismatches():
    packed = C.pack_rows16(torch.randn(40, 64))
    with pytest.raises(ValueError, match="out_features 50"):
        C.linear_rows16_cpu(torch.randn(1, 64), packed, None, 50)
    with pytest.raises(ValueError, match=r"x must be \[..., 64\]"):
        C.linear_rows16_cpu(torch.randn(1, 32), packed, None, 40)
    with pytest.raises(TypeError, match="BFloat16"):
        C.linear_rows16_cpu(torch.randn(1, 64, dtype=torch.bfloat16), packed, None, 40)
    with pytest.raises(ValueError, match=r"bias must be \[40\]"):
        C.linear_rows16_cpu(torch.randn(1, 64), packed, torch.randn(41), 40)
    with pytest.raises(TypeError, match="Half"):
        C.pack_rows16(torch.randn(4, 4, dtype=torch.float16))


def test_pack_linear_weight_rejects_other_dtypes():
    with pytest.raises(ValueError, match="float16"):
        cpu.pack_linear_weight(torch.zeros(4, 4, dtype=torch.float16))


def test_prepare_linear_weight_follows_the_dispatch_switch():
    weight = torch.randn(8, 4)
    assert isinstance(ops.prepare_linear_weight(weight), cpu.PackedLinear)
    try:
        ops.configure(use_cpu_kernels=False)
        assert ops.prepare_linear_weight(weight) is weight
    finally:
        ops.configure()
