"""The Sampler that draws each sequence's next token with its exact behaviour log-prob."""

from __future__ import annotations

import torch

from nreft_engine import ops
from nreft_engine.sequence import Sequence
from nreft_engine.transfer import to_device


class SampledStep:
    """One step's samples: the tokens stay on the device (a next step can take them as its inputs before
    the host has seen them) while their copy to the host is in flight."""

    def __init__(
        self, tokens: torch.Tensor, logprobs: torch.Tensor, tops: list[tuple[int, torch.Tensor, torch.Tensor]]
    ):
        self.tokens = tokens
        self._host = [t.to("cpu", non_blocking=True) for t in (tokens, logprobs)]
        self._host_tops = [
            (i, v.to("cpu", non_blocking=True), k.to("cpu", non_blocking=True)) for i, v, k in tops
        ]
        self._done = None
        if tokens.is_cuda:
            self._done = torch.cuda.Event()
            self._done.record()

    @classmethod
    def empty(cls, device: torch.device) -> SampledStep:
        """The samples of a step in which no sequence samples."""
        return cls(torch.empty(0, dtype=torch.long, device=device), torch.empty(0, device=device), [])

    def to_host(self) -> tuple[list[int], list[float], list[dict[int, float] | None]]:
        """(tokens, log-probs, top-N alternatives) per row; waits for this step's copies only."""
        if self._done is not None:
            self._done.synchronize()
        tokens, logprobs = (t.tolist() for t in self._host)
        tops: list[dict[int, float] | None] = [None] * len(tokens)
        for i, values, ids in self._host_tops:
            tops[i] = dict(zip(ids.tolist(), values.tolist()))
        return tokens, logprobs, tops


class Sampler:
    """Draws the next token of each sequence from its logits row, with its own seeded RNG stream.

    Each sequence owns a generator and consumes one uniform per token, so a sequence's draws do not depend
    on which other sequences share its batch, nor on preemption; its logits do only through the float
    rounding of the matmuls, unless the engine is batch-invariant (see Engine).
    Nothing here waits for the device: the results come back through `SampledStep.to_host`.
    """

    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledStep:
        """Sample one token per row of `logits` [len(seqs), V], with its top-N alternatives if asked."""
        device = logits.device
        params = [s.params for s in seqs]
        logits = self._suppress_early_stops(logits, seqs)
        # one host-to-device copy for the per-row settings and draws (top_k is exact in fp32 below 2^24)
        table = to_device(
            [
                [p.temperature for p in params],
                [p.top_k for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [s.next_uniform() for s in seqs],
            ],
            device,
            torch.float32,
        )
        temperature, top_k, top_p, min_p, uniform = table[0], table[1].long(), table[2], table[3], table[4]
        tokens, logprobs = ops.sample(logits, temperature, top_k, top_p, min_p, uniform)
        tops = []
        wants_top = [i for i, p in enumerate(params) if p.logprobs]
        if wants_top:
            rows = to_device(wants_top, device)
            full = ops.filter_logits(logits[rows], temperature[rows], top_k[rows], top_p[rows], min_p[rows])
            full = full.log_softmax(dim=-1)
            tops = [(i, *full[row].topk(params[i].logprobs)) for row, i in enumerate(wants_top)]
        return SampledStep(tokens, logprobs, tops)

    def _suppress_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Mask EOS and stop tokens for sequences that have not reached min_tokens yet."""
        early = [i for i, s in enumerate(seqs) if s.num_scheduled_output_tokens < s.params.min_tokens]
        if not early:
            return logits
        rows, cols = [], []
        for i in early:
            p = seqs[i].params
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
            rows += [i] * len(banned)
            cols += banned
        if not rows:
            return logits
        index = to_device([rows, cols], logits.device)
        return logits.index_put((index[0], index[1]), logits.new_full((), float("-inf")))
