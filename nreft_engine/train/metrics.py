"""Per-step metrics: one JSON object per line in metrics.jsonl, and a PNG plot of the run."""

from __future__ import annotations

import json
import logging
import os

from nreft_engine.models.loader import write_file_atomically

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends step records to `path`; on resume, first drops the records past the checkpoint's step (and
    an unfinished last line, left by a killed run, with a warning)."""

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        records = read_metrics(path, partial_last=True) if resume_step else []
        if not resume_step and os.path.isfile(path) and os.path.getsize(path):
            logger.warning("starting %s again from step 0: there is no checkpoint to resume from", path)
        kept = "".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= resume_step)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_file_atomically(path, kept.encode())

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise OSError(f"cannot append to {self.path} ({err.strerror or err})") from err


def read_metrics(path: str, partial_last: bool = False) -> list[dict]:
    """All records of a metrics.jsonl (none if it does not exist); a line that is not JSON is a ValueError
    naming it, unless it is the last one and `partial_last` (then it is dropped, with a warning)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if not (partial_last and n == lines[-1][0]):
                raise ValueError(f"{path} line {n} is not a JSON record ({err}): {line[:60]!r}") from err
            logger.warning("dropping the unfinished last line %d of %s: %r", n, path, line[:60])
    return records


def plot_metrics(records: list[dict], path: str) -> str:
    """Reward, held-out accuracy, rollout/training tokens/s and skipped layers against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    train_steps = [r["step"] for r in steps]
    axes[0].plot(train_steps, [r["reward_mean"] for r in steps], label="train reward (nested rollouts)")
    axes[0].set_title("reward")
    axes[1].plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-",
                 label="held-out (full model, greedy)")
    axes[1].set_title("held-out accuracy")
    axes[1].set_ylim(0, 1)
    axes[2].plot(train_steps, [r["rollout_tokens_per_s"] for r in steps], label="rollout (nested)")
    axes[2].plot(train_steps, [r["train_tokens_per_s"] for r in steps], label="training (full)")
    axes[2].set_title("tokens/s")
    axes[3].step(train_steps, [r.get("num_skipped_layers", len(r.get("skipped_layers", []))) for r in steps],
                 where="mid", label="behaviour model")
    axes[3].set_title("skipped layers")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
