"""The continuous-batching scheduler over the block manager: prompt fork for n samples, preemption."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nreft_engine import _C
from nreft_engine.sequence import Sequence, SequenceStatus


@dataclass
class Batch:
    """One model step: a prefill of whole prompts, or a one-token decode of running sequences.

    `leads` are the sequences whose tokens are fed: in a prefill one per prompt, whose n samples share its
    blocks and all sample from the row of its last token. `seqs[i]` samples from logits row `sample_rows[i]`.
    `slots` holds the cache slot of each fed token; a decode also carries its block tables. A step scheduled
    ahead takes its input tokens from rows `previous_rows` of the previous step's samples, on the device.
    """

    prefill: bool
    leads: list[Sequence]
    seqs: list[Sequence]
    sample_rows: list[int]
    num_tokens: int
    slots: list[int]
    block_tables: torch.Tensor | None = None
    copies: list[tuple[int, int]] = field(default_factory=list)
    previous_rows: list[int] | None = None


class Scheduler:
    """Moves sequences waiting -> running -> finished over the KV cache's block manager (nano-vllm style)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_prefill_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ):
        self.blocks = _C.BlockManager(num_blocks, block_size)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[list[Sequence]] = deque()
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
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        """Admit waiting prompts if they fit (prefill step), else decode every running sequence."""
        leads: list[Sequence] = []
        seqs: list[Sequence] = []
        rows: list[int] = []
        slots: list[int] = []
        tokens = 0
        while self.waiting:
            group = self.waiting[0]
            lead = group[0]
            need = -(-len(lead) // self.block_size)
            margin = len(group) if (self.running or leads) else 0
            if (
                len(self.running) + len(seqs) + len(group) > self.max_num_seqs
                or (leads and tokens + len(lead) > self.max_prefill_tokens)
                or self.blocks.num_free_blocks < need + margin
            ):
                break
            self.waiting.popleft()
            self.blocks.allocate(lead.seq_id, len(lead))
            slots.extend(self.blocks.slot_mapping(lead.seq_id, 0, len(lead)).tolist())
            for follower in group[1:]:
                self.blocks.fork(lead.seq_id, follower.seq_id)
            for seq in group:
                seq.status = SequenceStatus.RUNNING
                rows.append(len(leads))
            leads.append(lead)
            seqs.extend(group)
            tokens += len(lead)
        if leads:
            self.running.extend(seqs)
            self.peak_running = max(self.peak_running, len(self.running))
            self.peak_used_blocks = max(self.peak_used_blocks, self.blocks.num_used_blocks)
            return Batch(True, leads, seqs, sample_rows=rows, num_tokens=tokens, slots=slots)
        return self._schedule_decode()

    def _schedule_decode(self) -> Batch:
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
        if not scheduled:
            raise RuntimeError(
                "the KV cache cannot hold even one running sequence; "
                "raise kv_cache_memory or lower max_tokens"
            )
        self.running = list(scheduled)
        return self._decode_batch(scheduled, slots, copies)

    def schedule_ahead(self, batch: Batch) -> Batch | None:
        """The decode step after `batch`, scheduled before its samples reach the host (async scheduling):
        every sequence of `batch` that cannot finish by length on its pending token, fed that token from
        the device. None when it could change what the synchronous scheduler does next: a prompt is
        waiting, or a sequence could run short of blocks. A sequence that then samples a stop token
        has its ahead row computed and discarded."""
        if self.waiting or batch.prefill or self.blocks.num_free_blocks < len(batch.seqs):
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
        return self._decode_batch(seqs, slots, copies, previous_rows=rows)

    def _decode_batch(
        self, seqs: list[Sequence], slots: list[int], copies: list[tuple[int, int]], previous_rows=None
    ) -> Batch:
        """A one-token step of `seqs` (row i samples for seqs[i]) with their block tables."""
        width = -(-max(s.num_scheduled_tokens for s in seqs) // self.block_size)
        tables = self.blocks.block_tables([s.seq_id for s in seqs], width)
        self.peak_used_blocks = max(self.peak_used_blocks, self.blocks.num_used_blocks)
        return Batch(
            False, seqs, seqs, sample_rows=list(range(len(seqs))), num_tokens=len(seqs), slots=slots,
            block_tables=tables, copies=copies, previous_rows=previous_rows,
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
