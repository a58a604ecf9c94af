"""The update phase of the main job: the per-group path against the packed path, interleaved in one run.

Two Trainers of the main job's config (`nreft train --model smollm2-135m-instruct`: SmolLM2-135M fp32, the
arithmetic task, 8 prompts x 8 samples x 12 tokens) train copies of the same weights, one per update path.
Every phase of the main job runs for both, alternating which goes first: the evaluation before, the layer
importance, each step (rollout + update), the checkpoints, the evaluation after, the summary's throughput
comparison. Prints the
seconds of each path and the ratios (update phase, steps, the whole job); with --profile, a torch.profiler
table of one update step per path; with --end-to-end N, the wall time of `nreft train` itself per path
(each run a process of its own, N runs per path). Writes JSON.

    python benchmarks/update_phase.py [--steps 20] [--profile] [--end-to-end 1]
                                      [--out benchmarks/results/update_phase.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from nreft_engine.models.loader import DEFAULT_MODEL, load_model
from nreft_engine.train.config import TrainConfig
from nreft_engine.train.data import batch_at, load_task
from nreft_engine.train.loop import Trainer
from nreft_engine.train.rewards import numeric_match

PATHS = ("per-group", "packed")


def build_trainers(steps: int, out_dir: str, settings: dict) -> dict[str, Trainer]:
    """One main-job Trainer per update path, over copies of the same initial weights."""
    torch.manual_seed(0)
    model, tokenizer = load_model(DEFAULT_MODEL, dtype=torch.float32)
    task = load_task("arithmetic", seed=0, difficulty=1, num_heldout=200)
    trainers = {}
    for path in PATHS:
        config = TrainConfig(steps=steps, update_path=path, **(settings if path == "packed" else {}))
        trainers[path] = Trainer(copy.deepcopy(model), tokenizer, task, [numeric_match], numeric_match,
                                 config, f"{out_dir}/{path}", DEFAULT_MODEL)
    return trainers


def interleaved(trainers: dict[str, Trainer], turn: int, phase: Callable[[Trainer], object],
                seconds: dict[str, float], by_phase: dict[str, dict[str, float]] | None = None,
                name: str = "") -> dict[str, object]:
    """Run `phase` for each path (the order flips with `turn`), adding its wall time to `seconds` (and to
    `by_phase[path][name]`)."""
    results = {}
    for path in (PATHS if turn % 2 == 0 else PATHS[::-1]):
        start = time.perf_counter()
        results[path] = phase(trainers[path])
        elapsed = time.perf_counter() - start
        seconds[path] += elapsed
        if by_phase is not None:
            by_phase[path][name] = by_phase[path].get(name, 0.0) + elapsed
    return results


def main_job(trainers: dict[str, Trainer]) -> dict:
    """The main job's phases for both paths; per path the job's wall time, its steps' rollout/update s and
    the seconds of each kind of phase."""
    cfg = trainers[PATHS[0]].config
    wall: dict[str, float] = defaultdict(float)
    phases: dict[str, dict[str, float]] = defaultdict(dict)
    per_step: dict[str, list[dict]] = defaultdict(list)
    accuracy: dict[str, list[float]] = defaultdict(list)

    def run(name: str, phase: Callable[[Trainer], object]) -> dict[str, object]:
        return interleaved(trainers, turn, phase, wall, phases, name)

    turn = 0
    for path, result in run("evaluations", Trainer.evaluate).items():
        accuracy[path].append(result["accuracy"])
    turn += 1
    # the layer importance before the first step (and its re-measurements), as Trainer.train does
    run("layer importance", lambda t: t.skips.refresh(0, lambda record: None))
    for step in range(cfg.steps):
        for path, record in run("steps", lambda t: t.train_step(step)).items():
            per_step[path].append(record)
        turn += 1
        done = step + 1
        run("layer importance", lambda t: t.skips.refresh(done, lambda record: None))
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            run("checkpoints", lambda t: t.save(done))
    run("checkpoints", lambda t: t.checkpoints.wait())  # the run ends when its last checkpoint is on disk
    for path, result in run("evaluations", Trainer.evaluate).items():
        accuracy[path].append(result["accuracy"])
    turn += 1
    run("throughput probe", lambda t: t.rollout_throughput(0.25))

    def total(path: str, key: str) -> float:
        return sum(r[key] for r in per_step[path])

    return {path: {"wall_s": wall[path], "rollout_s": total(path, "rollout_s"),
                   "update_s": total(path, "train_s"), "phases_s": phases[path],
                   "micro_batches_per_step": total(path, "update_micro_batches") / cfg.steps,
                   "trained_groups_per_step": total(path, "trained_groups") / cfg.steps,
                   "accuracy_before_after": accuracy[path],
                   "update_s_per_step": [round(r["train_s"], 3) for r in per_step[path]]}
            for path in PATHS}


def end_to_end(steps: int, repeats: int, out_dir: str) -> dict[str, list[float]]:
    """Wall seconds of the main job itself, `nreft train` in a process of its own, per update path, run
    `repeats` times each with the order alternating: loading, evaluations, steps, checkpoints, summary."""
    seconds: dict[str, list[float]] = defaultdict(list)
    for r in range(repeats):
        for path in (PATHS if r % 2 == 0 else PATHS[::-1]):
            cmd = [sys.executable, "-m", "nreft_engine.cli", "train", "--model", DEFAULT_MODEL, "--steps",
                   str(steps), "--update-path", path, "--output-dir", os.path.join(out_dir, f"{path}-{r}")]
            start = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
            seconds[path].append(time.perf_counter() - start)
    return dict(seconds)


def profile_update(trainer: Trainer, rows: int) -> tuple[float, str, dict[str, float]]:
    """One update of a fresh rollout under torch.profiler: its seconds, the table by self CPU time, and
    the self CPU seconds of the largest kinds of work."""
    cfg = trainer.config
    rollout = trainer.rollout(cfg.steps, batch_at(trainer.task, cfg.steps, cfg.prompts_per_step, cfg.seed))
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.update(rollout)
    seconds = time.perf_counter() - start
    events = prof.key_averages()
    kinds = {"matmul (aten::mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
             "elementwise add (grad accumulation, residuals)": ("aten::add", "aten::add_"),
             "fill/zero (dense embedding grads)": ("aten::fill_", "aten::zero_"),
             "optimizer kernels": ("aten::_fused_adamw_", "aten::lerp_", "aten::addcdiv_", "aten::addcmul_",
                                   "aten::sqrt", "aten::mul_"),
             "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                           "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
             "log-softmax": ("aten::_log_softmax", "aten::_log_softmax_backward_data")}
    grouped = {kind: sum(e.self_cpu_time_total for e in events if e.key in keys) / 1e6
               for kind, keys in kinds.items()}
    grouped["total (profiled)"] = sum(e.self_cpu_time_total for e in events) / 1e6
    return seconds, events.table(sort_by="self_cpu_time_total", row_limit=rows), grouped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--update-dtype", default="float32", help="the packed path's --update-dtype")
    parser.add_argument("--profile", action="store_true", help="also profile one update step per path")
    parser.add_argument("--end-to-end", type=int, default=0, metavar="N",
                        help="also time the main job itself (`nreft train`, own process) N times a path")
    parser.add_argument("--out", default="benchmarks/results/update_phase.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        trainers = build_trainers(args.steps, out_dir, {"update_dtype": args.update_dtype})
        job = main_job(trainers)
        profiles = {path: profile_update(trainers[path], 15) for path in PATHS} if args.profile else {}
        del trainers
        separate = end_to_end(args.steps, args.end_to_end, out_dir) if args.end_to_end else {}
    old, new = job["per-group"], job["packed"]
    ratios = {key: old[key] / new[key] for key in ("update_s", "rollout_s", "wall_s")}
    ratios["steps_s"] = (old["update_s"] + old["rollout_s"]) / (new["update_s"] + new["rollout_s"])
    print(f"{'':<28}{'per-group':>12}{'packed':>12}{'ratio':>9}")
    for key, label in (("update_s", "update phase, s"), ("rollout_s", "rollouts, s"),
                       ("wall_s", "main job wall time, s")):
        print(f"{label:<28}{old[key]:>12.1f}{new[key]:>12.1f}{ratios[key]:>8.2f}x")
    print(f"{'steps (rollout + update), s':<28}{old['update_s'] + old['rollout_s']:>12.1f}"
          f"{new['update_s'] + new['rollout_s']:>12.1f}{ratios['steps_s']:>8.2f}x")
    for name in old["phases_s"]:
        print(f"  {name:<26}{old['phases_s'][name]:>12.1f}{new['phases_s'][name]:>12.1f}")
    print(f"micro-batches per step: {old['micro_batches_per_step']:.1f} -> "
          f"{new['micro_batches_per_step']:.1f}; accuracy before/after: "
          f"{old['accuracy_before_after']} / {new['accuracy_before_after']}")
    if separate:
        old_s, new_s = (sum(separate[p]) / len(separate[p]) for p in PATHS)
        ratios["end_to_end_s"] = old_s / new_s
        print(f"{'nreft train, own process, s':<28}{old_s:>12.1f}{new_s:>12.1f}{old_s / new_s:>8.2f}x  "
              f"(runs: {separate})")
    for path, (seconds, table, grouped) in profiles.items():
        print(f"\nprofile of one update step, {path}: {seconds:.2f} s\n" +
              "\n".join(f"  {kind:<48}{s:7.2f} s" for kind, s in grouped.items()) + "\n" + table)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
              "update_dtype": args.update_dtype, "paths": job, "ratios": ratios, "end_to_end_s": separate,
              "profile": {p: {"seconds": s, "self_cpu_s": g} for p, (s, _, g) in profiles.items()}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
