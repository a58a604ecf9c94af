"""CUDA graphs of the decode step, one per (batch-size bucket, LayerPlan).

A small model's decode step is hundreds of short kernel launches; a graph replays them as one. The graph
reads its inputs from static buffers: a batch is padded up to the nearest bucket, with padding rows that
write no KV (slot -1) and attend to one token. A graph bakes in the active layers and the cache layout,
so each new skip set is captured anew: `captures` and `capture_seconds` count that cost. To keep it small,
only the first capture per (bucket, cache layout) runs the step eagerly first (to compile its kernels), and
captures keep the allocator's caches, which `torch.cuda.graph` empties every time.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from nreft_engine.cache import PagedKVCache
from nreft_engine.decoder import Decoder, StepInputs
from nreft_engine.skip import LayerPlan

logger = logging.getLogger(__name__)

PADDING = (0, 0, -1, 1)  # a padding row: token 0 at position 0, writes no KV (slot -1), attends to 1 token


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to `max_batch` (always included): at most 15 padding rows."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


class DecodeGraphs:
    """Captured decode steps, keyed by (bucket, active layers, cache layout); least recently used evicted."""

    def __init__(
        self,
        decoder: Decoder,
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
        max_graphs: int = 64,
    ):
        self.decoder = decoder
        self.buckets = batch_buckets(max_batch)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_graphs = max_graphs
        # the per-row inputs live in one buffer, so padding rows are set by one copy of PADDING's columns
        self.padding = torch.tensor(PADDING, device=device)[:, None].expand(-1, max_batch).contiguous()
        self.row_inputs = self.padding.clone()
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = self.row_inputs.unbind(0)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.last_token_index = torch.arange(max_batch, device=device)
        self._graphs: OrderedDict[tuple, Callable[[], torch.Tensor]] = OrderedDict()
        self._warm_layouts: set[tuple] = set()  # (bucket, cache layout) whose step has run eagerly
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self.captures = 0
        self.capture_seconds = 0.0

    def fits(self, inputs: StepInputs) -> bool:
        """True for a decode step this object can replay (batch and context within the captured sizes)."""
        return (
            not inputs.prefill
            and inputs.input_ids.shape[0] <= self.buckets[-1]
            and inputs.block_tables.shape[1] <= self.max_blocks_per_seq
        )

    def run(self, inputs: StepInputs, plan: LayerPlan, cache: PagedKVCache) -> torch.Tensor:
        """Logits [batch, vocab] of a decode step, by replaying (capturing first if needed) its graph."""
        batch = inputs.input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= batch)
        self._load(inputs, batch, bucket)
        layout = (bucket, cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape))
        key = (plan.active_layers, *layout)
        replay = self._graphs.get(key)
        if replay is None:
            replay = self._capture(bucket, plan, cache, warm_up=layout not in self._warm_layouts)
            self._warm_layouts.add(layout)
            self._graphs[key] = replay
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return replay()[:batch]

    def _load(self, inputs: StepInputs, batch: int, bucket: int) -> None:
        """Copy a step's inputs into the static buffers; rows batch..bucket become padding."""
        width = inputs.block_tables.shape[1]
        self.input_ids[:batch].copy_(inputs.input_ids)
        self.positions[:batch].copy_(inputs.positions)
        self.slot_mapping[:batch].copy_(inputs.slot_mapping)
        self.context_lens[:batch].copy_(inputs.context_lens)
        self.row_inputs[:, batch:bucket].copy_(self.padding[:, batch:bucket])
        self.block_tables[:batch, :width].copy_(inputs.block_tables)
        self.block_tables[:batch, width:].zero_()
        self.block_tables[batch:bucket].zero_()

    def _static_inputs(self, bucket: int) -> StepInputs:
        return StepInputs(
            input_ids=self.input_ids[:bucket],
            positions=self.positions[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            last_token_index=self.last_token_index[:bucket],
            block_tables=self.block_tables[:bucket],
            context_lens=self.context_lens[:bucket].to(torch.int32),  # inside the graph: one small kernel
        )

    def _capture(
        self, bucket: int, plan: LayerPlan, cache: PagedKVCache, warm_up: bool
    ) -> Callable[[], torch.Tensor]:
        start = time.perf_counter()
        replay = self._record(lambda: self.decoder.forward(self._static_inputs(bucket), plan, cache), warm_up)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - start
        logger.debug("captured decode graph: batch %d, %d active layers", bucket, plan.num_active)
        return replay

    def _record(self, step: Callable[[], torch.Tensor], warm_up: bool) -> Callable[[], torch.Tensor]:
        """Capture `step` into a CUDA graph and return its replay; `warm_up` first runs it eagerly.

        The eager run compiles the step's kernels and sets up cuBLAS, which must not happen inside a capture;
        other layers of the same shapes need neither. Unlike `torch.cuda.graph`, this does not empty the
        device and pinned-host caches first: a capture per new skip set would free the staging buffers the
        next steps need and make them allocate again.
        """
        if warm_up:
            step()
        torch.cuda.synchronize()
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self._stream):
            graph.capture_begin(self._pool)
            try:
                logits = step()
            finally:
                graph.capture_end()
        self._pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay
