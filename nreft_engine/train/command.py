"""`nreft train`: the arguments (defaults = the README's main job) and the run with its summary table."""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from nreft_engine.train.corrections import CORRECTIONS, CorrectionConfig
from nreft_engine.train.data import DATASETS, INSTRUCTION, load_task
from nreft_engine.train.objectives import AGGREGATIONS, ObjectiveConfig
from nreft_engine.train.rewards import math_verify_reward, numeric_match, resolve_reward

logger = logging.getLogger(__name__)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `nreft train` options; the defaults run the main job on 2 CPU cores in about 10 minutes."""
    a = parser.add_argument
    a("--model", default="smollm2-135m-instruct", help="embedded name, HF dir, GGUF file or hub id")
    a("--dataset", choices=DATASETS, default="arithmetic")
    a("--data-path", default=None, help="local .json/.jsonl file or hub dataset id (not for arithmetic)")
    a("--difficulty", type=int, default=1, help="arithmetic: 1 = a+b up to 20, 2 = a±b up to 99, 3 = three terms")
    a("--num-heldout", type=int, default=200, help="held-out problems for evaluation")
    a("--reward", action="append", default=None,
      help="numeric | math_verify | module:function (TRL signature); repeat to sum several (default: numeric)")
    a("--system-prompt", default=INSTRUCTION)
    a("--steps", type=int, default=20)
    a("--prompts-per-step", type=int, default=8)
    a("--group-size", type=int, default=8, help="samples per prompt (G)")
    a("--max-tokens", type=int, default=12)
    a("--temperature", type=float, default=0.7)
    a("--top-p", type=float, default=1.0)
    a("--top-k", type=int, default=0)
    a("--min-p", type=float, default=0.0)
    a("--skip-ratio", type=float, default=0.034,
      help="fraction of layers the behaviour model skips per step. Default 0.034 = 1 of SmolLM2-135M's 30 layers: "
           "a 135M model tolerates far less skipping than the paper's larger models (at 0.25 its samples are "
           "garbage and every reward is 0; one skipped middle layer keeps about half the full model's reward)")
    a("--protect-first", type=int, default=4)
    a("--protect-last", type=int, default=4)
    a("--lr", type=float, default=3e-5)
    a("--weight-decay", type=float, default=0.0)
    a("--warmup-steps", type=int, default=0)
    a("--grad-clip", type=float, default=1.0)
    a("--ppo-epochs", type=int, default=1)
    a("--no-std", action="store_true", help="Dr.GRPO advantages (no division by the group std)")
    a("--aggregation", choices=AGGREGATIONS, default="token")
    a("--eps-low", type=float, default=0.2)
    a("--eps-high", type=float, default=0.28)
    a("--kl-beta", type=float, default=0.0, help="k3 KL to the frozen initial model")
    a("--correction", default="tis", help=f"one of {', '.join(CORRECTIONS)}")
    a("--is-clip", type=float, default=2.0, help="C for tis and seq_geo truncation")
    a("--trace-lambda", type=float, default=1.0, help="λ for retrace")
    a("--mask-low", type=float, default=0.5)
    a("--mask-high", type=float, default=2.0)
    a("--seq-mode", choices=("truncate", "mask"), default="truncate", help="seq_geo: truncate or mask")
    a("--eval-every", type=int, default=0, help="also evaluate every N steps (0: before and after only)")
    a("--eval-max-tokens", type=int, default=12)
    a("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    a("--keep-checkpoints", type=int, default=2)
    a("--output-dir", default="runs/nested-reft")
    a("--no-resume", action="store_true", help="fail instead of resuming when the output dir has checkpoints")
    a("--throughput-skip-ratio", type=float, default=0.25,
      help="skip ratio of the nested-vs-full rollout tokens/s comparison in the summary")
    a("--kv-cache-memory", type=float, default=0.1, help="fraction of free memory (<=1) or bytes")
    a("--chunk-size", type=int, default=1024, help="tokens per LM-head chunk when recomputing log-probs")
    a("--seed", type=int, default=0)


def run_train(args: argparse.Namespace) -> int:
    """Build everything from `args`, train, and print the summary table. Returns the exit code."""
    from nreft_engine import Engine
    from nreft_engine.models.loader import load_model
    from nreft_engine.train.loop import TrainConfig, Trainer

    config = TrainConfig(
        steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, skip_ratio=args.skip_ratio, protect_first=args.protect_first,
        protect_last=args.protect_last, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip, ppo_epochs=args.ppo_epochs,
        objective=ObjectiveConfig(not args.no_std, args.aggregation, args.eps_low, args.eps_high, args.kl_beta),
        correction=CorrectionConfig(args.correction, args.is_clip, args.trace_lambda, args.mask_low, args.mask_high,
                                    args.seq_mode),
        eval_every=args.eval_every, eval_max_tokens=args.eval_max_tokens, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, seed=args.seed, chunk_size=args.chunk_size,
        system_prompt=args.system_prompt,
    )
    rewards = [resolve_reward(r) for r in (args.reward or ["numeric"])]
    task = load_task(args.dataset, args.data_path, seed=args.seed, difficulty=args.difficulty,
                     num_heldout=args.num_heldout)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; training needs one for prompts and rewards")
    memory = args.kv_cache_memory if args.kv_cache_memory <= 1 else int(args.kv_cache_memory)
    engine = Engine(model, tokenizer, kv_cache_memory=memory)
    accuracy = math_verify_reward if args.dataset == "math" else numeric_match
    trainer = Trainer(model, tokenizer, task, rewards, accuracy, config, args.output_dir, args.model, engine=engine)
    result = trainer.train(resume=not args.no_resume)
    throughput = trainer.rollout_throughput(args.throughput_skip_ratio)
    print(summary_table(result["records"], throughput, args, time.perf_counter() - start))
    return 0


def summary_table(records: list[dict], throughput: dict[str, float], args: argparse.Namespace, seconds: float) -> str:
    """The end-of-run table: held-out accuracy before/after, nested vs full rollout tokens/s, output paths."""
    evals = sorted((r for r in records if r["type"] == "eval"), key=lambda r: r["step"])
    steps = [r for r in records if r["type"] == "train"]
    train_tps = sum(r["rollout_tokens_per_s"] for r in steps) / max(1, len(steps))
    full, nested = throughput["full_tokens_per_s"], throughput["nested_tokens_per_s"]
    out = os.path.abspath(args.output_dir)
    rows = [
        ("model / task", f"{args.model} / {args.dataset} ({args.num_heldout} held-out)"),
        ("held-out accuracy before (full model, greedy)", f"{evals[0]['accuracy']:.1%}"),
        ("held-out accuracy after  (full model, greedy)", f"{evals[-1]['accuracy']:.1%}"),
        ("rollout tokens/s, full model", f"{full:.1f}"),
        (f"rollout tokens/s, nested (skip {args.throughput_skip_ratio:g})",
         f"{nested:.1f}  ({nested / full if full else float('nan'):.2f}x)"),
        (f"rollout tokens/s during training (skip {args.skip_ratio:g})", f"{train_tps:.1f}"),
        ("train reward, first -> last step",
         f"{steps[0]['reward_mean']:.2f} -> {steps[-1]['reward_mean']:.2f}" if steps else "-"),
        ("wall time", f"{seconds / 60:.1f} min"),
        ("metrics", os.path.join(out, "metrics.jsonl")),
        ("plot", os.path.join(out, "metrics.png")),
        ("checkpoints", os.path.join(out, "checkpoints")),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 40)
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])
