"""What the engine guarantees under misuse and load: one `generate` at a time across threads, the memory it
sees, input checked before anything runs, and bit-identical outputs across batches with batch_invariant."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model

from nreft_engine import Engine, LayerPlan, SamplingParams, cache, ops
from nreft_engine.cache import available_memory, kv_cache_bytes, resolve_budget
from nreft_engine.kernels import cpu as cpu_kernels
from nreft_engine.kernels.prefill_attention import prefill_attention_reference
from nreft_engine.linear import default_prepack

CPU = torch.device("cpu")
PROMPTS = [
    [5, 9, 17, 33, 8], [3], list(range(10, 47)), [100, 101, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 9]
]


def _completions(outputs):
    return [(c.token_ids, c.logprobs, c.finish_reason, c.top_logprobs) for o in outputs for c in o.outputs]


# ---------------------------------------------------------------- one generate at a time


def _run_together(engine, calls):
    """Run each (prompts, params) call of `calls` on `engine` in its own thread, all released at once."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def worker(i, prompts, params):
        barrier.wait()
        try:
            results[i] = engine.generate(prompts, params)
        except Exception as error:  # handed to the test thread
            results[i] = error

    threads = [threading.Thread(target=worker, args=(i, *call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a generate call never returned"
    return results


def test_concurrent_generate_calls_each_get_their_own_outputs():
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    params = SamplingParams(n=4, temperature=0, max_tokens=48, ignore_eos=True)
    calls = [([PROMPTS[0]], params), ([PROMPTS[3]], params)]
    expected = [_completions(engine.generate(*call)) for call in calls]
    assert expected[0] != expected[1]
    for _ in range(4):
        got = _run_together(engine, calls)
        assert [_completions(r) for r in got] == expected


class _Tokenizer:
    """Just enough of a tokenizer for stop strings with token-id prompts; `decode` fails while `broken`."""

    broken = False

    def decode(self, ids, skip_special_tokens=True):
        if self.broken:
            raise RuntimeError("tokenizer failed")
        return "".join(chr(97 + i % 26) for i in ids)


def test_a_failing_call_releases_the_engine_and_leaves_it_usable():
    """Bad input (before anything runs) and an error mid-generation both free the engine for the next call,
    from any thread, and leave nothing behind that changes its outputs."""
    tokenizer = _Tokenizer()
    engine = Engine(make_tiny_model("llama"), tokenizer, kv_cache_memory=1 << 22)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=20, seed=4, stop="zzz", ignore_eos=True)
    expected = _completions(engine.generate(PROMPTS[:2], params))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], params)
    tokenizer.broken = True
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        engine.generate(PROMPTS[:2], params)
    tokenizer.broken = False
    got, error = _run_together(engine, [(PROMPTS[:2], params), ([[1, 2, 3.5]], params)])
    assert _completions(got) == expected
    assert isinstance(error, TypeError) and "3.5" in str(error)


# ---------------------------------------------------------------- available memory

GB = 10**9


def _memory_files(tmp_path, monkeypatch, meminfo=None, v2=None, v1=None):
    """Point cache's memory files at `tmp_path`: /proc/meminfo's text, cgroup v2/v1 (limit, usage, stat)."""
    files = {"meminfo": meminfo}
    for version, values in (("v2", v2), ("v1", v1)):
        for name, text in zip(("limit", "usage", "stat"), values or (None, None, None)):
            files[f"{version}_{name}"] = text
    for name, text in files.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    monkeypatch.setattr(cache, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(cache, "CGROUP_MEMORY_FILES", tuple(
        (*(str(tmp_path / f"{v}_{n}") for n in ("limit", "usage", "stat")), key)
        for v, key in (("v2", "inactive_file"), ("v1", "total_inactive_file"))
    ))


def _meminfo(free_kb, available_kb):
    return (f"MemTotal:       24684084 kB\nMemFree:        {free_kb} kB\nMemAvailable:   {available_kb} kB\n"
            "Buffers:           61388 kB\nCached:         20829660 kB\n")


def test_available_memory_counts_the_reclaimable_page_cache(tmp_path, monkeypatch):
    """A big page cache: MemFree 1.9 GB, MemAvailable 22.7 GB. The engine may use 22.7 GB."""
    _memory_files(tmp_path, monkeypatch, meminfo=_meminfo(1_855_469, 22_167_969))
    assert available_memory(CPU) == 22_167_969 * 1024
    assert resolve_budget(0.5, CPU) == 22_167_969 * 512


@pytest.mark.parametrize(
    "v2, v1, expected",
    [
        ((f"{8 * GB}\n", f"{3 * GB}\n", f"anon 1\ninactive_file {GB}\nactive_file 5\n"), None, 6 * GB),
        (("max\n", f"{3 * GB}\n", ""), None, 22_167_969 * 1024),
        (None, (f"{4 * GB}\n", f"{GB}\n", "cache 7\n"), 3 * GB),
        (None, ("9223372036854771712\n", f"{GB}\n", ""), 22_167_969 * 1024),
        ((f"{2 * GB}\n", f"{3 * GB}\n", ""), None, 0),
    ],
    ids=["v2-limit", "v2-max", "v1-limit", "v1-unlimited", "v2-over-limit"],
)
def test_available_memory_is_capped_by_the_cgroup_limit(tmp_path, monkeypatch, v2, v1, expected):
    _memory_files(tmp_path, monkeypatch, meminfo=_meminfo(1_855_469, 22_167_969), v2=v2, v1=v1)
    assert available_memory(CPU) == expected


def test_available_memory_without_proc_meminfo_falls_back_to_sysconf(tmp_path, monkeypatch):
    _memory_files(tmp_path, monkeypatch)
    monkeypatch.setattr(cache.os, "sysconf", {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}.get)
    assert available_memory(CPU) == 4096 * 1000


def test_the_prepack_warning_reports_the_memory_really_available(tmp_path, monkeypatch, caplog):
    """Weights whose two packed copies (24 GB) exceed half of MemAvailable (22.7 GB): the warning names 22.70,
    not MemFree's 1.86."""
    _memory_files(tmp_path, monkeypatch, meminfo=_meminfo(1_855_469, 22_167_969))
    model = torch.nn.Linear(100_000, 30_000, bias=False, device="meta")  # 12 GB of fp32, never allocated
    with caplog.at_level("WARNING"):
        assert default_prepack(model, CPU) is False
    assert "packed copies (24.00 GB)" in caplog.text and "of the 22.70 GB available" in caplog.text


# ---------------------------------------------------------------- input checked before anything runs


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": "abc"}, TypeError, "seed must be an integer, got 'abc'"),
        ({"seed": 1.5}, TypeError, "seed must be an integer, got 1.5"),
        ({"n": True}, TypeError, "n must be an integer, got True"),
        ({"n": 2.0}, TypeError, "n must be an integer, got 2.0"),
        ({"max_tokens": "16"}, TypeError, "max_tokens must be an integer"),
        ({"top_k": 4.5}, TypeError, "top_k must be an integer"),
        ({"temperature": "0.7"}, TypeError, "temperature must be a number"),
        ({"top_p": None}, TypeError, "top_p must be a number"),
        ({"temperature": float("inf")}, ValueError, "temperature must be finite"),
        ({"ignore_eos": 1}, TypeError, "ignore_eos must be True or False"),
        ({"stop": ["\n", 5]}, TypeError, r"stop must be a str or a list of str, got \['\\n', 5\]"),
        ({"stop": 5}, TypeError, "stop"),
        ({"stop": ["a", ""]}, ValueError, "stop strings must be non-empty"),
        ({"stop_token_ids": [-1]}, ValueError, r"stop_token_ids must be token ids >= 0, got \[-1\]"),
        ({"stop_token_ids": [2, 3.0]}, TypeError, "each of stop_token_ids must be an integer, got 3.0"),
        ({"stop_token_ids": 7}, TypeError, "stop_token_ids must be a list"),
        ({"logprobs": -1}, ValueError, "logprobs must be None or an integer >= 0"),
        ({"logprobs": 2.5}, TypeError, "logprobs must be an integer, got 2.5"),
    ],
)
def test_sampling_params_check_types_on_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalize_numbers():
    p = SamplingParams(n=np.int64(2), temperature=1, top_p=np.float32(0.5), stop_token_ids=(np.int32(3),))
    assert (type(p.n), p.n, type(p.temperature), p.top_p, p.stop_token_ids) == (int, 2, float, 0.5, [3])


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("n", 0, ValueError, "n must be an integer >= 1, got 0"),
        ("temperature", -1, ValueError, "temperature must be finite and >= 0"),
        ("seed", "abc", TypeError, "seed must be an integer"),
        ("stop", [5], TypeError, "stop must be a str or a list of str"),
        ("stop_token_ids", [-3], ValueError, "stop_token_ids must be token ids >= 0"),
        ("min_tokens", 17, ValueError, r"min_tokens must be in \[0, max_tokens=16\]"),
        ("max_tokens", 2, ValueError, r"min_tokens must be in \[0, max_tokens=2\], got 4"),
        ("stop_strings", ("x",), AttributeError, "assign stop instead"),
    ],
)
def test_sampling_params_check_every_assignment_and_keep_their_values(field, value, error, match):
    p = SamplingParams(n=3, temperature=0.7, min_tokens=4, stop="\n", seed=1)
    before = vars(p).copy()
    with pytest.raises(error, match=match):
        setattr(p, field, value)
    assert vars(p) == before


def test_sampling_params_keep_stop_strings_derived_from_stop():
    p = SamplingParams(stop="\n")
    p.stop = ["A:", "B:"]
    assert p.stop_strings == ("A:", "B:")
    p.stop = None
    assert p.stop_strings == ()
    p.seed = np.int64(9)
    assert p.seed == 9 and type(p.seed) is int


@pytest.mark.parametrize(
    "kwargs, match",
    [({"logprobs": 10**6}, "logprobs=1000000 exceeds the model's vocabulary of 128 tokens"),
     ({"stop_token_ids": [5, 10**9]},
      r"stop_token_ids \[1000000000\] are outside the model's vocabulary \[0, 128\)")],
)
def test_params_beyond_the_vocabulary_fail_before_anything_runs(kwargs, match):
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    engine.generate([[1, 2]], SamplingParams(max_tokens=2))
    stats = engine.last_stats
    with pytest.raises(ValueError, match=match):
        engine.generate([[1, 2], [3]], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, **kwargs)])
    assert engine.last_stats is stats
    assert engine.generate([[1, 2]], SamplingParams(max_tokens=3, logprobs=128))[0].outputs[0].top_logprobs


@pytest.mark.parametrize(
    "skip, match",
    [("3", "skip must be a SkipPolicy, a LayerPlan, a list of layer ids or None, got '3'"),
     (3, "got 3 \\(int\\)"),
     ([1.7], "each skipped layer id must be an integer, got 1.7"),
     ([1, True], "got True")],
)
def test_skip_rejects_what_is_not_layer_ids(skip, match):
    with pytest.raises(TypeError, match="each skipped layer id must be an integer, got 2.0"):
        LayerPlan(4, (1, 2.0))
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    with pytest.raises(TypeError, match=match):
        engine.generate([[1, 2]], SamplingParams(max_tokens=2), skip=skip)


def test_integer_scalars_of_numpy_and_torch_are_layer_and_token_ids():
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = _completions(engine.generate([PROMPTS[0]], params, skip=[1, 2]))
    for prompt, skip in [
        (np.array(PROMPTS[0]), [np.int64(1), np.int32(2)]),
        (torch.tensor(PROMPTS[0]), torch.tensor([1, 2])),
        ([torch.tensor(t) for t in PROMPTS[0]], (torch.tensor(2), 1)),
    ]:
        assert _completions(engine.generate([prompt], params, skip=skip)) == expected


@pytest.mark.parametrize(
    "prompt, match",
    [([5, 1.9], "prompt 0's token 1 must be an integer, got 1.9 \\(float\\)"),
     ([True, 5], "prompt 0's token 0 must be an integer, got True"),
     (["5"], "got '5' \\(str\\)"),
     (torch.tensor([5.0, 9.0]), "got 5.0 \\(float\\)"),
     (torch.tensor([True, False]), "got True")],
)
def test_token_ids_must_be_integers(prompt, match):
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    with pytest.raises(TypeError, match=match):
        engine.generate([prompt], SamplingParams(max_tokens=2))


# ---------------------------------------------------------------- batch invariance


def test_batch_invariant_ops_give_every_row_the_same_result_in_any_batch():
    """The linear's rows and prefill attention's rows, bit for bit, whatever the batch around them."""
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(200, 768, generator=gen), torch.randn(40, 768, generator=gen)
    with ops.batch_invariant():
        packed = ops.prepare_linear_weight(weight)
    assert packed.onednn is None
    alone = ops.linear(x[5:6], packed)
    for start, rows in [(5, 2), (4, 3), (3, 4), (2, 5), (0, 8), (1, 9), (5, 16), (0, 40)]:
        assert torch.equal(ops.linear(x[start : start + rows], packed)[5 - start], alone[0])
    torch.testing.assert_close(alone, x[5:6] @ weight.T, rtol=1e-5, atol=1e-4)
    lens = [7, 1, 30, 12]
    cu = torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), h, 32, generator=gen) for h in (6, 2, 2))
    with ops.batch_invariant():
        together = ops.prefill_attention(q, k, v, cu, 0.2)
        third = ops.prefill_attention(q[8:38], k[8:38], v[8:38], cu[2:4] - cu[2], 0.2)
    torch.testing.assert_close(together, prefill_attention_reference(q, k, v, cu, 0.2), rtol=1e-5, atol=1e-5)
    assert torch.equal(together[8:38], third)
    # the token at position 9 of the third prompt, decoded over a cache of blocks of 16
    k_cache, v_cache = torch.zeros(3, 16, 2, 32), torch.zeros(3, 16, 2, 32)
    k_cache[2, :10], v_cache[2, :10] = k[8:18], v[8:18]
    tables, ctx = torch.tensor([[2, 0]], dtype=torch.int32), torch.tensor([10], dtype=torch.int32)
    decoded = cpu_kernels.paged_decode_attention_cpu(q[17:18], k_cache, v_cache, tables, ctx, 0.2)
    assert torch.equal(decoded[0], together[17])


def test_batch_invariant_preemption_gives_bit_identical_outputs():
    """A tiny KV budget preempts and recomputes sequences (a prefill of prompt + output, batches of other
    sizes); with batch_invariant every token and log-prob equals the big-budget run's exactly."""
    model = make_tiny_model("llama", intermediate_size=768)  # K = 768: oneDNN rounds unlike the row kernel
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=100, seed=3, ignore_eos=True,
                            logprobs=2)
    big = Engine(model, kv_cache_memory=1 << 22, batch_invariant=True).generate(PROMPTS, params)
    small_engine = Engine(model, kv_cache_memory=12 * kv_cache_bytes(4, 16, 2, 16, 4), batch_invariant=True)
    small = small_engine.generate(PROMPTS, params)
    assert small_engine.last_stats.num_preemptions > 5
    assert _completions(small) == _completions(big)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant_prompt_alone_equals_the_prompt_among_16_others(dtype):
    model = make_tiny_model("qwen3", intermediate_size=768).to(dtype)  # q/k norms, head_dim 32
    engine = Engine(model, kv_cache_memory=1 << 24, batch_invariant=True)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (16,), generator=gen).tolist()
    others = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in lengths]
    params = SamplingParams(n=3, temperature=0.9, top_k=50, max_tokens=64, seed=7, ignore_eos=True,
                            logprobs=2)
    alone = engine.generate([PROMPTS[2]], params)
    among = engine.generate([PROMPTS[2], *others], params)  # first: the same seeds
    assert engine.last_stats.peak_running == 51
    assert _completions(among[:1]) == _completions(alone)


def test_batch_invariant_refuses_what_it_cannot_keep():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="leave prepack_weights at None"):
        Engine(model, kv_cache_memory=1 << 22, batch_invariant=True, prepack_weights=False)
    with pytest.raises(ValueError, match="head_dim that is a multiple of 16, not 8"):
        Engine(make_tiny_model("llama", num_attention_heads=8, num_key_value_heads=4),
               kv_cache_memory=1 << 22, batch_invariant=True)
    with pytest.raises(ValueError, match="runs on the CPU only, not on cuda:0"):
        ops.check_batch_invariant(torch.device("cuda:0"), torch.float32, 64)
    with pytest.raises(ValueError, match="float32 or bfloat16 model, not torch.float16"):
        ops.check_batch_invariant(CPU, torch.float16, 64)
    ops.configure(use_cpu_kernels=False)
    try:
        with pytest.raises(ValueError, match="needs the C\\+\\+ CPU kernels"):
            Engine(model, kv_cache_memory=1 << 22, batch_invariant=True)
    finally:
        ops.configure()
    assert Engine(model, kv_cache_memory=1 << 22, batch_invariant=True).runner.prepack_weights is True


def test_a_kv_budget_beyond_the_memory_available_is_a_clear_error():
    with pytest.raises(ValueError, match=r"kv_cache_memory=1000000000000000 bytes is more than the \d+"):
        Engine(make_tiny_model("llama"), kv_cache_memory=10**15)
