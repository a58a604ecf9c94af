"""SamplingParams (vLLM's names and meanings) and the Sampler that draws tokens with exact log-probs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nreft_engine import ops
from nreft_engine.kernels.sampler import filter_logits
from nreft_engine.transfer import to_device

if TYPE_CHECKING:
    from nreft_engine.scheduler import Sequence


@dataclass
class SamplingParams:
    """How to sample completions, with vLLM's field names and meanings.

    `temperature=0` is greedy. `top_k <= 0` (vLLM uses -1) keeps every token. `logprobs=N` also returns
    the N most likely alternatives per step. The behaviour log-prob of every sampled token is always
    returned: it is the log-prob under the exact distribution the token was drawn from.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.top_k, int), f"top_k must be an integer (<= 0 keeps all), got {self.top_k!r}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}"),
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be None or >= 0, got {self.logprobs!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
        self.stop_strings = tuple(stops)
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SampledStep:
    """One step's samples: the tokens stay on the device (a next step can take them as its inputs before
    the host has seen them) while their copy to the host is in flight."""

    def __init__(
        self, tokens: torch.Tensor, logprobs: torch.Tensor, tops: list[tuple[int, torch.Tensor, torch.Tensor]]
    ):
        self.tokens = tokens
        self._host = [t.to("cpu", non_blocking=True) for t in (tokens, logprobs)]
        self._host_tops = [(i, v.to("cpu", non_blocking=True), k.to("cpu", non_blocking=True)) for i, v, k in tops]
        self._done = None
        if tokens.is_cuda:
            self._done = torch.cuda.Event()
            self._done.record()

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

    Each sequence owns a generator and consumes one uniform per token, so a sequence's samples do not
    depend on which other sequences share its batch (preemption and batching leave outputs unchanged).
    Nothing here waits for the device: the results come back through `SampledStep.to_host`.
    """

    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledStep:
        """Sample one token per row of `logits` [len(seqs), V] (with each row's top-N alternatives if asked)."""
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
            full = filter_logits(logits[rows], temperature[rows], top_k[rows], top_p[rows], min_p[rows])
            full = full.log_softmax(dim=-1)
            tops = [(i, *full[row].topk(params[i].logprobs)) for row, i in enumerate(wants_top)]
        return SampledStep(tokens, logprobs, tops)

    def _suppress_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Mask EOS and stop tokens for sequences that have not reached min_tokens yet."""
        early = [i for i, s in enumerate(seqs) if s.num_output_tokens + s.num_pending < s.params.min_tokens]
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
