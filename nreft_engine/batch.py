"""One model step as the scheduler hands it to the runner: which prompt chunks and decodes it feeds, which
sequences sample from which logits row, and where their tokens go in the cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nreft_engine.sequence import Sequence


@dataclass
class Batch:
    """One model step: chunks of prompts, then one token for each decoding sequence (`decodes`).

    A chunk feeds tokens [start, end) of a prompt group's lead; the group's n samples share its blocks and,
    when the chunk ends the prompt, all sample from the row of its last token. `seqs[i]` samples from logits
    row `sample_rows[i]` (rows: the prompt-ending chunks in order, then the decodes). `slots` holds the cache
    slot of each fed token; decodes carry their block tables, and chunks theirs (`chunk_tables`) when some
    chunk continues a prompt begun in an earlier step. A step scheduled ahead takes its input tokens from
    rows `previous_rows` of the previous step's samples, on the device.
    """

    chunks: list[Chunk]
    decodes: list[Sequence]
    seqs: list[Sequence]
    sample_rows: list[int]
    num_tokens: int
    slots: list[int]
    block_tables: torch.Tensor | None = None
    chunk_tables: torch.Tensor | None = None
    copies: list[tuple[int, int]] = field(default_factory=list)
    previous_rows: list[int] | None = None

    @property
    def prefill(self) -> bool:
        return bool(self.chunks)


@dataclass
class Chunk:
    """Tokens [start, end) of the lead of `group` (a prompt's n samples), prefilled in one step."""

    group: list[Sequence]
    start: int
    end: int

    @property
    def lead(self) -> Sequence:
        return self.group[0]

    @property
    def last(self) -> bool:
        return self.end == len(self.lead)
