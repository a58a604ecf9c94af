"""Long prompts: prefill attention equal to plain softmax attention at any length, chunked prefill equal to a
one-shot prefill and to transformers, steps shared with running decodes, and memory linear in the prompt."""

import json
import os
import subprocess
import sys

import pytest
import torch
from kernel_testing import assert_close_rel
from tiny_models import make_tiny_model

from nreft_engine import Engine, SamplingParams
from nreft_engine.cache import kv_cache_bytes
from nreft_engine.kernels import cpu as cpu_kernels
from nreft_engine.kernels import prefill_attention as mod
from nreft_engine.kernels.sampler import filter_logits
from nreft_engine.scheduler import Scheduler
from nreft_engine.sequence import Sequence

# 1, 17, 1000 and lengths that are not multiples of a 64- or 16-token tile
LENGTHS = [1, 17, 1000, 1001, 83]


def _softmax_attention(q, k, v, scale, first_query):
    """Plain float64 attention of q [n, H, D] (positions first_query..) over k/v [L, KVH, D], causal."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, 1).transpose(0, 1) for x in (k, v))
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) * scale
    pos_q = torch.arange(first_query, first_query + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[1])[None, :] > pos_q, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


def _qkv(length, dtype, heads=6, kv_heads=2, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(length, h, dim, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_equals_softmax_attention(dtype):
    q, k, v = _qkv(sum(LENGTHS), dtype)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    out = mod.prefill_attention_reference(q, k, v, cu, 0.125)
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        expected = _softmax_attention(q[start:end], k[start:end], v[start:end], 0.125, 0).to(dtype)
        assert_close_rel(out[start:end], expected, dtype)


def _paged(k, v, block_size, num_blocks, seed):
    """k/v [L, KVH, D] written into a NaN-poisoned paged cache at a shuffled block table."""
    blocks = -(-k.shape[0] // block_size)
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[:blocks].to(torch.int32)
    caches = []
    for x in (k, v):
        cache = torch.full((num_blocks, block_size, *x.shape[1:]), float("nan"), dtype=x.dtype)
        flat = cache[table.long()].flatten(0, 1)
        flat[: x.shape[0]] = x
        cache[table.long()] = flat.view(blocks, block_size, *x.shape[1:])
        caches.append(cache)
    return (*caches, table)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("by_rows", [False, True])
def test_paged_prefill_attention_equals_softmax_attention(dtype, by_rows):
    """Chunks (the last n queries of sequences of `context` tokens) over the paged cache, stale slots NaN."""
    cases = [(1, 1), (17, 17), (1000, 1000), (1001, 200), (83, 1), (40, 23)]  # (context, chunk queries)
    chunks, tables, expected, k_caches, v_caches = [], [], [], [], []
    for i, (context, n) in enumerate(cases):
        q, k, v = _qkv(context, dtype, seed=i)
        k_cache, v_cache, table = _paged(k, v, block_size=16, num_blocks=80, seed=i)
        chunks.append(q[context - n:])
        expected.append(_softmax_attention(q[context - n:], k, v, 0.125, context - n).to(dtype))
        # one cache for all cases: each case's blocks moved to its own range of it
        tables.append(table + 80 * i)
        k_caches.append(k_cache)
        v_caches.append(v_cache)
    width = max(t.numel() for t in tables)
    block_tables = torch.stack([torch.nn.functional.pad(t, (0, width - t.numel())) for t in tables])
    cu = torch.tensor([0, *torch.tensor([n for _, n in cases]).cumsum(0).tolist()], dtype=torch.int32)
    context_lens = torch.tensor([c for c, _ in cases], dtype=torch.int32)
    caches = torch.cat(k_caches), torch.cat(v_caches)
    args = (torch.cat(chunks), *caches, block_tables, cu, context_lens, 0.125)
    fn = cpu_kernels.paged_prefill_attention_by_rows if by_rows else mod.paged_prefill_attention_reference
    out = fn(*args)
    assert_close_rel(out, torch.cat(expected), dtype)


PROMPTS = [list(range(3, 90)), [5, 9, 17], list(range(100, 60, -1)), [7] * 33]


def _completions(outs):
    return [[(c.token_ids, c.logprobs, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_chunked_prefill_equals_one_shot_and_transformers(family):
    """A budget of 7 tokens a step: prompts prefilled over up to 13 steps, sharing them with decodes."""
    model = make_tiny_model(family)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_tokens=12, seed=4, ignore_eos=True)
    whole = Engine(model, kv_cache_memory=1 << 22).generate(PROMPTS, params)
    engine = Engine(model, kv_cache_memory=1 << 22, max_num_batched_tokens=7)
    chunked = engine.generate(PROMPTS, params)
    assert engine.last_stats.prefill_tokens >= sum(map(len, PROMPTS))
    for a, b, prompt in zip(whole, chunked, PROMPTS):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4, rtol=0)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + cb.token_ids])).logits[0, len(prompt) - 1:-1]
            rows = len(cb.token_ids)
            filtered = filter_logits(logits, torch.full((rows,), 0.8), torch.zeros(rows, dtype=torch.long),
                                     torch.full((rows,), 0.95), torch.zeros(rows))
            hf = filtered.log_softmax(-1).gather(1, torch.tensor(cb.token_ids)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(cb.logprobs), hf, atol=1e-4, rtol=0)


def test_chunked_prefill_is_bit_identical_when_batch_invariant():
    model = make_tiny_model("llama", intermediate_size=768)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=20, seed=3, ignore_eos=True, logprobs=2)
    whole = Engine(model, kv_cache_memory=1 << 22, batch_invariant=True).generate(PROMPTS, params)
    small = Engine(model, kv_cache_memory=1 << 22, batch_invariant=True, max_num_batched_tokens=5)
    assert _completions(small.generate(PROMPTS, params)) == _completions(whole)


def _group(seq_id, prompt, n=1, max_tokens=50):
    params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True)
    return [Sequence(seq_id + i, i, prompt, params, torch.Generator()) for i in range(n)]


def test_a_long_prompt_is_prefilled_in_chunks_beside_running_decodes():
    scheduler = Scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=10,
                          max_model_len=256, eos_token_ids=(2,))
    scheduler.add(_group(0, [5] * 6, n=2))

    def step():
        batch = scheduler.schedule()
        n = len(batch.seqs)
        scheduler.postprocess(batch, [7] * n, [0.0] * n, [None] * n, lambda ids: "")
        return len(batch.decodes), [(c.start, c.end) for c in batch.chunks], n

    assert step() == (0, [(0, 6)], 2)
    scheduler.add(_group(10, list(range(3, 40))))  # 37 tokens: 8 a step beside the 2 decodes
    steps = [step() for _ in range(5)]
    assert steps == [(2, [(0, 8)], 2), (2, [(8, 16)], 2), (2, [(16, 24)], 2), (2, [(24, 32)], 2),
                     (2, [(32, 37)], 3)]
    assert scheduler.schedule().num_tokens == 3  # the three decode together


def test_bad_long_prompts_fail_fast_with_the_numbers():
    model = make_tiny_model("llama")  # a context of 256 tokens
    engine = Engine(model, kv_cache_memory=13 * kv_cache_bytes(4, 16, 2, 16, 4), max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="300 tokens; the model's context is 256"):
        engine.generate([[3] * 10, [3] * 300])
    with pytest.raises(ValueError, match=r"prompt 1 \(200 tokens\) \+ max_tokens=16 needs 14 KV blocks"):
        engine.generate([[3] * 10, [3] * 200], SamplingParams(max_tokens=16))
    out = engine.generate([[3] * 10, [3] * 100], SamplingParams(max_tokens=16, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [16, 16]
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1, got 0"):
        Engine(model, max_num_batched_tokens=0)


_PREFILL_MEMORY = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from tiny_models import make_tiny_model
from nreft_engine import Engine, SamplingParams
torch.set_num_threads(1)
model = make_tiny_model("llama", num_hidden_layers=2, hidden_size=128, num_attention_heads=8,
                        num_key_value_heads=2, intermediate_size=256, max_position_embeddings=8192)
engine = Engine(model, kv_cache_memory=1 << 24, max_num_batched_tokens=int(sys.argv[2]))
engine.runner.kv_buffer.fill_(0)  # the cache's pages touched before the baseline
prompt = torch.randint(3, 128, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
engine.generate([prompt], SamplingParams(max_tokens=2))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": (peak - before) / 1024}))
"""


def test_a_4k_prompt_prefills_in_memory_linear_in_its_length():
    """Peak RSS over the model and the (already resident) KV cache while a 4096-token prompt is prefilled,
    one shot and in 1024-token chunks, under 48 MiB: [T, T] scores for 8 heads would be 512 MiB a layer."""
    here = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for budget in ("4096", "1024"):
        proc = subprocess.run([sys.executable, "-c", _PREFILL_MEMORY, here, budget], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
        assert peak < 48, (budget, peak)
