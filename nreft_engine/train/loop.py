"""The Nested-ReFT trainer: nested rollouts -> rewards -> full-model log-probs -> corrected GRPO step.

Each step draws a fresh skip set, samples G completions per prompt from the layer-skipped behaviour model,
scores them, recomputes their log-probs on the full model with autograd (several groups per micro-batch,
train/update.py), and takes an AdamW step. The engine reads the parameters in place, so the next rollout
uses the new weights.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from nreft_engine import Engine, SamplingParams
from nreft_engine.linear import training_prepack
from nreft_engine.train.checkpoint import load_checkpoint, model_fingerprint, resume_checkpoint
from nreft_engine.train.checkpoint_writer import CheckpointWriter
from nreft_engine.train.config import TrainConfig
from nreft_engine.train.data import Problem, Task, batch_at, render_prompts
from nreft_engine.train.logprobs import LogitFilter
from nreft_engine.train.metrics import MetricsLog, plot_metrics, read_metrics
from nreft_engine.train.rewards import RewardFn, compute_rewards
from nreft_engine.train.run_dir import (
    check_run_config,
    hold_run_dir,
    read_run_config,
    run_record,
    write_run_config,
)
from nreft_engine.train.skip_control import StepSkips
from nreft_engine.train.update import Updater, make_optimizer

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One step's samples: per prompt, its token ids and G completions with behaviour log-probs, rewards."""

    prompt_ids: list[list[int]]
    completions: list[list[list[int]]]
    behaviour_logprobs: list[list[list[float]]]
    rewards: torch.Tensor
    skipped_layers: tuple[int, ...]
    tokens_per_second: float


class Trainer:
    """Runs Nested-ReFT on `model` (trained in place); writes metrics, a plot, checkpoints to `output_dir`.

    `run_info` holds settings beyond the config that define the run (the CLI's dataset options); they are
    recorded with the config and must match when the run is resumed.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        task: Task,
        rewards: list[RewardFn],
        accuracy_fn: RewardFn,
        config: TrainConfig,
        output_dir: str,
        model_name: str,
        engine: Engine | None = None,
        kv_cache_memory: float = 0.1,
        run_info: dict | None = None,
    ):
        config.check()
        self.model, self.tokenizer, self.task, self.config = model, tokenizer, task, config
        self.rewards, self.accuracy_fn = rewards, accuracy_fn
        self.output_dir = output_dir
        self.engine = engine or self.make_engine(model, tokenizer, config, kv_cache_memory)
        self.skips = StepSkips(config, self.engine, tokenizer, task)  # checks the skip settings' fit
        self.record = run_record(config, model_name, task, rewards, accuracy_fn, run_info)
        self.fingerprint = model_fingerprint(model, model_name)
        self.optimizer = make_optimizer(model, config)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.reference = self._frozen_copy(model) if config.objective.kl_beta > 0 else None
        self.filter = LogitFilter(config.temperature, config.top_k, config.top_p, config.min_p)
        self.updater = Updater(model, self.optimizer, self.lr_scheduler, config, self.filter, self.reference)
        self.checkpoint_dir = os.path.join(output_dir, "checkpoints")
        self.checkpoints = CheckpointWriter(config.background_save)
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")

    @staticmethod
    def make_engine(model: torch.nn.Module, tokenizer, config: TrainConfig, kv_cache_memory: float) -> Engine:
        """The rollout engine over `model`'s own parameters, packing its weights where that is measured to
        pay for the re-pack after each update (training_prepack)."""
        rows = config.prompts_per_step * config.group_size
        return Engine(model, tokenizer, kv_cache_memory=kv_cache_memory,
                      prepack_weights=training_prepack(model, rows, config.max_tokens))

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to 10% of the peak over the run."""
        cfg = self.config
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps * cfg.ppo_epochs - cfg.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))

    @staticmethod
    def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
        return copy.deepcopy(model).requires_grad_(False)

    # --- phases -----------------------------------------------------------------------------------

    def rollout(self, step: int, problems: list[Problem]) -> Rollout:
        """Sample G completions per problem from the behaviour model (a fresh skip set) and score them."""
        cfg = self.config
        prompt_ids = render_prompts(self.tokenizer, problems, cfg.system_prompt)
        seed = cfg.seed * 1_000_003 + step
        outs = self.engine.generate(prompt_ids, cfg.sampling_params(seed), skip=self.skips.plan(seed))
        flat = [(o, c, p) for o, p in zip(outs, problems) for c in o.outputs]
        rewards = compute_rewards(
            self.rewards,
            prompts=[self.tokenizer.decode(o.prompt_token_ids) for o, _, _ in flat],
            completions=[c.text for _, c, _ in flat],
            completion_ids=[c.token_ids for _, c, _ in flat],
            answer=[p.answer for _, _, p in flat],
        )
        return Rollout(
            prompt_ids=prompt_ids,
            completions=[[c.token_ids for c in o.outputs] for o in outs],
            behaviour_logprobs=[[c.logprobs for c in o.outputs] for o in outs],
            rewards=torch.tensor(rewards, dtype=torch.float32).view(len(outs), cfg.group_size),
            skipped_layers=outs[0].skipped_layers if outs else (),
            tokens_per_second=self.engine.last_stats.tokens_per_second,
        )

    def update(self, rollout: Rollout) -> dict:
        """PPO epochs of the corrected GRPO loss over the rollout, in micro-batches of prompt groups."""
        r = rollout
        return self.updater(r.prompt_ids, r.completions, r.behaviour_logprobs, r.rewards)

    def evaluate(self, problems: list[Problem] | None = None) -> dict[str, float]:
        """Held-out accuracy (and mean training reward) of the FULL model, no layer skipped, greedy."""
        problems = problems if problems is not None else self.task.heldout
        prompt_ids = render_prompts(self.tokenizer, problems, self.config.system_prompt)
        params = SamplingParams(n=1, temperature=0.0, max_tokens=self.config.eval_max_tokens)
        outs = self.engine.generate(prompt_ids, params, skip=None)
        columns = {
            "prompts": [self.tokenizer.decode(o.prompt_token_ids) for o in outs],
            "completions": [o.outputs[0].text for o in outs],
            "completion_ids": [o.outputs[0].token_ids for o in outs],
            "answer": [p.answer for p in problems],
        }
        correct = compute_rewards([self.accuracy_fn], **columns)
        rewards = compute_rewards(self.rewards, **columns)
        n = max(1, len(problems))
        return {"accuracy": sum(1.0 for s in correct if s >= 1.0) / n, "reward_mean": sum(rewards) / n}

    def rollout_throughput(self, skip_ratio: float) -> dict[str, float]:
        """Rollout tokens/s of the full model and of the nested model at `skip_ratio` on the same workload.

        Both sample the first step's prompts with the training settings and ignore EOS: they do the same work.
        """
        cfg = self.config
        prompt_ids = render_prompts(self.tokenizer, batch_at(self.task, 0, cfg.prompts_per_step, cfg.seed),
                                    cfg.system_prompt)
        params = cfg.sampling_params(cfg.seed, ignore_eos=True)
        result = {}
        for name, skip in (("full", None), ("nested", cfg.skip_policy(skip_ratio, cfg.seed))):
            self.engine.generate(prompt_ids, params, skip=skip)
            result[f"{name}_tokens_per_s"] = self.engine.last_stats.tokens_per_second
        return result

    # --- the run ----------------------------------------------------------------------------------

    def train(self, resume: bool = True, allow_config_change: bool = False) -> dict:
        """Run (or resume) the configured steps, holding the output dir's lock; returns the metrics of the
        run's steps and evaluations. A resumed run must have the recorded config (see run_dir.py)."""
        cfg = self.config
        with hold_run_dir(self.output_dir):
            start = self._resume(resume, allow_config_change)
            # the first evaluation also checks the reward functions, before anything is written
            first_eval = self.evaluate() if start == 0 else None
            write_run_config(self.output_dir, self.record)
            log = MetricsLog(self.metrics_path, resume_step=start)
            if first_eval is not None:
                log.write({"type": "eval", "step": 0, **first_eval})
            try:
                self._run_steps(start, log)
            finally:  # a checkpoint in flight is finished before the run's lock is released
                self._finish_checkpoint(failing=sys.exc_info()[0] is not None)
            records = read_metrics(self.metrics_path)
            if not any(r["type"] == "eval" and r["step"] == cfg.steps for r in records):
                log.write({"type": "eval", "step": cfg.steps, **self.evaluate()})
                records = read_metrics(self.metrics_path)
            plot_metrics(records, os.path.join(self.output_dir, "metrics.png"))
        return {"records": records}

    def _resume(self, resume: bool, allow_config_change: bool) -> int:
        """Check the recorded config, load the newest intact checkpoint if any; return the step to start."""
        if changes := check_run_config(self.output_dir, self.record, allow_config_change):
            logger.warning("continuing the run in %s with changed settings: %s", self.output_dir, changes)
        found = resume_checkpoint(self.checkpoint_dir, self.config.steps, resume)
        if found is None:
            return 0
        if read_run_config(self.output_dir) is None:
            logger.warning("%s has checkpoints but no recorded config (an older nreft-engine's run): "
                           "resuming without checking it", self.output_dir)
        start = load_checkpoint(found, self.model, self.optimizer, self.lr_scheduler, self.fingerprint,
                                self.skips.stateful())
        logger.info("resumed from %s (step %d)", found, start)
        return start

    def _run_steps(self, start: int, log: MetricsLog) -> None:
        """Steps `start`..steps with their periodic evaluations and checkpoints (always one at the end)."""
        cfg = self.config
        bar = tqdm(range(start, cfg.steps), desc="nested-reft", unit="step", initial=start, total=cfg.steps)
        self.skips.refresh(start, log.write)  # the layer importance of the first step (once a run)
        for step in bar:
            record = self.train_step(step)
            log.write(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.2f}",
                            tok_s=f"{record['rollout_tokens_per_s']:.0f}")
            done = step + 1
            self.skips.refresh(done, log.write)  # a re-measurement, before the checkpoint that saves it
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                log.write({"type": "eval", "step": done, **self.evaluate()})
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                self.save(done)

    def save(self, done: int) -> None:
        """Checkpoint the run after `done` steps (model, optimizer, schedule, skip-control state); with
        background_save, written by a thread while the run goes on."""
        self.checkpoints.save(self.checkpoint_dir, done, self.model, self.optimizer, self.lr_scheduler,
                              self.fingerprint, self.config.keep_checkpoints, config=self.record,
                              stateful=self.skips.stateful())

    def _finish_checkpoint(self, failing: bool) -> None:
        """Wait for the checkpoint in flight; its error is raised, or only logged while another one is."""
        try:
            self.checkpoints.wait()
        except OSError:
            if not failing:
                raise
            logger.exception("the last checkpoint could not be written")

    def train_step(self, step: int) -> dict:
        """One rollout + update; returns the step's metrics record."""
        cfg = self.config
        t0 = time.perf_counter()
        rollout = self.rollout(step, batch_at(self.task, step, cfg.prompts_per_step, cfg.seed))
        t1 = time.perf_counter()
        record = self.update(rollout)
        t2 = time.perf_counter()
        self.skips.observe(record)  # the adaptive skip count (if any) moves for the next step
        lengths = [len(c) for group in rollout.completions for c in group]
        return {
            "type": "train",
            "step": step + 1,
            "reward_mean": rollout.rewards.mean().item(),
            "reward_std": rollout.rewards.std(unbiased=False).item(),
            "completion_len_mean": sum(lengths) / max(1, len(lengths)),
            "skipped_layers": list(rollout.skipped_layers),
            "num_skipped_layers": len(rollout.skipped_layers),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "rollout_tokens_per_s": rollout.tokens_per_second,
            "train_tokens_per_s": record["train_tokens"] / (t2 - t1) if t2 > t1 else 0.0,
            "rollout_s": t1 - t0,
            "train_s": t2 - t1,
            **record,
        }

