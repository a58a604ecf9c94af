"""AsyncEngine on tiny random models: concurrent callers in one continuous batch, epochs, abort, sleep."""

import asyncio
import threading
import time

import pytest
import torch
from tiny_models import make_tiny_model

from nreft_engine import AsyncEngine, Engine, LayerPlan, SamplingParams, SkipPolicy
from nreft_engine.cache import kv_cache_bytes
from nreft_engine.scheduler import Scheduler
from nreft_engine.sequence import Sequence
from nreft_engine.session import GenerationSession


def _requests(count: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (count,), generator=gen).tolist()
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in lengths]
    params = [
        SamplingParams(n=1 + i % 2, temperature=0.9, max_tokens=4 + i % 13, seed=100 + i, logprobs=1)
        for i in range(count)
    ]
    return prompts, params


def _completions(outputs):
    return [[(c.token_ids, c.logprobs, c.finish_reason, c.top_logprobs) for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def engine():
    model = make_tiny_model("llama", intermediate_size=768)
    return Engine(model, kv_cache_memory=1 << 22, batch_invariant=True)


def test_64_concurrent_requests_equal_one_generate(engine):
    prompts, params = _requests(64)
    skip = LayerPlan(engine.num_layers, (1,))
    expected = engine.generate(prompts, params, skip=skip)
    server = AsyncEngine(engine, skip=skip)

    async def main():
        return await asyncio.gather(
            *(server.generate(p, q, f"r{i}", index=i) for i, (p, q) in enumerate(zip(prompts, params)))
        )

    outputs = asyncio.run(main())
    assert _completions(outputs) == _completions(expected)
    assert [o.request_id for o in outputs] == [f"r{i}" for i in range(64)]
    assert all(o.skipped_layers == (1,) for o in outputs)
    assert server.last_stats.peak_running > 1
    assert server.num_in_flight == 0


def test_a_request_joins_the_running_batch(engine):
    """A short request sent while a long one runs finishes first: it does not wait for the batch to drain."""
    server = AsyncEngine(engine)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def main():
        first = asyncio.ensure_future(server.generate([5, 6, 7], long))
        await asyncio.sleep(0.05)
        second = await server.generate([9, 10], short)
        assert not first.done()
        return await first, second

    first, second = asyncio.run(main())
    assert len(first.outputs[0].token_ids) == 200 and len(second.outputs[0].token_ids) == 2
    assert server.last_stats.peak_running == 2


def test_each_epoch_draws_its_skip_set_and_requests_keep_theirs(engine):
    policy = SkipPolicy(ratio=0.5, protect_first=0, protect_last=0, seed=0)
    server = AsyncEngine(engine, skip=policy)
    plans = {e: policy.plan_for(engine.num_layers, e, 0).skipped for e in (3, 4)}
    assert plans[3] != plans[4]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main():
        assert server.start_epoch(3).skipped == plans[3]
        old = asyncio.ensure_future(server.generate([5, 6, 7], params))
        await asyncio.sleep(0.01)
        server.start_epoch(4)
        new = await server.generate([5, 6, 7], params)
        return await old, new

    old, new = asyncio.run(main())
    assert old.skipped_layers == plans[3] and new.skipped_layers == plans[4]
    for out, skipped in ((old, plans[3]), (new, plans[4])):
        ref = engine.generate([[5, 6, 7]], params, skip=list(skipped))[0]
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert server.set_skip(None).skipped == ()


def test_abort_mid_way_frees_every_block(monkeypatch):
    """Abort half of the requests while they run, under a cache small enough to preempt: they come back
    with what they had sampled and finish_reason "abort", the others finish, and no block stays used."""
    model = make_tiny_model("llama")
    engine = Engine(model, kv_cache_memory=24 * kv_cache_bytes(4, 16, 2, 16, 4))
    step, steps = GenerationSession.step, []

    def slow_step(session):
        steps.append(time.sleep(0.002))
        return step(session)

    monkeypatch.setattr(GenerationSession, "step", slow_step)
    server = AsyncEngine(engine)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=120, ignore_eos=True, seed=1)

    async def main():
        tasks = [asyncio.ensure_future(server.generate([3 + i] * 20, params, f"r{i}")) for i in range(8)]
        while len(steps) < 20:  # well into decoding, far from the 120 tokens
            await asyncio.sleep(0.005)
        assert all(server.abort(f"r{i}") for i in range(0, 8, 2))
        assert not server.abort("unknown")
        return await asyncio.gather(*tasks)

    outputs = asyncio.run(main())
    for i, out in enumerate(outputs):
        reasons = {c.finish_reason for c in out.outputs}
        assert reasons == ({"abort"} if i % 2 == 0 else {"length"}), (i, reasons)
        if i % 2:
            assert all(len(c.token_ids) == 120 for c in out.outputs)
    assert any(0 < len(c.token_ids) < 120 for o in outputs[::2] for c in o.outputs)
    stats = server.last_stats
    assert stats.num_preemptions > 0 and stats.peak_used_blocks > 0 and stats.used_blocks_at_end == 0


def test_scheduler_abort_frees_waiting_running_and_forked_blocks():
    scheduler = Scheduler(64, 4, 16, 64, 256, (2,))
    params = SamplingParams(n=3, max_tokens=8)
    groups = [[Sequence(3 * g + s, s, list(range(3, 3 + 9)), params, torch.Generator()) for s in range(3)]
              for g in range(3)]
    for group in groups:
        scheduler.add(group)
    scheduler.schedule()  # admits (and prefills) what fits
    assert scheduler.num_used_blocks > 0
    scheduler.abort([seq for group in groups for seq in group])
    assert scheduler.num_used_blocks == 0 and not scheduler.has_work()
    assert all(seq.finish_reason == "abort" for group in groups for seq in group)


def test_abort_all_and_cancel_release_requests(engine):
    server = AsyncEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        tasks = [asyncio.ensure_future(server.generate([4, 5], params)) for _ in range(3)]
        await asyncio.sleep(0.02)
        tasks[0].cancel()
        while server.num_in_flight > 2:  # the cancelled request leaves at the next step
            await asyncio.sleep(0.005)
        assert server.abort_all() == 2
        return await asyncio.gather(*tasks[1:])

    outputs = asyncio.run(main())
    assert all(o.outputs[0].finish_reason == "abort" for o in outputs)
    assert server.num_in_flight == 0


def test_bad_requests_fail_alone():
    """Bad input raises in the caller; a request the cache can never hold fails alone, others are served."""
    engine = Engine(make_tiny_model("llama"), kv_cache_memory=8 * kv_cache_bytes(4, 16, 2, 16, 4))
    server = AsyncEngine(engine)
    ok = SamplingParams(temperature=0, max_tokens=8)

    async def main():
        with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
            await server.generate([5, 500], ok)
        with pytest.raises(ValueError, match="300 tokens; the model's context is 256"):
            await server.generate([5] * 300, ok)
        with pytest.raises(ValueError, match="already in flight"):
            await asyncio.gather(server.generate([5], ok, "same"), server.generate([6], ok, "same"))
        too_big = SamplingParams(max_tokens=250)
        results = await asyncio.gather(server.generate([5] * 5, too_big), server.generate([5, 6], ok),
                                       return_exceptions=True)
        return results

    too_big, good = asyncio.run(main())
    assert isinstance(too_big, ValueError) and "KV blocks" in str(too_big)
    assert len(good.outputs[0].token_ids) == 8


def test_sync_generate_from_another_thread_waits_its_turn(engine):
    server = AsyncEngine(engine)
    prompts, params = _requests(8, seed=1)
    expected = engine.generate(prompts, params)
    results = {}
    thread = threading.Thread(target=lambda: results.update(sync=engine.generate(prompts, params)))

    async def main():
        calls = [server.generate(p, q, index=i) for i, (p, q) in enumerate(zip(prompts, params))]
        thread.start()
        return await asyncio.gather(*calls)

    outputs = asyncio.run(main())
    thread.join()
    assert _completions(outputs) == _completions(expected) == _completions(results["sync"])


def test_sleep_releases_the_kv_cache_and_wake_up_restores_it(engine):
    server = AsyncEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=8)
    before = engine.generate([[5, 6]], params)
    reserved = engine.kv_cache_reserved_bytes
    asyncio.run(server.sleep())
    assert engine.kv_cache_reserved_bytes == 0 and engine.runner.kv_buffer.untyped_storage().nbytes() == 0
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.generate([[5, 6]], params)
    with pytest.raises(RuntimeError, match="wake_up"):
        asyncio.run(server.generate([5, 6], params))
    asyncio.run(server.wake_up())
    assert engine.kv_cache_reserved_bytes == reserved
    after = asyncio.run(server.generate([5, 6], params))
    assert after.outputs[0].token_ids == before[0].outputs[0].token_ids
