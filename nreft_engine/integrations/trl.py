"""TRL integration: `NestedGRPOTrainer`, TRL's GRPOTrainer with its rollouts sampled by the engine.

The engine runs over the trainer's own model (its parameters, no copy) with a fresh layer-skip set per
optimizer step, and hands TRL its exact behaviour log-probs. TRL's importance-sampling correction (the
`vllm_importance_sampling_*` options, gated in TRL on `use_vllm`) then corrects the off-policy gap: the
trainer plugs the engine in where TRL would call vLLM, through the small generation object TRL expects.
Everything else (datasets, chat templates, rewards, logging, accelerate, checkpoints) stays TRL's. TRL's
log-probs of the completions (the update's forward and the old log-probs of the correction) are computed
with each prompt run once for all of its rows, as the bundled trainer does, where TRL would run it per row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from typing import Any

import torch
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer

from nreft_engine.engine import Engine
from nreft_engine.linear import training_prepack
from nreft_engine.models.loader import model_spec
from nreft_engine.sampling_params import SamplingParams
from nreft_engine.skip import LayerPlan, SkipPolicy, SkipSpec, resolve_plan
from nreft_engine.train.config import TrainConfig
from nreft_engine.train.logprobs import Group, LogitFilter, completion_hidden, head_scores

logger = logging.getLogger(__name__)

# set as the trainer's vllm_mode: TRL's vLLM-only branches ("colocate", "server") stay off
ENGINE_MODE = "nreft"
# LM-head logits kept for backward, as the bundled trainer keeps them; chunks past it are recomputed
HEAD_MEMORY = TrainConfig.head_memory_mb << 20


def check_config(args: GRPOConfig, allow_inexact_ratios: bool) -> None:
    """Refuse GRPOConfig settings the engine cannot honour, or under which TRL's ratio would be wrong."""
    if args.use_vllm or args.use_transformers_continuous_batching:
        raise ValueError(
            "NestedGRPOTrainer generates with the nreft engine: set use_vllm=False and "
            "use_transformers_continuous_batching=False in GRPOConfig"
        )
    filters = {"top_k": args.top_k > 0, "top_p": args.top_p < 1, "min_p": bool(args.min_p)}
    asked = [name for name, on in filters.items() if on]
    if asked and not allow_inexact_ratios:
        values = ", ".join(f"{name}={getattr(args, name)}" for name in asked)
        raise ValueError(
            f"GRPOConfig asks for {values}, but TRL recomputes log-probs under temperature only, so the "
            "importance ratio against the filtered behaviour distribution would be wrong; drop the filter or "
            "pass allow_inexact_ratios=True"
        )
    if args.repetition_penalty != 1.0:
        raise ValueError(f"repetition_penalty={args.repetition_penalty} is not supported by the engine")
    if args.generation_kwargs:
        raise ValueError(
            f"generation_kwargs {sorted(args.generation_kwargs)} are not supported by the engine; "
            "use temperature, top_p, top_k, min_p and max_completion_length"
        )
    if args.fsdp or args.fsdp_config and args.fsdp_config.get("fsdp_version") or _zero3(args):
        raise ValueError(
            "NestedGRPOTrainer runs the engine over each rank's full parameters: FSDP and DeepSpeed ZeRO-3 "
            "shard them, which is not supported; use DDP (accelerate/torchrun) or ZeRO-1/2"
        )


def _zero3(args: GRPOConfig) -> bool:
    config = args.deepspeed
    if not config:
        return False
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    return config.get("zero_optimization", {}).get("stage") == 3


def check_model(model: Any, peft_config: Any, skip: SkipSpec) -> None:
    """Refuse PEFT setups, models whose family the engine does not run (the engine's own message), and a
    skip setting the model cannot take; a model given by name is checked once TRL has loaded it."""
    if peft_config is not None or hasattr(model, "peft_config"):
        raise ValueError(
            "NestedGRPOTrainer does not support PEFT adapters yet (rollouts would run the base weights, not "
            "the model being trained); merge the adapter or train the full model"
        )
    if not isinstance(model, torch.nn.Module):
        return
    num_layers = model_spec(model).num_layers
    if isinstance(skip, SkipPolicy):
        skip.num_skipped(num_layers)
    else:
        resolve_plan(skip, num_layers)


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  logits_to_keep: int) -> tuple[list[Group], list[int]] | None:
    """TRL's rows (a padded prompt, then a completion of `logits_to_keep` columns) grouped by prompt: the
    groups, and the row of each of their completions in order; None if a completion's mask has a gap."""
    prompt_mask = attention_mask[:, :-logits_to_keep].bool()
    completion_mask = attention_mask[:, -logits_to_keep:].bool()
    lengths = completion_mask.sum(dim=1)
    columns = torch.arange(logits_to_keep, device=attention_mask.device)
    if not torch.equal(completion_mask, columns[None] < lengths[:, None]):
        return None
    prompts, completions = input_ids[:, :-logits_to_keep], input_ids[:, -logits_to_keep:]
    rows: dict[tuple[int, ...], list[int]] = {}
    for r in range(input_ids.shape[0]):
        rows.setdefault(tuple(prompts[r][prompt_mask[r]].tolist()), []).append(r)
    lengths = lengths.tolist()
    groups = [(list(p), [completions[r, : lengths[r]].tolist() for r in rs]) for p, rs in rows.items()]
    return groups, [r for rs in rows.values() for r in rs]


def _seed(*key: Any) -> int:
    return random.Random(repr(key)).getrandbits(62)


class EngineGeneration:
    """What TRL calls `vllm_generation`: `sync_weights()` once per optimizer step, `generate()` per batch."""

    def __init__(self, trainer: NestedGRPOTrainer, engine: Engine, skip: SkipSpec):
        self.trainer = trainer
        self.engine = engine
        self.skip = skip
        self.last_skipped: tuple[int, ...] | None = None  # of the latest training rollout
        self._calls = 0

    def sync_weights(self) -> None:
        """Re-pack the engine's weight copies (if it has any: not on the CPU, see training_prepack) after an
        optimizer step: all of them, since fused optimizers (transformers' default AdamW on recent torch)
        update parameters without moving version counters."""
        self.engine.refresh_packed_weights(force=True)

    def plan(self, step: int, rank: int, training: bool) -> LayerPlan:
        """This step's skip set: per step and rank from a policy, else fixed; evaluation runs all layers."""
        layers = self.engine.num_layers
        if not training or self.skip is None:
            return LayerPlan(layers)
        if isinstance(self.skip, SkipPolicy):
            return self.skip.plan_for(layers, step, rank)
        return resolve_plan(self.skip, layers)

    def generate(self, prompts: list[list[int]], images=None, num_generations: int = 1, profiler=None):
        """One completion per row of `prompts` (rows of one prompt share its prefill), as TRL's vLLM path
        returns them: (prompt_ids, completion_ids, per-token [behaviour log-prob], per-token [token id])."""
        if images is not None and any(image is not None for image in images):
            raise ValueError("NestedGRPOTrainer does not support images: the engine runs text decoders only")
        trainer = self.trainer
        training = trainer.model.training
        step, rank = trainer.state.global_step, trainer.accelerator.process_index
        rows: dict[tuple[int, ...], list[int]] = {}
        for i, ids in enumerate(prompts):
            rows.setdefault(tuple(ids), []).append(i)
        seed = _seed(trainer.args.seed, step, rank, self._calls)
        self._calls += 1
        params = [self._params(len(r), seed + k) for k, r in enumerate(rows.values())]
        plan = self.plan(step, rank, training)
        with profiler if profiler is not None else contextlib.nullcontext():
            outputs = self.engine.generate([list(p) for p in rows], params, skip=plan)
        completions: list[Any] = [None] * len(prompts)
        for out, indices in zip(outputs, rows.values()):
            for index, completion in zip(indices, out.outputs):
                completions[index] = completion
        self._log(training, plan)
        return (
            prompts,
            [c.token_ids for c in completions],
            [[[lp] for lp in c.logprobs] for c in completions],
            [[[t] for t in c.token_ids] for c in completions],
        )

    def _params(self, n: int, seed: int) -> SamplingParams:
        args = self.trainer.args
        return SamplingParams(
            n=n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p or 0.0,
            max_tokens=args.max_completion_length, seed=seed,
        )

    def _log(self, training: bool, plan: LayerPlan) -> None:
        stats = self.engine.last_stats
        metrics = self.trainer._metrics["train" if training else "eval"]
        metrics["nreft/rollout_tokens_per_s"].append(stats.tokens_per_second)
        metrics["nreft/kv_cache_bytes"].append(float(stats.peak_kv_cache_bytes))
        metrics["nreft/num_skipped_layers"].append(float(len(plan.skipped)))
        if training:
            self.last_skipped = plan.skipped


class NestedGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with rollouts from the nreft engine: a layer-skipped behaviour model per optimizer
    step (`skip`: a SkipPolicy, a LayerPlan, layer ids, or None for the full model), its exact behaviour
    log-probs fed to TRL's importance-sampling correction. `engine_kwargs` go to `Engine`."""

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        *positional: Any,
        skip: SkipSpec = None,
        engine_kwargs: dict | None = None,
        allow_inexact_ratios: bool = False,
        **kwargs: Any,
    ):
        if args is None:
            raise ValueError("NestedGRPOTrainer needs a GRPOConfig (args=...) with use_vllm=False")
        check_config(args, allow_inexact_ratios)
        check_model(model, kwargs.get("peft_config"), skip)
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        check_model(self.model, None, skip)
        options = dict(engine_kwargs or {})
        if "prepack_weights" not in options:
            rows = args.per_device_train_batch_size * args.steps_per_generation
            options["prepack_weights"] = training_prepack(self.model, rows, args.max_completion_length)
        engine = Engine(self.model, **options)
        self.nreft_generation = EngineGeneration(self, engine, skip)
        if not self.vllm_importance_sampling_correction:
            logger.warning(
                "vllm_importance_sampling_correction is off: "
                "the nested rollouts' off-policy gap goes uncorrected"
            )
        # TRL's importance-sampling code runs where use_vllm is set; generation goes to the engine
        self.use_vllm = True
        self.vllm_mode = ENGINE_MODE
        self.vllm_generation = self.nreft_generation
        self._last_loaded_step = -1

    @property
    def engine(self) -> Engine:
        return self.nreft_generation.engine

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **inputs):
        """TRL's per-token log-probs (and entropies, detached) of the completion columns, with each prompt
        run once for all of its rows (one masked row per prompt: nreft_engine.train.logprobs). TRL's own
        per-row forward for a wrapped model (DDP) with gradients, images, an MoE aux loss, or rows that
        layout does not take."""
        plain = isinstance(model, PreTrainedModel) and (model is self.model or not torch.is_grad_enabled())
        found = None
        if plain and not compute_aux_loss and all(value is None for value in inputs.values()):
            found = prompt_groups(input_ids, attention_mask, logits_to_keep)
        with self.accelerator.autocast():
            packed = None if found is None else completion_hidden(model, found[0])
            if packed is None:
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                    compute_aux_loss, **inputs)
            hidden, targets = packed
            logps, entropy = head_scores(hidden, model.get_output_embeddings().weight, targets,
                                         LogitFilter(self.temperature), keep_bytes=HEAD_MEMORY,
                                         entropy=compute_entropy)
        groups, order = found
        lengths = [len(c) for _, cs in groups for c in cs]
        index = (torch.tensor([r for r, n in zip(order, lengths) for _ in range(n)], device=logps.device),
                 torch.tensor([i for n in lengths for i in range(n)], device=logps.device))

        def by_row(flat: torch.Tensor) -> torch.Tensor:
            return flat.new_zeros(input_ids.shape[0], logits_to_keep).index_put(index, flat)

        return by_row(logps), (by_row(entropy) if compute_entropy else None), None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log, plus the skip set of the latest training rollout since the last log."""
        generation = self.nreft_generation
        if self.model.training and generation.last_skipped is not None:
            logs["nreft/skipped_layers"] = " ".join(map(str, generation.last_skipped))
            generation.last_skipped = None
        super().log(logs, start_time)
