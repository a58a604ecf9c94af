"""Per-step metrics: one JSON object per line in metrics.jsonl, and a PNG plot of the run."""

from __future__ import annotations

import json
import os


class MetricsLog:
    """Appends step records to `path`; on resume, drops records past the checkpoint's step first."""

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step] if resume_step else []
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl (an empty list if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(records: list[dict], path: str) -> str:
    """Reward, held-out accuracy and rollout/training tokens/s against the step, as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
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
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
