"""What `Engine.generate` returns: vLLM-style RequestOutput / CompletionOutput, plus run statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sampled completion. `logprobs[i]` is the behaviour log-prob of `token_ids[i]`."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    cumulative_logprob: float
    finish_reason: str
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """The n completions of one prompt, and the layers the behaviour model skipped while sampling them."""

    request_id: int | str  # the prompt's index in a `generate` call, or the id a concurrent request gave
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    skipped_layers: tuple[int, ...]


@dataclass
class GenerationStats:
    """Counters and timings of one `generate` call."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    num_preemptions: int = 0
    peak_running: int = 0
    kv_cache_bytes: int = 0
    num_blocks: int = 0
    used_blocks_at_end: int = 0
    peak_used_blocks: int = 0
    graph_captures: int = 0  # CUDA graphs captured by this call (each new skip set needs its own)
    graph_capture_seconds: float = 0.0  # included in decode_seconds
    skipped_layers: tuple[int, ...] = field(default_factory=tuple)

    def add_step(
        self,
        prefill: bool,
        num_tokens: int,
        appended: int,
        seconds: float,
        captures: int,
        capture_seconds: float,
    ) -> None:
        """Count one step: `num_tokens` fed, `appended` tokens kept, and the graph captures it paid for."""
        self.generated_tokens += appended
        if prefill:
            self.prefill_tokens += num_tokens
            self.prefill_seconds += seconds
        else:
            self.decode_tokens += appended
            self.decode_seconds += seconds
        self.graph_captures += captures
        self.graph_capture_seconds += capture_seconds

    def finish(
        self, num_preemptions: int, peak_running: int, peak_used_blocks: int, used_blocks_at_end: int
    ) -> None:
        """The scheduler's counters at the end of the call."""
        self.num_preemptions = num_preemptions
        self.peak_running = peak_running
        self.peak_used_blocks = peak_used_blocks
        self.used_blocks_at_end = used_blocks_at_end

    @property
    def peak_kv_cache_bytes(self) -> int:
        """KV bytes the call's sequences held at most (of `kv_cache_bytes` laid out for the active layers)."""
        return self.kv_cache_bytes * self.peak_used_blocks // self.num_blocks if self.num_blocks else 0

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of the whole call (prefill included)."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0
