"""Checkpoints that resume a run exactly: safetensors weights + optimizer, LR scheduler, RNG and loop state.

Layout: <root>/step-000010/{model.safetensors, trainer.pt, meta.json}. A checkpoint is written into a
temporary directory and renamed into place, so a killed run never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile

import safetensors.torch
import torch

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step-(\d{6,})")


def model_fingerprint(model: torch.nn.Module, name: str) -> dict:
    """What identifies a model for resuming: its name, architecture sizes and a hash of parameter shapes."""
    config = model.config
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    return {
        "model": name,
        "model_type": getattr(config, "model_type", type(model).__name__),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "parameters": hashlib.sha256(shapes.encode()).hexdigest()[:16],
    }


def latest_checkpoint(root: str) -> str | None:
    """The highest-step checkpoint directory under `root`, or None."""
    if not os.path.isdir(root):
        return None
    steps = [int(m.group(1)) for d in os.listdir(root) if (m := _STEP_DIR.fullmatch(d))]
    return os.path.join(root, f"step-{max(steps):06d}") if steps else None


def check_compatible(path: str, fingerprint: dict) -> None:
    """Raise a ValueError naming the differences if the checkpoint at `path` belongs to another model."""
    with open(os.path.join(path, "meta.json")) as f:
        saved = json.load(f)["fingerprint"]
    diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} is from another model ({details}); use a fresh --output-dir")


def save_checkpoint(
    root: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict,
    keep: int = 2,
) -> str:
    """Write checkpoint `step` atomically and delete all but the newest `keep`; returns its directory."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=root)
    try:
        safetensors.torch.save_model(model, os.path.join(tmp, "model.safetensors"))
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scheduler": lr_scheduler.state_dict(),  # the key every checkpoint has used
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "fingerprint": fingerprint}, f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    steps = sorted(int(m.group(1)) for d in os.listdir(root) if (m := _STEP_DIR.fullmatch(d)))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, f"step-{old:06d}"), ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict,
) -> int:
    """Restore weights, optimizer, LR scheduler and RNG from `path` (model checked first); return its step."""
    check_compatible(path, fingerprint)
    safetensors.torch.load_model(model, os.path.join(path, "model.safetensors"))
    state = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    with open(os.path.join(path, "meta.json")) as f:
        return int(json.load(f)["step"])
