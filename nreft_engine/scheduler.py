"""The continuous-batching scheduler over the block manager: chunked prefill, prompt fork for n samples,
preemption."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace

import torch

from nreft_engine import _C
from nreft_engine.batch import Batch, Chunk
from nreft_engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Moves sequences waiting -> prefilling -> running -> finished over the KV cache's block manager
    (nano-vllm style), with vLLM's chunked prefill: a step feeds every running sequence's next token, then
    prompt tokens up to `max_num_batched_tokens` in all, so a long prompt is prefilled over several steps
    that keep the others decoding."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ):
        self.blocks = _C.BlockManager(num_blocks, block_size)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[list[Sequence]] = deque()
        self.prefilling: list[Chunk] = []  # admitted groups, `end` = their lead's tokens already in the cache
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.peak_running = 0
        self.peak_used_blocks = 0

    @property
    def num_used_blocks(self) -> int:
        return self.blocks.num_used_blocks

    def add(self, group: list[Sequence]) -> None:
        """Queue the n samples of a prompt; the first is prefilled and the others fork its blocks."""
        self.waiting.append(group)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def schedule(self) -> Batch:
        """The next step: a token for each running sequence (preempting the last ones when blocks run
        short), then chunks of the prompts being prefilled and of waiting prompts admitted while they fit."""
        decodes, slots, copies = self._reserve_decodes() if self.running else ([], [], [])
        chunks = self._schedule_chunks(self.max_num_batched_tokens - len(decodes))
        if not chunks and not decodes:
            raise RuntimeError(
                "the KV cache cannot hold even one running sequence; "
                "raise kv_cache_memory or lower max_tokens"
            )
        chunk_slots = [
            slot for c in chunks for slot in self.blocks.slot_mapping(c.lead.seq_id, c.start, c.end).tolist()
        ]
        seqs, rows = self._sampling_rows(chunks, decodes)
        self.running.extend(s for c in chunks if c.last for s in c.group)
        self.peak_running = max(self.peak_running, len(self.running))
        self.peak_used_blocks = max(self.peak_used_blocks, self.blocks.num_used_blocks)
        tables = None
        if any(c.start > 0 for c in chunks):
            tables = self._tables([c.lead for c in chunks], max(len(c.lead) for c in chunks))
        return Batch(
            chunks, decodes, seqs, sample_rows=rows, num_tokens=len(chunk_slots) + len(decodes),
            slots=chunk_slots + slots, block_tables=self._tables(decodes) if decodes else None,
            chunk_tables=tables, copies=copies,
        )

    @staticmethod
    def _sampling_rows(chunks: list[Chunk], decodes: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """The sequences that sample in a step and the logits row of each (see Batch)."""
        seqs, rows = [], []
        ending = [c for c in chunks if c.last]
        for row, chunk in enumerate(ending):
            seqs.extend(chunk.group)
            rows.extend([row] * len(chunk.group))
        seqs.extend(decodes)
        rows.extend(range(len(ending), len(ending) + len(decodes)))
        return seqs, rows

    def _schedule_chunks(self, budget: int) -> list[Chunk]:
        """Up to `budget` prompt tokens: the groups being prefilled first, then waiting groups admitted
        while they fit."""
        chunks, queued = [], list(self.prefilling)
        while budget > 0 and (queued or self.waiting):
            prefilling = queued.pop(0) if queued else self._admit()
            if prefilling is None:
                break
            chunks.append(self._advance(prefilling, budget))
            budget -= chunks[-1].end - chunks[-1].start
        return chunks

    def _admit(self) -> Chunk | None:
        """The first waiting group, moved to `prefilling` with blocks for its whole prompt (its samples
        forking the lead's), if it fits: in max_num_seqs, and in the free blocks with a margin of one
        block per sample when others run. None if it does not fit."""
        group = self.waiting[0]
        lead = group[0]
        need = -(-len(lead) // self.block_size)
        margin = len(group) if (self.running or self.prefilling) else 0
        admitted = len(self.running) + sum(len(c.group) for c in self.prefilling)
        if admitted + len(group) > self.max_num_seqs or self.blocks.num_free_blocks < need + margin:
            return None
        self.waiting.popleft()
        self.blocks.allocate(lead.seq_id, len(lead))
        for follower in group[1:]:
            self.blocks.fork(lead.seq_id, follower.seq_id)
        for seq in group:
            seq.status = SequenceStatus.RUNNING
        self.prefilling.append(Chunk(group, 0, 0))
        return self.prefilling[-1]

    def _advance(self, prefilling: Chunk, budget: int) -> Chunk:
        """The next chunk (at most `budget` tokens) of a group being prefilled; the group leaves
        `prefilling` with the chunk that ends its prompt."""
        start = prefilling.end
        prefilling.end = min(len(prefilling.lead), start + budget)
        if prefilling.last:
            self.prefilling.remove(prefilling)
        return Chunk(prefilling.group, start, prefilling.end)

    def _tables(self, seqs: list[Sequence], tokens: int | None = None) -> torch.Tensor:
        """Block tables of `seqs`, as wide as the longest needs (or as `tokens` tokens need)."""
        if tokens is None:
            tokens = max(s.num_scheduled_tokens for s in seqs)
        return self.blocks.block_tables([s.seq_id for s in seqs], -(-tokens // self.block_size))

    def _reserve_decodes(self) -> tuple[list[Sequence], list[int], list[tuple[int, int]]]:
        """A cache slot for the next token of each running sequence, preempting from the back of the queue
        while blocks run short: (the sequences kept, their slots, the copy-on-write block copies)."""
        scheduled: list[Sequence] = []
        slots: list[int] = []
        copies: list[tuple[int, int]] = []
        queue = deque(self.running)
        # a step takes at most one new block per sequence (a new page or a copy-on-write), so with that many
        # free nobody can be short and the per-sequence check is skipped
        enough = self.blocks.num_free_blocks >= len(queue)
        while queue:
            seq = queue.popleft()
            while not enough and not self.blocks.can_append(seq.seq_id):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                slot, seq_copies = self.blocks.append_slot(seq.seq_id)
                slots.append(slot)
                copies.extend(seq_copies)
                scheduled.append(seq)
        self.running = list(scheduled)
        return scheduled, slots, copies

    def schedule_ahead(self, batch: Batch) -> Batch | None:
        """The decode step after `batch`, scheduled before its samples reach the host (async scheduling):
        every sequence of `batch` that cannot finish by length on its pending token, fed that token from
        the device. None when it could change what the synchronous scheduler does next: a prompt is
        waiting or being prefilled, or a sequence could run short of blocks. A sequence that then samples
        a stop token has its ahead row computed and discarded."""
        if (
            self.waiting
            or self.prefilling
            or batch.prefill
            or self.blocks.num_free_blocks < len(batch.seqs)
        ):
            return None
        rows = [
            i
            for i, seq in enumerate(batch.seqs)
            if seq.status is SequenceStatus.RUNNING
            and seq.num_scheduled_output_tokens < seq.params.max_tokens
            and seq.num_scheduled_tokens < self.max_model_len
        ]
        if not rows:
            return None
        seqs = [batch.seqs[i] for i in rows]
        slots, copies = [], []
        for seq in seqs:
            slot, seq_copies = self.blocks.append_slot(seq.seq_id)
            slots.append(slot)
            copies.extend(seq_copies)
        self.peak_used_blocks = max(self.peak_used_blocks, self.blocks.num_used_blocks)
        return Batch(
            [], seqs, seqs, sample_rows=list(range(len(seqs))), num_tokens=len(seqs), slots=slots,
            block_tables=self._tables(seqs), copies=copies, previous_rows=rows,
        )

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks and requeue it first; it is recomputed from its tokens later."""
        self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft([seq])
        self.num_preemptions += 1

    def postprocess(
        self,
        batch: Batch,
        tokens: list[int],
        logprobs: list[float],
        tops: list[dict[int, float] | None],
        detokenize: Callable[[list[int]], str],
    ) -> tuple[int, list[Sequence]]:
        """Append each sampled token, finish sequences that stop, free their blocks; return how many tokens
        were appended and the sequences that finished. Rows of sequences that finished while this step
        was in flight (it was scheduled ahead) are discarded."""
        finished = []
        appended = 0
        for seq, token, logprob, top in zip(batch.seqs, tokens, logprobs, tops):
            if seq.status is SequenceStatus.FINISHED:
                continue
            appended += 1
            seq.append(token, logprob, top)
            reason = self._finish_reason(seq, token, detokenize)
            if reason is not None:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = reason
                self.blocks.free(seq.seq_id)
                self.running.remove(seq)
                finished.append(seq)
        return appended, finished

    def _finish_reason(self, seq: Sequence, token: int, detokenize: Callable[[list[int]], str]) -> str | None:
        p = seq.params
        num_out = seq.num_output_tokens
        if num_out >= p.min_tokens:
            if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
                return "stop"
            if p.stop_strings:
                text = detokenize(seq.output_token_ids)
                cut = min((i for i in (text.find(s) for s in p.stop_strings) if i >= 0), default=-1)
                if cut >= 0:
                    seq.text = text[:cut]
                    return "stop"
        if num_out >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop unfinished `seqs` wherever they are, freeing their blocks; they finish as "abort"."""
        drop = {seq.seq_id for seq in seqs if seq.status is not SequenceStatus.FINISHED}
        for seq in (seq for seq in seqs if seq.seq_id in drop):
            if self.blocks.has_sequence(seq.seq_id):
                self.blocks.free(seq.seq_id)
            seq.finish("abort")
        self.running = [seq for seq in self.running if seq.seq_id not in drop]
        waiting = ([seq for seq in group if seq.seq_id not in drop] for group in self.waiting)
        self.waiting = deque(group for group in waiting if group)
        kept = (replace(c, group=[seq for seq in c.group if seq.seq_id not in drop]) for c in self.prefilling)
        self.prefilling = [c for c in kept if c.group]
