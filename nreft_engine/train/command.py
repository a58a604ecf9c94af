"""`nreft train`: the arguments (defaults = the README's main job) and the run with its summary table."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from nreft_engine.cli_args import add_model_arguments
from nreft_engine.models.loader import load_model
from nreft_engine.train.config import UPDATE_DTYPES, UPDATE_PATHS, TrainConfig
from nreft_engine.train.corrections import CORRECTIONS, CorrectionConfig
from nreft_engine.train.data import DATASETS, load_task
from nreft_engine.train.loop import Trainer
from nreft_engine.train.objectives import AGGREGATIONS, ObjectiveConfig
from nreft_engine.train.rewards import math_verify_reward, numeric_match, resolve_reward
from nreft_engine.train.run_dir import CHANGEABLE, check_run_config, hold_run_dir, run_record


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `nreft train` options; TrainConfig's defaults run the main job (~10 min, 2 CPU cores)."""
    config = TrainConfig()
    a = parser.add_argument
    add_model_arguments(parser, dtype=False)
    a("--dataset", choices=DATASETS, default="arithmetic")
    a("--data-path", default=None, help="local .json/.jsonl file or hub dataset id (not for arithmetic)")
    a("--difficulty", type=int, default=1,
      help="arithmetic: 1 = a+b up to 20, 2 = a±b up to 99, 3 = three terms")
    a("--num-heldout", type=int, default=200, help="held-out problems for evaluation")
    a("--reward", action="append", default=None,
      help="numeric | math_verify | module:function: imports that module (from the current folder or the "
           "installed packages, running its code) and calls the function on each batch of completions (TRL "
           "signature); repeat to sum several (default: numeric)")
    a("--system-prompt", default=config.system_prompt)
    a("--steps", type=int, default=config.steps,
      help="optimizer steps of the run; the cosine LR schedule spans them, so a resumed run takes a larger "
           "value (extending it) only with --allow-config-change")
    a("--prompts-per-step", type=int, default=config.prompts_per_step)
    a("--group-size", type=int, default=config.group_size, help="samples per prompt (G)")
    a("--max-tokens", type=int, default=config.max_tokens)
    a("--temperature", type=float, default=config.temperature)
    a("--top-p", type=float, default=config.top_p)
    a("--top-k", type=int, default=config.top_k)
    a("--min-p", type=float, default=config.min_p)
    a("--skip-ratio", type=_skip_ratio, default=config.skip_ratio,
      help="fraction of layers the behaviour model skips per step, or 'auto' (the default): adapt the "
           "number of skipped layers after each step to hold --target-ess (starting at --min-skip-layers, "
           "or 1 if that is 0). A 135M model tolerates far less skipping than the paper's larger models (at "
           "0.25 its samples are garbage and every reward is 0), so the count is best left to the ESS")
    a("--protect-first", type=int, default=config.protect_first)
    a("--protect-last", type=int, default=config.protect_last)
    _add_auto_skip_arguments(parser)
    a("--lr", type=float, default=config.lr)
    a("--weight-decay", type=float, default=config.weight_decay)
    a("--warmup-steps", type=int, default=config.warmup_steps)
    a("--grad-clip", type=float, default=config.grad_clip)
    a("--ppo-epochs", type=int, default=config.ppo_epochs)
    _add_loss_arguments(parser, config.objective, config.correction)
    a("--eval-every", type=int, default=config.eval_every,
      help="also evaluate every N steps (0: before and after only)")
    a("--eval-max-tokens", type=int, default=config.eval_max_tokens)
    _add_run_dir_arguments(parser, config)
    a("--throughput-skip-ratio", type=float, default=0.25,
      help="skip ratio of the nested-vs-full rollout tokens/s comparison in the summary")
    a("--chunk-size", type=int, default=config.chunk_size,
      help="tokens per LM-head chunk when recomputing log-probs")
    _add_update_arguments(parser, config)
    a("--seed", type=int, default=config.seed)


def _add_run_dir_arguments(parser: argparse.ArgumentParser, config: TrainConfig) -> None:
    """Options of the run's output folder: checkpoints, resuming, the lock."""
    a = parser.add_argument
    a("--save-every", type=int, default=config.save_every,
      help="checkpoint every N steps, always at the end (0: only there); a rerun resumes from the newest "
           "intact one (about 2.5 s to write for the 135M model)")
    a("--keep-checkpoints", type=int, default=config.keep_checkpoints, help="0 keeps all")
    a("--background-save", action=argparse.BooleanOptionalAction, default=config.background_save,
      help="write each checkpoint from a copy of the state in memory while training goes on (one at a "
           "time; the run ends when the last one is on disk); it pays off where the CPU idles during "
           "the steps, not on a CPU that training keeps busy")
    a("--output-dir", default="runs/nested-reft",
      help="metrics, plot, checkpoints and the run's config; one run at a time (locked)")
    a("--no-resume", action="store_true", help="fail instead of resuming when the output dir has checkpoints")
    a("--allow-config-change", action="store_true",
      help=f"resume even though some of {', '.join(CHANGEABLE)} changed (steps: extending the run stretches "
           "its LR schedule from the next step on); any other change of the recorded config is refused")


def _add_update_arguments(parser: argparse.ArgumentParser, config: TrainConfig) -> None:
    """Options of the update phase's speed (train/update.py); none changes the loss but --update-dtype."""
    a = parser.add_argument
    a("--update-path", choices=UPDATE_PATHS, default=config.update_path,
      help="packed: several prompt groups per forward (each one block-masked row), LM-head logits kept "
           "within --head-memory-mb, fused AdamW; per-group: the earlier update (one group per forward, LM "
           "head always recomputed, per-parameter AdamW), same loss and gradients, kept to compare")
    a("--max-update-tokens", type=int, default=config.max_update_tokens,
      help="packed: prompt + completion tokens of the groups run in one forward/backward (a larger group "
           "runs alone)")
    a("--head-memory-mb", type=int, default=config.head_memory_mb,
      help="packed: MiB of fp32 LM-head logits kept for backward; chunks past it are recomputed (0: all)")
    a("--update-dtype", choices=UPDATE_DTYPES, default=config.update_dtype,
      help="packed: bfloat16 autocasts the update's forwards (fp32 master weights and optimizer); it changes "
           "the recomputed log-probs, hence the importance ratios, by bf16 rounding")


def _skip_ratio(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


def _add_auto_skip_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `--skip-ratio auto` and `--skip-importance` (train/skip_control.py); None unless used."""
    a = parser.add_argument
    a("--target-ess", type=float, default=None,
      help="with --skip-ratio auto: the ESS fraction of the importance weights (logged as ess_fraction) to "
           "hold (default 0.6). Each step one more layer is skipped next if ESS > target + band, one fewer "
           "if ESS < target - band, else the count holds")
    a("--ess-band", type=float, default=None,
      help="with --skip-ratio auto: the hysteresis band (default 0.05)")
    a("--min-skip-layers", type=int, default=None, help="with --skip-ratio auto: the fewest skipped layers "
      "(default 0)")
    a("--max-skip-layers", type=int, default=None, help="with --skip-ratio auto: the most skipped layers "
      "(default: every layer outside --protect-first/--protect-last)")
    a("--skip-importance", action=argparse.BooleanOptionalAction, default=TrainConfig.skip_importance,
      help="measure each layer's importance (block influence: mean 1 - cos of the residual stream before and "
           "after it) on calibration prompts before the first step, and draw the skip sets weighted towards "
           "the least important layers (with a fixed --skip-ratio or auto; on by default); logged in "
           "metrics.jsonl as a record of type importance. --no-skip-importance: uniform draws")
    a("--skip-temperature", type=float, default=None,
      help="with --skip-importance: the draws' temperature, layer i weighted by exp(-importance_i / (T * "
           "mean importance)); towards 0 the least important layers, large T uniform (default 0.1)")
    a("--importance-every", type=int, default=None,
      help="with --skip-importance: measure again every N steps (default 0: once, before the first step)")
    a("--importance-prompts", type=int, default=None,
      help="with --skip-importance: the calibration prompts, the first N train prompts (default 64)")


def _add_loss_arguments(
    parser: argparse.ArgumentParser, objective: ObjectiveConfig, correction: CorrectionConfig
) -> None:
    """Options of the GRPO objective and the off-policy correction, defaulting to the given configs."""
    a = parser.add_argument
    a("--no-std", dest="scale_std", action="store_false", default=objective.scale_std,
      help="Dr.GRPO advantages (no division by the group std)")
    a("--aggregation", choices=AGGREGATIONS, default=objective.aggregation)
    a("--eps-low", type=float, default=objective.eps_low)
    a("--eps-high", type=float, default=objective.eps_high)
    a("--kl-beta", type=float, default=objective.kl_beta, help="k3 KL to the frozen initial model")
    a("--correction", default=correction.name, help=f"one of {', '.join(CORRECTIONS)}")
    a("--is-clip", type=float, default=correction.clip, help="C for tis and seq_geo truncation")
    a("--trace-lambda", type=float, default=correction.trace_lambda, help="λ for retrace")
    a("--mask-low", type=float, default=correction.mask_low)
    a("--mask-high", type=float, default=correction.mask_high)
    a("--seq-mode", choices=("truncate", "mask"), default=correction.seq_mode,
      help="seq_geo: truncate or mask")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `nreft train` arguments (each of its fields is the option of that name)."""
    flat = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name not in ("objective", "correction")}
    objective = ObjectiveConfig(scale_std=args.scale_std, aggregation=args.aggregation, eps_low=args.eps_low,
                                eps_high=args.eps_high, kl_beta=args.kl_beta)
    correction = CorrectionConfig(name=args.correction, clip=args.is_clip, trace_lambda=args.trace_lambda,
                                  mask_low=args.mask_low, mask_high=args.mask_high, seq_mode=args.seq_mode)
    return TrainConfig(**flat, objective=objective, correction=correction)


def run_train(args: argparse.Namespace) -> int:
    """Check `args`, lock the output dir, build everything, train, print the summary; returns the exit code.

    Every option is checked before the model loads; the skip ratios' fit to its layers right after it.
    """
    config = train_config(args)
    config.check(cli=True)
    if not 0 <= args.throughput_skip_ratio < 1:
        raise ValueError(f"--throughput-skip-ratio {args.throughput_skip_ratio}: must be in [0, 1)")
    rewards = [resolve_reward(r) for r in (args.reward or ["numeric"])]
    task = load_task(args.dataset, args.data_path, seed=args.seed, difficulty=args.difficulty,
                     num_heldout=args.num_heldout)
    accuracy = math_verify_reward if args.dataset == "math" else numeric_match
    run_info = {k: getattr(args, k) for k in ("dataset", "data_path", "difficulty", "num_heldout")}
    with hold_run_dir(args.output_dir):
        record = run_record(config, args.model, task, rewards, accuracy, run_info)
        check_run_config(args.output_dir, record, args.allow_config_change)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        model, tokenizer = load_model(args.model, dtype=torch.float32)
        if tokenizer is None:
            raise ValueError(f"model {args.model!r} has no tokenizer; training needs one (prompts, rewards)")
        engine = Trainer.make_engine(model, tokenizer, config, args.kv_cache_memory)
        config.skip_policy(args.throughput_skip_ratio, config.seed).num_skipped(engine.num_layers)
        trainer = Trainer(model, tokenizer, task, rewards, accuracy, config, args.output_dir, args.model,
                          engine=engine, run_info=run_info)
        result = trainer.train(resume=not args.no_resume, allow_config_change=args.allow_config_change)
        throughput = trainer.rollout_throughput(args.throughput_skip_ratio)
    print(summary_table(result["records"], throughput, args, time.perf_counter() - start))
    return 0


def summary_table(
    records: list[dict], throughput: dict[str, float], args: argparse.Namespace, seconds: float
) -> str:
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
        (f"rollout tokens/s during training (skip {_skip_text(args.skip_ratio, steps)})", f"{train_tps:.1f}"),
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


def _skip_text(ratio: float | str, steps: list[dict]) -> str:
    """The training skip ratio, or for auto the mean number of skipped layers of the steps."""
    if ratio != "auto":
        return f"{ratio:g}"
    counts = [r.get("num_skipped_layers", len(r.get("skipped_layers", []))) for r in steps]
    return f"auto: {sum(counts) / max(1, len(counts)):.1f} layers on average"
