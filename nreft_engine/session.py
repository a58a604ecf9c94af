"""GenerationSession: the step loop over one cache layout, shared by `Engine.generate` and `AsyncEngine`.

A session runs one LayerPlan: it lays out the KV cache for the plan's active layers and owns a scheduler over
it. Requests (groups of n samples of one prompt) can be added between any two steps and join the running
batch at the next one; an aborted group leaves the batch and frees its blocks at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from nreft_engine.outputs import CompletionOutput, GenerationStats, RequestOutput
from nreft_engine.runner import ModelRunner
from nreft_engine.sampling_params import SamplingParams
from nreft_engine.scheduler import Scheduler
from nreft_engine.sequence import Sequence
from nreft_engine.skip import LayerPlan


def make_group(seq_ids: Iterator[int], index: int, ids: list[int], params: SamplingParams) -> list[Sequence]:
    """The n samples of prompt `index` (its position in a `generate` call: mixed into the seed so that one
    seed gives each prompt its own samples), with ids drawn from `seq_ids`."""
    base = int(torch.randint(0, 2**62, ())) if params.seed is None else params.seed
    group = []
    for sample in range(params.n):
        generator = torch.Generator().manual_seed((base * 1_000_003 + index * 7919 + sample) % 2**63)
        group.append(Sequence(next(seq_ids), sample, ids, params, generator))
    return group


def request_output(
    request_id: int | str, prompt: str | None, group: list[Sequence], skipped: tuple[int, ...],
    detokenize: Callable[[list[int]], str],
) -> RequestOutput:
    """The RequestOutput of a finished (or aborted) group of samples."""
    outputs = [
        CompletionOutput(
            index=seq.sample_index,
            text=seq.text if seq.text is not None else detokenize(seq.output_token_ids),
            token_ids=seq.output_token_ids,
            logprobs=seq.logprobs,
            cumulative_logprob=float(sum(seq.logprobs)),
            finish_reason=seq.finish_reason,
            top_logprobs=seq.top_logprobs or None,
        )
        for seq in group
    ]
    return RequestOutput(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=group[0].token_ids[: group[0].num_prompt_tokens],
        outputs=outputs,
        skipped_layers=skipped,
    )


class GenerationSession:
    """Steps of one LayerPlan over the engine's runner; open it only while holding the engine's lock (the
    runner's cache buffer is laid out for this plan until the next session opens)."""

    def __init__(
        self, runner: ModelRunner, plan: LayerPlan, *, max_num_seqs: int, max_num_batched_tokens: int,
        max_model_len: int, detokenize: Callable[[list[int]], str],
    ):
        self.runner = runner
        self.plan = plan
        self.max_model_len = max_model_len
        self.detokenize = detokenize
        self.cache = runner.prepare(plan)
        self.scheduler = Scheduler(self.cache.num_blocks, self.cache.block_size, max_num_seqs,
                                   max_num_batched_tokens, max_model_len, runner.spec.eos_token_ids)
        self.stats = GenerationStats(
            kv_cache_bytes=self.cache.nbytes, num_blocks=self.cache.num_blocks, skipped_layers=plan.skipped
        )

    def check_fits(self, index: int, ids: list[int], params: SamplingParams) -> None:
        """Fail fast on a request that could never fit in the cache, even alone."""
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        need = -(-longest // self.cache.block_size)
        if need > self.cache.num_blocks:
            raise ValueError(
                f"prompt {index} ({len(ids)} tokens) + max_tokens={params.max_tokens} needs {need} KV blocks "
                f"but the cache holds only {self.cache.num_blocks}; raise kv_cache_memory or lower max_tokens"
            )

    def add(self, index: int, group: list[Sequence]) -> None:
        """Queue a group (the n samples of prompt `index`, checked to fit); it joins at the next step."""
        lead = group[0]
        self.check_fits(index, lead.token_ids, lead.params)
        self.scheduler.add(group)

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop sequences from the batch (they finish as "abort"), freeing their blocks."""
        self.scheduler.abort(seqs)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.runner.has_step_ahead

    def step(self) -> list[Sequence]:
        """Run one model step (call under torch.inference_mode); returns the sequences that finished."""
        start = time.perf_counter()
        batch, out = self.runner.step(self.scheduler, self.plan, self.cache)
        appended, finished = self.scheduler.postprocess(
            batch, out.tokens, out.logprobs, out.top_logprobs, self.detokenize
        )
        elapsed = time.perf_counter() - start
        self.stats.add_step(batch.prefill, batch.num_tokens, appended, elapsed, *out.graph_capture_cost)
        return finished

    def finish(self) -> GenerationStats:
        """The session's statistics, with the scheduler's counters."""
        s = self.scheduler
        self.stats.finish(s.num_preemptions, s.peak_running, s.peak_used_blocks, s.num_used_blocks)
        return self.stats
