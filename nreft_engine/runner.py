"""ModelRunner: one step end to end, from a scheduled Batch to its sampled tokens on the host.

It owns what a step runs on: the model's weights (views, or packed copies kept in step), the KV cache
storage, the CUDA graphs of the decode step, and the sampler. A step builds its inputs, replays a graph
or runs the decoder eagerly, samples, and keeps the pending-token count of async scheduling: with it on,
the step after this one is launched, fed this step's tokens on the device, before they reach the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nreft_engine import ops
from nreft_engine.batch import Batch
from nreft_engine.cache import PagedKVCache, resolve_budget
from nreft_engine.decoder import Decoder, PromptChunk, StepInputs
from nreft_engine.graphs import DecodeGraphs
from nreft_engine.models.spec import ModelSpec
from nreft_engine.models.weights import DecoderWeights, rope_tables
from nreft_engine.sampler import SampledStep, Sampler
from nreft_engine.scheduler import Scheduler
from nreft_engine.skip import LayerPlan
from nreft_engine.transfer import to_device


@dataclass
class StepOutput:
    """One step's samples on the host, row i for `batch.seqs[i]`, and the graph captures it paid for."""

    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]
    graph_capture_cost: tuple[int, float] = (0, 0.0)  # graphs captured, seconds it took


class ModelRunner:
    """Runs the steps of `generate` calls over one model, each call with its LayerPlan and cache layout."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ModelSpec,
        *,
        kv_cache_memory: float | int,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        prepack_weights: bool,
        cuda_graphs: bool,
        max_graph_context: int,
        async_scheduling: bool,
        batch_invariant: bool,
    ):
        self.model = model
        self.spec = spec
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.prepack_weights = prepack_weights
        self.cuda_graphs = cuda_graphs
        self.max_graph_context = min(max_graph_context, max_model_len)
        self.async_scheduling = async_scheduling
        self.batch_invariant = batch_invariant  # packs and steps within ops.batch_invariant()
        self.sampler = Sampler(spec.eos_token_ids)
        budget = resolve_budget(kv_cache_memory, self.device)
        self.kv_buffer = torch.empty(budget // param.element_size(), dtype=self.dtype, device=self.device)
        self.decoder: Decoder
        self.graphs: DecodeGraphs | None = None
        self._ahead: tuple[Batch, SampledStep] | None = None
        self.reload_weights()

    def reload_weights(self) -> None:
        """Re-read the model's parameter tensors (needed only when parameters were replaced, not updated)."""
        cos, sin = rope_tables(self.model, self.max_model_len, self.device)
        weights = DecoderWeights.from_model(self.model)
        with ops.batch_invariant(self.batch_invariant):
            self.decoder = Decoder(self.spec, weights, cos, sin, self.prepack_weights)
        if self.cuda_graphs:
            blocks = -(-self.max_graph_context // self.block_size)
            self.graphs = DecodeGraphs(self.decoder, self.max_num_seqs, blocks, self.device)

    def prepare(self, plan: LayerPlan) -> PagedKVCache:
        """Ready a call that runs `plan`: packed weights in step with the parameters, the cache laid out for
        its active layers."""
        self.refresh_packed_weights()
        self._ahead = None
        kv_heads, head_dim = self.spec.num_kv_heads, self.spec.head_dim
        return PagedKVCache(self.kv_buffer, plan.num_active, self.block_size, kv_heads, head_dim)

    def refresh_packed_weights(self, force: bool = False) -> int:
        """Re-pack the weights whose parameters changed in place (all with `force`); returns how many were."""
        with ops.batch_invariant(self.batch_invariant):
            return self.decoder.refresh_packed_weights(force)

    @property
    def has_step_ahead(self) -> bool:
        return self._ahead is not None

    def step(self, scheduler: Scheduler, plan: LayerPlan, cache: PagedKVCache) -> tuple[Batch, StepOutput]:
        """Run the scheduler's next step (or the one launched ahead) and return its samples on the host."""
        captures = self._captures()
        if self._ahead is None:
            batch = scheduler.schedule()
            sampled = self._launch(batch, plan, cache)
        else:
            batch, sampled = self._ahead
        ahead = scheduler.schedule_ahead(batch) if self.async_scheduling else None
        self._ahead = None if ahead is None else (ahead, self._launch(ahead, plan, cache, sampled))
        tokens, logprobs, tops = sampled.to_host()
        for seq in batch.seqs:
            seq.num_pending -= 1
        cost = tuple(now - before for now, before in zip(self._captures(), captures))
        return batch, StepOutput(tokens, logprobs, tops, cost)

    def _captures(self) -> tuple[int, float]:
        return (self.graphs.captures, self.graphs.capture_seconds) if self.graphs else (0, 0.0)

    def _launch(
        self, batch: Batch, plan: LayerPlan, cache: PagedKVCache, previous: SampledStep | None = None
    ) -> SampledStep:
        """Run one step and start sampling from it, without waiting for the device. A step scheduled ahead
        takes its input tokens from `previous`, the step before it, on the device."""
        cache.copy_blocks(batch.copies)
        inputs = self._inputs(batch)
        if batch.previous_rows is not None:
            tokens = previous.tokens
            if len(batch.previous_rows) < tokens.shape[0]:  # sequences that finish by length drop out
                tokens = tokens[to_device(batch.previous_rows, self.device)]
            inputs.input_ids = tokens
        if self.graphs is not None and self.graphs.fits(inputs):
            logits = self.graphs.run(inputs, plan, cache)
        else:
            with ops.batch_invariant(self.batch_invariant):
                logits = self.decoder.forward(inputs, plan, cache)
        if not batch.seqs:  # chunks of prompts that do not end in this step: nothing to sample
            return SampledStep.empty(self.device)
        rows = logits[to_device(batch.sample_rows, logits.device)] if batch.prefill else logits
        sampled = self.sampler(rows, batch.seqs)
        for seq in batch.seqs:
            seq.num_pending += 1
        return sampled

    def _inputs(self, batch: Batch) -> StepInputs:
        """A step's inputs on the device. Positions count the sequence's pending tokens: a step scheduled
        ahead feeds the token its previous step is still sampling (its id is filled in by `_launch`)."""
        device = self.device
        if batch.prefill:
            chunks = [PromptChunk(c.lead.token_ids[c.start:c.end], c.start, c.last) for c in batch.chunks]
            decodes = [(s.token_ids[-1], s.num_scheduled_tokens) for s in batch.decodes]
            tables = batch.chunk_tables, batch.block_tables
            return StepInputs.pack(chunks, decodes, batch.slots, device, *tables)
        seqs = batch.seqs
        lengths = [s.num_scheduled_tokens for s in seqs]
        # one host-to-device copy for the four per-sequence vectors, one for the block tables
        last_tokens = [s.token_ids[-1] for s in seqs]
        packed = to_device([last_tokens, [n - 1 for n in lengths], batch.slots, lengths], device)
        return StepInputs(
            input_ids=packed[0],
            positions=packed[1],
            slot_mapping=packed[2],
            last_token_index=torch.arange(len(seqs), device=device),
            block_tables=to_device(batch.block_tables, device),
            context_lens=packed[3].to(torch.int32),
        )
