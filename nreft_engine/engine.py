"""Engine: continuous-batching generation with a per-call layer-skipped behaviour model."""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Sequence as Seq

import torch
from tqdm.auto import tqdm

from nreft_engine import importance, ops
from nreft_engine.linear import default_prepack, log_cpu_linears
from nreft_engine.models.loader import load_model, model_spec
from nreft_engine.outputs import GenerationStats, RequestOutput
from nreft_engine.runner import ModelRunner
from nreft_engine.sampling_params import SamplingParams, as_int
from nreft_engine.session import GenerationSession, make_group, request_output
from nreft_engine.skip import LayerPlan, SkipSpec, resolve_plan

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class Engine:
    """Samples n completions per prompt from a model, optionally with a random subset of layers skipped.

    The engine reads the model's parameters in place: an optimizer step on `model` is seen by the next
    `generate`. With `prepack_weights` it keeps packed copies of the linear weights (on the CPU oneDNN's
    for batches and the small-batch kernel's for up to a few rows: matmuls 1.7x faster at batch 64, 2.7x
    at batch 1; on CUDA q/k/v and gate/up fused into one matrix each), rebuilt at the start of a call for
    the parameters that changed; with `prepack_weights=False` nothing is copied. The default (None) packs
    when the copies take at most half the memory available. The KV cache reserves `kv_cache_memory`
    (bytes, or a fraction of the memory available now) once, and each call lays out as many blocks as fit
    for its active layers. On CUDA, decode steps whose contexts fit in `max_graph_context` tokens replay
    CUDA graphs (one per batch bucket and skip set) unless `enforce_eager`. With `async_scheduling`
    (default: on CUDA) a decode step is launched before the previous step's tokens reach the host, so the
    scheduling work overlaps the device's; the outputs are the same.

    One `generate` runs at a time: calls from other threads wait their turn, and each gets its own outputs.
    The same settings, seeds and batch composition give bit-identical outputs. Another batch (other prompts,
    preemption) gives the same distribution, tokens equal up to the float rounding of the matmuls and
    log-probs within ~1e-4 (fp32), unless `batch_invariant` (CPU only): then each row is computed the same way
    whatever its batch, so outputs are bit-identical across batches too (the linears run the small-batch
    kernel at every row count, from one packed copy of the weights: batches and prefill slower).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        kv_cache_memory: float | int = 0.1,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 4096,
        max_model_len: int | None = None,
        prepack_weights: bool | None = None,
        enforce_eager: bool = False,
        max_graph_context: int = 8192,
        async_scheduling: bool | None = None,
        batch_invariant: bool = False,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = model_spec(model)
        param = next(model.parameters())
        if batch_invariant:
            ops.check_batch_invariant(param.device, param.dtype, self.spec.head_dim)
            if prepack_weights is False:
                raise ValueError("batch_invariant=True runs on packed weights; leave prepack_weights at None")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        limit = self.spec.max_position_embeddings
        self.max_model_len = min(max_model_len or limit, limit)
        device = param.device
        if prepack_weights is None:
            prepack_weights = batch_invariant or default_prepack(model, device)
        if device.type == "cpu":
            log_cpu_linears(param.dtype, prepack_weights)
        self.runner = ModelRunner(
            model,
            self.spec,
            kv_cache_memory=kv_cache_memory,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_model_len=self.max_model_len,
            prepack_weights=prepack_weights,
            cuda_graphs=device.type == "cuda" and not enforce_eager,
            max_graph_context=max_graph_context,
            async_scheduling=device.type == "cuda" if async_scheduling is None else async_scheduling,
            batch_invariant=batch_invariant,
        )
        self.last_stats: GenerationStats | None = None
        self._kv_numel: int | None = None  # the KV buffer's size while it is released by `sleep`
        self._lock = threading.Lock()  # one generate (or weight reload) at a time: they share the KV cache

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, dtype: torch.dtype = torch.float32, cache_dir: str | None = None, **kwargs
    ) -> Engine:
        """Load a model (embedded name, HF directory, GGUF file or hub id) and its tokenizer."""
        model, tokenizer = load_model(name_or_path, dtype=dtype, cache_dir=cache_dir)
        return cls(model, tokenizer, **kwargs)

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    def reload_weights(self) -> None:
        """Re-read the model's parameter tensors: needed only if parameters were replaced, not updated."""
        with self._lock:
            self.runner.reload_weights()

    def refresh_packed_weights(self, force: bool = False) -> int:
        """Re-pack the weights whose parameters changed in place; returns how many. `generate` does it itself,
        seeing changes by the parameters' version counters; ops that do not move them (fused optimizers such
        as AdamW(fused=True), writes through `.data`) need `force=True` once per update."""
        with self._lock:
            return self.runner.refresh_packed_weights(force)

    def layer_importance(self, prompts: Seq[Prompt]) -> list[float]:
        """Each layer's block influence (ShortGPT): the mean over every token of `prompts` of 1 - cos of the
        residual stream before and after it, full model, current weights; for SkipPolicy(importance=...)."""
        ids = [ids for ids, _ in self._requests(prompts, None)]
        with self._lock:
            return importance.layer_importance(self.runner, ids, self.max_num_batched_tokens)

    def generate(
        self,
        prompts: Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        skip: SkipSpec = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Sample `params.n` completions for each prompt (text or token ids); one RequestOutput per prompt.

        `skip` is a SkipPolicy (a fresh random skip set for this call), explicit layer ids, a LayerPlan,
        or None (full model). The plan is fixed for the whole call and reported in every output.
        Concurrent calls run one after another, in turn (see the class docstring).
        """
        with self._lock:
            return self._generate(prompts, params, skip, use_tqdm)

    def _generate(self, prompts: Seq[Prompt], params, skip: SkipSpec, use_tqdm: bool) -> list[RequestOutput]:
        requests = self._requests(prompts, params)
        if not requests:
            return []
        session = self.open_session(resolve_plan(skip, self.num_layers))
        for i, (ids, p) in enumerate(requests):
            session.check_fits(i, ids, p)
        seq_ids = itertools.count()
        groups = [make_group(seq_ids, i, ids, p) for i, (ids, p) in enumerate(requests)]
        for i, group in enumerate(groups):
            session.add(i, group)
        bar = tqdm(total=sum(len(g) for g in groups), desc="generate", unit="seq", disable=not use_tqdm)
        with torch.inference_mode():
            while session.has_work():
                bar.update(len(session.step()))
        bar.close()
        self.last_stats = session.finish()
        logger.debug("generate: %s", self.last_stats)
        skipped = session.plan.skipped
        return [
            request_output(i, prompt if isinstance(prompt, str) else None, group, skipped, self.detokenize)
            for i, (prompt, group) in enumerate(zip(prompts, groups))
        ]

    @property
    def lock(self) -> threading.Lock:
        """Held by every call that uses the KV cache or the weights; hold it while a session is open."""
        return self._lock

    def open_session(self, plan: LayerPlan) -> GenerationSession:
        """A step loop over the cache laid out for `plan`, for callers holding `lock` (`generate` and
        `AsyncEngine`); it is valid until the next session opens."""
        if self._kv_numel is not None:
            raise RuntimeError("the engine is asleep (its KV cache is released): call wake_up() first")
        return GenerationSession(
            self.runner, plan, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
            detokenize=self.detokenize,
        )

    def check_request(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> tuple[list[int], SamplingParams]:
        """One prompt's token ids and params, checked as `generate` checks them (errors name the value)."""
        return self._requests([prompt], None if params is None else [params])[0]

    def sleep(self) -> None:
        """Release the KV cache's memory (e.g. while a trainer uses the device) once the running call ends;
        `wake_up` reserves it again. Calls made in between raise."""
        with self._lock:
            if self._kv_numel is None:
                buffer = self.runner.kv_buffer
                self._kv_numel = buffer.numel()
                self.runner.kv_buffer = buffer.new_empty(0)
                del buffer
                if self.runner.device.type == "cuda":
                    torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Reserve the KV cache released by `sleep` again (the same number of bytes)."""
        with self._lock:
            if self._kv_numel is not None:
                self.runner.kv_buffer = self.runner.kv_buffer.new_empty(self._kv_numel)
                self._kv_numel = None

    @property
    def kv_cache_reserved_bytes(self) -> int:
        """Bytes the KV cache buffer holds now (0 while asleep)."""
        buffer = self.runner.kv_buffer
        return buffer.numel() * buffer.element_size()

    def _requests(self, prompts: Seq[Prompt], params) -> list[tuple[list[int], SamplingParams]]:
        """(token ids, SamplingParams) per prompt, each checked."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of prompts (strings or token-id lists), not one prompt")
        if len(prompts) == 0:
            return []
        all_params = self._params_per_prompt(params, len(prompts))
        return [(self._encode(i, p), q) for i, (p, q) in enumerate(zip(prompts, all_params))]

    def _params_per_prompt(self, params, count: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * count
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
        for p in params:
            self._check_params(p)
        return list(params)

    def _check_params(self, p: SamplingParams) -> None:
        """What SamplingParams cannot check alone: the engine's limits and the model's vocabulary."""
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {p!r} ({type(p).__name__})")
        vocab = self.spec.vocab_size
        if p.n > self.max_num_seqs:
            raise ValueError(f"n={p.n} exceeds max_num_seqs={self.max_num_seqs}; raise max_num_seqs")
        if p.stop_strings and self.tokenizer is None:
            raise ValueError(f"stop strings {p.stop_strings} need a tokenizer; the engine has none")
        if p.logprobs is not None and p.logprobs > vocab:
            raise ValueError(
                f"logprobs={p.logprobs} exceeds the model's vocabulary of {vocab} tokens; ask for fewer"
            )
        bad = [t for t in p.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")

    def _encode(self, index: int, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but the engine has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            if hasattr(prompt, "tolist"):  # a tensor or an array: Python scalars of its dtype
                prompt = prompt.tolist()
            ids = [t if type(t) is int else as_int(t, f"prompt {index}'s token {j}")
                   for j, t in enumerate(prompt)]
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt {index} has token ids outside [0, {self.spec.vocab_size}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens; the model's context is {self.max_model_len} tokens "
                "and at least one must be left to generate"
            )
        return ids

    def detokenize(self, token_ids: list[int]) -> str:
        """Text of `token_ids` (special tokens dropped); "" without a tokenizer."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
