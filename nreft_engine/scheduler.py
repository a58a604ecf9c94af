"""Sequences and the continuous-batching scheduler: prompt fork for n samples, preemption by recompute."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from nreft_engine.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


UNIFORM_CHUNK = 64  # uniforms drawn from a sequence's generator at a time (same stream as one at a time)


class Sequence:
    """One sample of one prompt: its tokens, behaviour log-probs, RNG stream and cache progress.

    The KV cache holds `num_cached` tokens; every token after them (the prompt at first, later the last
    sampled token) is fed to the model in the sequence's next step. `num_pending` counts the tokens
    sampled by launched steps that the host has not appended yet (with async scheduling, up to two).
    """

    def __init__(
        self,
        seq_id: int,
        request_index: int,
        sample_index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        generator: torch.Generator,
    ):
        self.seq_id = seq_id
        self.request_index = request_index
        self.sample_index = sample_index
        self.params = params
        self.generator = generator
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.num_cached = 0
        self.num_pending = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.text: str | None = None
        self._uniforms: list[float] = []

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def next_uniform(self) -> float:
        """The next draw of this sequence's RNG stream, one per sampled token. Drawn in chunks, which gives
        the same values as drawing one at a time, for a fraction of the per-step cost."""
        if not self._uniforms:
            self._uniforms = torch.rand(UNIFORM_CHUNK, generator=self.generator).tolist()[::-1]
        return self._uniforms.pop()

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class Batch:
    """One model step: either a prefill of whole sequences or a one-token decode of running ones.

    `seqs[i]` samples from logits row `rows[i]`: after a prefill, the n samples of a prompt all read the
    row of the prompt's last token, which was computed once.
    """

    prefill: bool
    leads: list[Sequence]
    seqs: list[Sequence]
    rows: list[int]
    num_tokens: int
    slots: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    # a step scheduled ahead: its input tokens are these rows of the previous step's samples, on the device
    input_rows: list[int] | None = None

    @classmethod
    def decode(
        cls, seqs: list[Sequence], slots: list[int], copies: list[tuple[int, int]], input_rows: list[int] | None = None
    ) -> Batch:
        """A one-token step of `seqs`, row i sampling for seqs[i]."""
        return cls(
            prefill=False, leads=seqs, seqs=seqs, rows=list(range(len(seqs))), num_tokens=len(seqs), slots=slots,
            copies=copies, input_rows=input_rows,
        )


class Scheduler:
    """Moves sequences waiting → running → finished over a shared block manager (nano-vllm style)."""

    def __init__(self, blocks, max_num_seqs: int, max_prefill_tokens: int, max_model_len: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[list[Sequence]] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.blocks.block_size)

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
        tokens = 0
        while self.waiting:
            group = self.waiting[0]
            lead = group[0]
            need = self.blocks_needed(len(lead))
            margin = len(group) if (self.running or leads) else 0
            if (
                len(self.running) + len(seqs) + len(group) > self.max_num_seqs
                or (leads and tokens + len(lead) > self.max_prefill_tokens)
                or self.blocks.num_free_blocks < need + margin
            ):
                break
            self.waiting.popleft()
            self.blocks.allocate(lead.seq_id, len(lead))
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
            return Batch(prefill=True, leads=leads, seqs=seqs, rows=rows, num_tokens=tokens)
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
                "the KV cache cannot hold even one running sequence; raise kv_cache_memory or lower max_tokens"
            )
        self.running = list(scheduled)
        return Batch.decode(scheduled, slots, copies)

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
            and seq.num_output_tokens + seq.num_pending < seq.params.max_tokens
            and len(seq) + seq.num_pending < self.max_model_len
        ]
        if not rows:
            return None
        seqs = [batch.seqs[i] for i in rows]
        slots, copies = [], []
        for seq in seqs:
            slot, seq_copies = self.blocks.append_slot(seq.seq_id)
            slots.append(slot)
            copies.extend(seq_copies)
        return Batch.decode(seqs, slots, copies, input_rows=rows)

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks and requeue it first; it is recomputed from its tokens later."""
        self.blocks.free(seq.seq_id)
        seq.num_cached = 0
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
        eos_token_ids: tuple[int, ...],
        detokenize,
    ) -> tuple[int, list[Sequence]]:
        """Append each sampled token, finish sequences that stop, free their blocks; return how many tokens
        were appended and the sequences that finished. Rows of sequences that finished while this step
        was in flight (it was scheduled ahead) are discarded."""
        finished = []
        appended = 0
        for seq, token, logprob, top in zip(batch.seqs, tokens, logprobs, tops):
            if seq.status is SequenceStatus.FINISHED:
                continue
            seq.num_pending -= 1
            appended += 1
            seq.num_cached = len(seq)
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            if top is not None:
                seq.top_logprobs.append(top)
            reason = self._finish_reason(seq, token, eos_token_ids, detokenize)
            if reason is not None:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = reason
                self.blocks.free(seq.seq_id)
                self.running.remove(seq)
                finished.append(seq)
        return appended, finished

    def _finish_reason(self, seq: Sequence, token: int, eos_token_ids: tuple[int, ...], detokenize) -> str | None:
        p = seq.params
        num_out = seq.num_output_tokens
        if num_out >= p.min_tokens:
            if (not p.ignore_eos and token in eos_token_ids) or token in p.stop_token_ids:
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
