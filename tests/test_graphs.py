"""Decode-step CUDA graphs (nreft_engine/graphs.py): bucketing, static buffers and keys, checked on the CPU.

Capturing needs a GPU; here `_record` returns the step itself, so a "replay" runs the very forward a graph
would hold, on the same padded static buffers. That checks everything but the capture: padding rows write
no KV and change no output, buckets and keys follow the batch and the skip set, long contexts go eager.
The capture's own calls are checked against a stand-in for torch.cuda's graph API.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import make_tiny_model

from nreft_engine import Engine, SamplingParams
from nreft_engine.graphs import DecodeGraphs, batch_buckets

PROMPTS = [[5, 9, 17, 33, 8], [3], list(range(10, 47)), [100, 101, 7, 7, 7, 7, 7, 7, 9]]


class EagerReplayGraphs(DecodeGraphs):
    """DecodeGraphs whose 'graph' is the captured step run again, for machines without CUDA."""

    def _record(self, step, warm_up):
        self.__dict__.setdefault("warm_ups", []).append(warm_up)
        return step


def with_graphs(engine: Engine, max_graph_context: int, **kwargs) -> EagerReplayGraphs:
    runner = engine.runner
    blocks = -(-max_graph_context // runner.block_size)
    runner.graphs = EagerReplayGraphs(runner.decoder, runner.max_num_seqs, blocks, runner.device, **kwargs)
    return runner.graphs


def _generate(engine: Engine, skip) -> list[tuple[list[int], list[float]]]:
    # different max_tokens per prompt: sequences finish at different steps, so the batch shrinks
    params = [
        SamplingParams(n=3, temperature=1.0, max_tokens=m, ignore_eos=True, seed=i)
        for i, m in enumerate((9, 4, 13, 6))
    ]
    outputs = engine.generate(PROMPTS, params, skip=skip)
    return [(c.token_ids, c.logprobs) for out in outputs for c in out.outputs]


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("family, async_scheduling", [("llama", False), ("qwen3", False), ("llama", True)])
def test_replayed_steps_equal_eager_steps(family, async_scheduling):
    """With async scheduling (the CUDA default) a replay also takes its input tokens from the device."""
    model = make_tiny_model(family)
    eager = Engine(model, kv_cache_memory=1 << 22)
    graphed = Engine(model, kv_cache_memory=1 << 22, async_scheduling=async_scheduling)
    graphs = with_graphs(graphed, max_graph_context=256)
    for skip in (None, [1], [1, 2], None):
        assert _generate(graphed, skip) == _generate(eager, skip)
    assert graphs.captures > 0
    assert graphed.last_stats.graph_captures == 0  # the last call's plan (no skip) was captured by the first


def test_one_capture_per_bucket_and_plan():
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    graphs = with_graphs(engine, max_graph_context=256)
    params = SamplingParams(n=5, temperature=1.0, max_tokens=4, ignore_eos=True, seed=0)
    engine.generate([PROMPTS[0]], params)  # 5 decode rows: bucket 8, three decode steps
    assert (graphs.captures, engine.last_stats.graph_captures) == (1, 1)
    engine.generate([PROMPTS[0]], params, skip=[2])
    engine.generate([PROMPTS[0]], params, skip=[2])
    assert graphs.captures == 2
    assert engine.last_stats.graph_captures == 0 and engine.last_stats.graph_capture_seconds == 0


def test_only_a_new_bucket_or_cache_layout_runs_the_step_eagerly_before_capture():
    """Kernels compile on the eager run; a new skip set of the same size reuses them and the cache layout."""
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    graphs = with_graphs(engine, max_graph_context=256)
    for prompts, skip in (([PROMPTS[1]], None), ([PROMPTS[1]], [2]), ([PROMPTS[1]], [1]), (PROMPTS[:2], [1])):
        engine.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True), skip=skip)
    # no skip; one layer fewer (a smaller cache); another layer of the same count; a new bucket
    assert graphs.warm_ups == [True, True, False, True]


def test_padding_rows_never_write_the_cache():
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    graphs = with_graphs(engine, max_graph_context=256)
    engine.generate([PROMPTS[0]], SamplingParams(n=3, max_tokens=3, ignore_eos=True, seed=0))
    assert torch.equal(graphs.slot_mapping[3:], torch.full_like(graphs.slot_mapping[3:], -1))
    assert torch.equal(graphs.context_lens[3:], torch.ones_like(graphs.context_lens[3:]))


def test_long_contexts_run_eagerly_and_agree():
    model = make_tiny_model("llama")
    eager = Engine(model, kv_cache_memory=1 << 22)
    graphed = Engine(model, kv_cache_memory=1 << 22)
    graphs = with_graphs(graphed, max_graph_context=48)  # the 37-token prompt outgrows 48 tokens at its 12th
    verdicts = []
    fits = graphs.fits
    graphs.fits = lambda inputs: verdicts.append(fits(inputs)) or verdicts[-1]
    assert _generate(graphed, None) == _generate(eager, None)
    assert True in verdicts and False in verdicts


def test_least_recently_used_graphs_are_evicted():
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    graphs = with_graphs(engine, max_graph_context=256, max_graphs=2)
    for skip in (None, [1], [2], None):
        engine.generate([PROMPTS[1]], SamplingParams(max_tokens=3, ignore_eos=True), skip=skip)
    assert len(graphs._graphs) == 2
    assert graphs.captures == 4  # the first plan was evicted before it came back


def test_cpu_engines_do_not_capture():
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=1 << 22)
    assert engine.runner.graphs is None and not engine.runner.cuda_graphs


def test_record_captures_on_a_side_stream_into_one_shared_pool(monkeypatch):
    """`_record`'s CUDA calls, against a stand-in torch.cuda: warm-up, capture, shared pool, replay,
    errors."""
    calls = []

    class Graph:
        made = 0

        def __init__(self):
            Graph.made += 1
            self.id = Graph.made

        def capture_begin(self, pool):
            calls.append(("begin", pool))

        def capture_end(self):
            calls.append("end")

        def pool(self):
            return f"pool of graph {self.id}"

        def replay(self):
            calls.append(("replay", self.id))

    @contextlib.contextmanager
    def stream(side_stream):
        calls.append(("on", side_stream))
        try:
            yield
        finally:
            calls.append("off")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: "side stream")
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    graphs = DecodeGraphs(decoder=None, max_batch=4, max_blocks_per_seq=2, device=torch.device("cpu"))
    logits = torch.ones(2)

    def step():
        calls.append("step")
        return logits

    first = graphs._record(step, warm_up=True)
    second = graphs._record(step, warm_up=False)
    assert calls == [
        *("step", "sync", ("on", "side stream"), ("begin", None), "step", "end", "off"),
        *("sync", ("on", "side stream"), ("begin", "pool of graph 1"), "step", "end", "off"),
    ]
    calls.clear()
    assert second() is logits and first() is logits and calls == [("replay", 2), ("replay", 1)]

    def failing_step():
        raise RuntimeError("kernel launch failed")

    calls.clear()
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        graphs._record(failing_step, warm_up=False)
    assert calls[-3:] == [("begin", "pool of graph 2"), "end", "off"]  # ended: the stream is usable again
