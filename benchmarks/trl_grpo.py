"""TRL's GRPOTrainer (HF generate) against NestedGRPOTrainer (engine rollouts), one process, one workload.

The main job's workload: the embedded SmolLM2-135M-Instruct in fp32, the synthetic arithmetic task (seed 0,
200 held-out problems), 8 prompts x 8 samples per step, 12 new tokens, T 0.7, AdamW lr 3e-5 (cosine to
10%), DAPO loss with eps 0.2 / 0.28. Each system trains a fresh copy of the model for `--steps` steps;
the nested runs correct with TRL's token-level truncated importance sampling (C = 2, the main job's `tis`).
Prints seconds per step split into rollout (TRL's `_generate`), scoring (rewards, log-prob recompute) and
update, and the held-out greedy accuracy of the full model before and after; writes JSON.

    python benchmarks/trl_grpo.py [--steps 20] [--systems trl nested-0 nested-0.034]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from nreft_engine import Engine, SamplingParams, SkipPolicy
from nreft_engine.integrations.trl import NestedGRPOTrainer
from nreft_engine.models.loader import DEFAULT_MODEL, load_model
from nreft_engine.train.config import TrainConfig
from nreft_engine.train.data import arithmetic_task, render_prompts
from nreft_engine.train.rewards import numeric_match

MAIN_JOB = TrainConfig()


def numeric_reward(prompts, completions, completion_ids, answer, **columns) -> list[float]:
    """The main job's reward on TRL's conversational completions (a list of messages per completion)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return numeric_match(prompts=prompts, completions=texts, completion_ids=completion_ids, answer=answer)


def heldout_accuracy(model, tokenizer, task) -> float:
    """Greedy accuracy of the full model on the held-out problems (the main job's evaluation)."""
    engine = Engine(model, tokenizer, kv_cache_memory=1 << 28)
    prompts = render_prompts(tokenizer, task.heldout, MAIN_JOB.system_prompt)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAIN_JOB.eval_max_tokens))
    answers = [p.answer for p in task.heldout]
    scores = numeric_reward(None, [o.outputs[0].text for o in outs], None, answers)
    return sum(s >= 1.0 for s in scores) / len(scores)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def timed(trainer, name: str, totals: dict[str, float]) -> None:
    """Add the time spent in `trainer.<name>` to totals[name]."""
    method = getattr(trainer, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(trainer, name, wrapper)


def run(system: str, steps: int, task, out_dir: str) -> dict:
    model, tokenizer = load_model(DEFAULT_MODEL, dtype=torch.float32)
    before = heldout_accuracy(model, tokenizer, task)
    system_turn = {"role": "system", "content": MAIN_JOB.system_prompt}
    rows = [[system_turn, {"role": "user", "content": p.question}] for p in task.train]
    dataset = Dataset.from_dict({"prompt": rows, "answer": [p.answer for p in task.train]})
    args = GRPOConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=MAIN_JOB.prompts_per_step
        * MAIN_JOB.group_size, num_generations=MAIN_JOB.group_size, max_completion_length=MAIN_JOB.max_tokens,
        temperature=MAIN_JOB.temperature, learning_rate=MAIN_JOB.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
        beta=0.0, max_grad_norm=MAIN_JOB.grad_clip, use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to="none", logging_steps=1, save_strategy="no", seed=0,
        vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0,
    )
    common = dict(model=model.train(), reward_funcs=numeric_reward, args=args, train_dataset=dataset,
                  processing_class=tokenizer)
    if system == "trl":
        trainer = GRPOTrainer(**common)
    else:
        ratio = float(system.split("-", 1)[1])
        skip = SkipPolicy(ratio, MAIN_JOB.protect_first, MAIN_JOB.protect_last, seed=0) if ratio else None
        trainer = NestedGRPOTrainer(**common, skip=skip, engine_kwargs={"kv_cache_memory": 1 << 28})
    timer, totals = StepTimer(), {"_generate": 0.0, "_generate_and_score_completions": 0.0}
    trainer.add_callback(timer)
    for name in totals:
        timed(trainer, name, totals)
    trainer.train()
    step = sum(timer.seconds) / len(timer.seconds)
    rollout = totals["_generate"] / steps
    scoring = totals["_generate_and_score_completions"] / steps - rollout
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    return {
        "system": system, "steps": steps, "seconds_per_step": step, "rollout_s": rollout,
        "scoring_s": scoring, "update_s": step - rollout - scoring, "accuracy_before": before,
        "accuracy_after": heldout_accuracy(model.eval(), tokenizer, task),
        "reward_first": rewards[0], "reward_last": rewards[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    # the main job adapts its skip count; NestedGRPOTrainer takes a fixed ratio: 1 of the 30 layers
    parser.add_argument("--systems", nargs="+", default=["trl", "nested-0", "nested-0.034"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "trl_grpo.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    task = arithmetic_task(0, difficulty=1, num_heldout=200)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for system in args.systems:
            results.append(run(system, args.steps, task, os.path.join(tmp, system)))
            print(json.dumps(results[-1]), flush=True)
    base = next((r["seconds_per_step"] for r in results if r["system"] == "trl"), None)
    print(f"{'system':14} {'s/step':>7} {'x TRL':>6} {'rollout':>8} {'scoring':>8} {'update':>7} "
          f"{'acc before':>10} {'acc after':>9} {'reward':>12}")
    for r in results:
        speedup = f"{base / r['seconds_per_step']:6.2f}" if base else "     -"
        print(f"{r['system']:14} {r['seconds_per_step']:7.2f} {speedup} {r['rollout_s']:8.2f} "
              f"{r['scoring_s']:8.2f} {r['update_s']:7.2f} {r['accuracy_before']:10.1%} "
              f"{r['accuracy_after']:9.1%} {r['reward_first']:5.2f} -> {r['reward_last']:.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "rows": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
