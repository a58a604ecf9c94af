"""Sequence: one sample of one prompt, its tokens, behaviour log-probs and RNG stream."""

from __future__ import annotations

from enum import Enum, auto
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nreft_engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


UNIFORM_CHUNK = 64  # uniforms drawn from a sequence's generator at a time (same stream as one at a time)


class Sequence:
    """One sample of one prompt: its tokens, behaviour log-probs and RNG stream.

    Every token after those in the KV cache (the prompt at first, later the last sampled token) is fed to
    the model in the sequence's next step. `num_pending` counts the tokens sampled by launched steps that
    the host has not appended yet (with async scheduling, up to two); the model runner keeps it.
    """

    def __init__(
        self,
        seq_id: int,
        sample_index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        generator: torch.Generator,
    ):
        self.seq_id = seq_id
        self.sample_index = sample_index
        self.params = params
        self.generator = generator
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
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

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens once the launched steps' samples are appended: the length the next step sees."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_scheduled_output_tokens(self) -> int:
        return self.num_output_tokens + self.num_pending

    def next_uniform(self) -> float:
        """The next draw of this sequence's RNG stream, one per sampled token. Drawn in chunks, which gives
        the same values as drawing one at a time, for a fraction of the per-step cost."""
        if not self._uniforms:
            self._uniforms = torch.rand(UNIFORM_CHUNK, generator=self.generator).tolist()[::-1]
        return self._uniforms.pop()

    def append(self, token: int, logprob: float, top: dict[int, float] | None) -> None:
        """Append a sampled token with its behaviour log-prob (and top-N alternatives, if asked)."""
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)

    def finish(self, reason: str) -> None:
        """Mark the sequence finished ("stop", "length" or "abort")."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def __len__(self) -> int:
        return len(self.token_ids)
