"""Engine: continuous-batching generation with a per-call layer-skipped behaviour model."""

from __future__ import annotations

import logging
import time
from typing import Sequence as Seq

import torch
from tqdm.auto import tqdm

from nreft_engine import ops
from nreft_engine.cache import PagedKVCache, available_memory, resolve_budget
from nreft_engine.graphs import DecodeGraphs
from nreft_engine.models.loader import load_model, prepare_model
from nreft_engine.models.weights import DecoderWeights, rope_tables
from nreft_engine.outputs import CompletionOutput, GenerationStats, RequestOutput
from nreft_engine.runner import ModelRunner, StepInputs
from nreft_engine.sampling import SampledStep, Sampler, SamplingParams
from nreft_engine.scheduler import Batch, Scheduler, Sequence
from nreft_engine.skip import LayerPlan, SkipSpec, resolve_plan
from nreft_engine.transfer import to_device

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class Engine:
    """Samples n completions per prompt from a model, optionally with a random subset of layers skipped.

    The engine reads the model's parameters in place: an optimizer step on `model` is seen by the next
    `generate`. With `prepack_weights` it keeps packed copies of the linear weights (on the CPU oneDNN's for
    batches and the small-batch kernel's for up to a few rows: matmuls 1.7x faster at batch 64, 2.7x at batch 1;
    on CUDA q/k/v and gate/up fused into one matrix each), rebuilt at the start of a call for the parameters
    that changed; with `prepack_weights=False` nothing is copied. The default (None) packs when the copies
    take at most half the memory available. The KV cache
    reserves `kv_cache_memory` (bytes, or a fraction of the memory available now) once, and each call
    lays out as many blocks as fit for its active layers. On CUDA, decode steps whose contexts fit in
    `max_graph_context` tokens replay CUDA graphs (one per batch bucket and skip set) unless `enforce_eager`.
    With `async_scheduling` (default: on CUDA) a decode step is launched before the previous step's tokens
    reach the host, so the scheduling work overlaps the device's; the outputs are the same.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        kv_cache_memory: float | int = 0.1,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_prefill_tokens: int = 4096,
        max_model_len: int | None = None,
        prepack_weights: bool | None = None,
        enforce_eager: bool = False,
        max_graph_context: int = 8192,
        async_scheduling: bool | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = prepare_model(model)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = min(max_model_len or self.spec.max_position_embeddings, self.spec.max_position_embeddings)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.prepack_weights = self._default_prepack() if prepack_weights is None else prepack_weights
        self.eos_token_ids = self.spec.eos_token_ids
        self.sampler = Sampler(self.eos_token_ids)
        budget = resolve_budget(kv_cache_memory, self.device)
        self._kv_buffer = torch.empty(budget // param.element_size(), dtype=self.dtype, device=self.device)
        self.use_cuda_graphs = self.device.type == "cuda" and not enforce_eager
        self.async_scheduling = self.device.type == "cuda" if async_scheduling is None else async_scheduling
        self.max_graph_context = min(max_graph_context, self.max_model_len)
        self.runner: ModelRunner
        self.graphs: DecodeGraphs | None = None
        self.sync_weights()
        self.last_stats: GenerationStats | None = None
        self._next_seq_id = 0

    def _default_prepack(self) -> bool:
        """Pack where packing helps and the copies fit in half the memory available now: on CUDA the fused
        q/k/v and gate/up copies (one matmul each: decode steps 1.16x faster at batch 64 on an H200), on the
        CPU oneDNN's and the small-batch kernel's layouts of every matrix."""
        if self.device.type == "cuda":
            copies = 1  # of the fused projections only: an over-estimate
        elif ops.can_prepack_linear(self.device):
            copies = 2
        else:
            return False
        # every matrix, tied ones once (an untied embedding is not packed: a slight over-estimate)
        matrices = {p.data_ptr(): p for p in self.model.parameters() if p.dim() == 2}
        needed = copies * sum(p.numel() * p.element_size() for p in matrices.values())
        available = available_memory(self.device)
        if needed > available // 2:
            logger.warning(
                "running on the model's own weights: their packed copies (%.2f GB) would take more than half "
                "of the %.2f GB available; pass prepack_weights=True to pack anyway",
                needed / 1e9,
                available / 1e9,
            )
            return False
        return True

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

    def sync_weights(self) -> None:
        """Re-read the model's parameter tensors. Needed only if parameters were replaced, not updated in place."""
        cos, sin = rope_tables(self.model, self.max_model_len, self.device)
        weights = DecoderWeights.from_model(self.model)
        self.runner = ModelRunner(self.spec, weights, cos, sin, prepack=self.prepack_weights)
        if self.use_cuda_graphs:
            blocks = -(-self.max_graph_context // self.block_size)
            self.graphs = DecodeGraphs(self.runner, self.max_num_seqs, blocks, self.device)

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
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of prompts (strings or token-id lists), not a single prompt")
        if len(prompts) == 0:
            return []
        all_params = self._params_per_prompt(params, len(prompts))
        prompt_ids = [self._encode(i, p) for i, p in enumerate(prompts)]
        plan = resolve_plan(skip, self.num_layers)
        self.runner.refresh_weights()
        cache = PagedKVCache(self._kv_buffer, plan.num_active, self.block_size, self.spec.num_kv_heads, self.spec.head_dim)
        for i, (ids, p) in enumerate(zip(prompt_ids, all_params)):
            self._check_fits(i, ids, p, cache)

        stats = GenerationStats(kv_cache_bytes=cache.nbytes, num_blocks=cache.num_blocks, skipped_layers=plan.skipped)
        captures, capture_seconds = (self.graphs.captures, self.graphs.capture_seconds) if self.graphs else (0, 0.0)
        scheduler = Scheduler(cache.blocks, self.max_num_seqs, self.max_prefill_tokens, self.max_model_len)
        groups = [self._make_group(i, ids, p) for i, (ids, p) in enumerate(zip(prompt_ids, all_params))]
        for group in groups:
            scheduler.add(group)
        bar = tqdm(total=sum(len(g) for g in groups), desc="generate", unit="seq", disable=not use_tqdm)
        ahead: tuple[Batch, SampledStep] | None = None
        with torch.inference_mode():
            while scheduler.has_work() or ahead is not None:
                start = time.perf_counter()
                if ahead is None:
                    batch = scheduler.schedule()
                    sampled = self._launch(batch, plan, cache)
                else:
                    batch, sampled = ahead
                running = len(scheduler.running)
                # async scheduling: launch the next decode step, fed this step's tokens on the device,
                # before this step's samples reach the host, so the host's work overlaps the device's
                next_batch = scheduler.schedule_ahead(batch) if self.async_scheduling else None
                ahead = None if next_batch is None else (next_batch, self._launch(next_batch, plan, cache, sampled))
                tokens, logprobs, tops = sampled.to_host()
                appended, finished = scheduler.postprocess(
                    batch, tokens, logprobs, tops, self.eos_token_ids, self._decode
                )
                self._account(stats, batch, appended, time.perf_counter() - start, running)
                bar.update(len(finished))
        bar.close()
        stats.num_preemptions = scheduler.num_preemptions
        stats.used_blocks_at_end = cache.blocks.num_used_blocks
        if self.graphs is not None:
            stats.graph_captures = self.graphs.captures - captures
            stats.graph_capture_seconds = self.graphs.capture_seconds - capture_seconds
        self.last_stats = stats
        logger.debug("generate: %s", stats)
        return [self._request_output(i, prompts[i], group, plan.skipped) for i, group in enumerate(groups)]

    def _params_per_prompt(self, params, count: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * count
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
        for p in params:
            if p.n > self.max_num_seqs:
                raise ValueError(f"n={p.n} exceeds max_num_seqs={self.max_num_seqs}; raise max_num_seqs")
            if p.stop_strings and self.tokenizer is None:
                raise ValueError(f"stop strings {p.stop_strings} need a tokenizer; the engine has none")
        return list(params)

    def _encode(self, index: int, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but the engine has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
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

    def _check_fits(self, index: int, ids: list[int], params: SamplingParams, cache: PagedKVCache) -> None:
        """Fail fast on a request that could never fit in the cache, even alone."""
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        need = -(-longest // self.block_size)
        if need > cache.num_blocks:
            raise ValueError(
                f"prompt {index} ({len(ids)} tokens) + max_tokens={params.max_tokens} needs {need} KV blocks but the "
                f"cache holds only {cache.num_blocks}; raise kv_cache_memory or lower max_tokens"
            )

    def _make_group(self, index: int, ids: list[int], params: SamplingParams) -> list[Sequence]:
        base = int(torch.randint(0, 2**62, ())) if params.seed is None else params.seed
        group = []
        for sample in range(params.n):
            generator = torch.Generator().manual_seed((base * 1_000_003 + index * 7919 + sample) % 2**63)
            group.append(Sequence(self._next_seq_id, index, sample, ids, params, generator))
            self._next_seq_id += 1
        return group

    def _launch(
        self, batch: Batch, plan: LayerPlan, cache: PagedKVCache, previous: SampledStep | None = None
    ) -> SampledStep:
        """Run one step and start sampling from it, without waiting for the device. A step scheduled ahead
        takes its input tokens from `previous`, the step before it, on the device."""
        cache.copy_blocks(batch.copies)
        inputs = self._step_inputs(batch, cache)
        if batch.input_rows is not None:
            tokens = previous.tokens
            if len(batch.input_rows) < tokens.shape[0]:  # some sequences finish by length: their rows drop out
                tokens = tokens[to_device(batch.input_rows, self.device)]
            inputs.input_ids = tokens
        if self.graphs is not None and self.graphs.fits(inputs):
            logits = self.graphs.run(inputs, plan, cache)
        else:
            logits = self.runner.forward(inputs, plan, cache)
        rows = logits[to_device(batch.rows, logits.device)] if batch.prefill else logits
        sampled = self.sampler(rows, batch.seqs)
        for seq in batch.seqs:
            seq.num_pending += 1
        return sampled

    def _step_inputs(self, batch: Batch, cache: PagedKVCache) -> StepInputs:
        """A step's inputs. Positions count the sequence's pending tokens: a step scheduled ahead feeds the
        token its previous step is still sampling (its id is filled in from the device by `_launch`)."""
        device = self.device
        if batch.prefill:
            ids, positions, slots, lens = [], [], [], [0]
            for lead in batch.leads:
                ids.extend(lead.token_ids)
                positions.extend(range(len(lead)))
                slots.append(cache.blocks.slot_mapping(lead.seq_id, 0, len(lead)))
                lens.append(lens[-1] + len(lead))
            cu = to_device(lens, device, torch.int32)
            return StepInputs(
                input_ids=to_device(ids, device),
                positions=to_device(positions, device),
                slot_mapping=to_device(torch.cat(slots), device),
                last_token_index=(cu[1:] - 1).long(),
                cu_seqlens=cu,
            )
        seqs = batch.seqs
        lengths = [len(s) + s.num_pending for s in seqs]
        # one host-to-device copy for the four per-sequence vectors, one for the block tables
        packed = to_device([[s.token_ids[-1] for s in seqs], [n - 1 for n in lengths], batch.slots, lengths], device)
        return StepInputs(
            input_ids=packed[0],
            positions=packed[1],
            slot_mapping=packed[2],
            last_token_index=torch.arange(len(seqs), device=device),
            block_tables=to_device(cache.blocks.block_tables([s.seq_id for s in seqs], -(-max(lengths) // self.block_size)), device),
            context_lens=packed[3].to(torch.int32),
        )

    @staticmethod
    def _account(stats: GenerationStats, batch: Batch, appended: int, elapsed: float, running: int) -> None:
        stats.generated_tokens += appended
        stats.peak_running = max(stats.peak_running, running)
        if batch.prefill:
            stats.prefill_tokens += batch.num_tokens
            stats.prefill_seconds += elapsed
        else:
            stats.decode_tokens += appended
            stats.decode_seconds += elapsed

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _request_output(self, index: int, prompt: Prompt, group: list[Sequence], skipped) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=seq.sample_index,
                text=seq.text if seq.text is not None else self._decode(seq.output_token_ids),
                token_ids=seq.output_token_ids,
                logprobs=seq.logprobs,
                cumulative_logprob=float(sum(seq.logprobs)),
                finish_reason=seq.finish_reason,
                top_logprobs=seq.top_logprobs or None,
            )
            for seq in group
        ]
        return RequestOutput(
            request_id=index,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=group[0].token_ids[: group[0].num_prompt_tokens],
            outputs=outputs,
            skipped_layers=skipped,
        )
