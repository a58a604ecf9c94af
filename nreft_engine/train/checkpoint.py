"""Checkpoints that resume a run exactly: safetensors weights + optimizer, LR scheduler, RNG and loop state.

Layout: <root>/step-000010/{model.safetensors, trainer.pt, meta.json}. A checkpoint is written into a
temporary directory, its files fsynced, then meta.json (with each file's size and sha256) last, and the
directory renamed into place: a killed run never leaves a half-written one, and a file damaged later is
found on load, which then falls back to the newest intact checkpoint. (checkpoint_writer.py writes them
from a thread.)
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass

import safetensors.torch
import torch
from safetensors import SafetensorError

from nreft_engine.models.loader import file_manifest, manifest_mismatch, write_file_atomically

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step-(\d{6,})")
_FILES = ("model.safetensors", "trainer.pt")
_HEADROOM = 16 * 2**20  # bytes beyond the tensors: pickled state, meta.json, the file system


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


def checkpoint_steps(root: str) -> list[int]:
    """The steps of the checkpoint directories under `root`, ascending (none if it does not exist)."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := _STEP_DIR.fullmatch(d)))


def latest_checkpoint(root: str) -> str | None:
    """The newest intact checkpoint under `root` (a warning names each damaged newer one), or None if there
    is none; a ValueError if every checkpoint there is damaged."""
    damaged = []
    for step in reversed(checkpoint_steps(root)):
        path = os.path.join(root, f"step-{step:06d}")
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s is damaged: %s; falling back to the one before", path, problem)
        damaged.append(problem)
    if damaged:
        raise ValueError(f"every checkpoint under {root} is damaged ({'; '.join(damaged)}); "
                         f"move them away to start the run again")
    return None


def resume_checkpoint(root: str, steps: int, resume: bool = True) -> str | None:
    """The checkpoint under `root` that a run of `steps` steps resumes from (the newest intact one), or None.

    A ValueError if there are checkpoints but not `resume`, or if that one is past `steps`.
    """
    if checkpoint_steps(root) and not resume:
        raise ValueError(f"{root} already holds checkpoints; resume, or choose another --output-dir")
    found = latest_checkpoint(root)
    if found is not None and int(os.path.basename(found).removeprefix("step-")) > steps:
        raise ValueError(f"steps={steps} is below the step of the checkpoint {found}; a run cannot be "
                         f"shortened past its last checkpoint")
    return found


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be loaded (naming the damaged file), or None if it is intact.

    Checkpoints from before checksums (no "files" in meta.json) are only checked for their files' presence.
    """
    meta_path = os.path.join(path, "meta.json")
    try:
        meta = _read_meta(path)
    except FileNotFoundError:
        return f"{meta_path} is missing"
    except (OSError, ValueError) as err:
        return f"{meta_path} cannot be read ({err})"
    if not isinstance(meta, dict) or not {"step", "fingerprint"} <= set(meta):
        return f"{meta_path} lacks the step or the fingerprint"
    return manifest_mismatch(path, meta.get("files") or {name: None for name in _FILES})


def _read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def check_compatible(path: str, fingerprint: dict) -> None:
    """Raise a ValueError naming the differences if the checkpoint at `path` belongs to another model."""
    saved = _read_meta(path)["fingerprint"]
    diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} is from another model ({details}); use a fresh --output-dir")


@dataclass
class CheckpointState:
    """A checkpoint's contents, captured at save time: the weights (each storage once), trainer.pt's dict."""

    weights: dict[str, torch.Tensor]
    trainer: dict


def capture_state(model, optimizer, lr_scheduler, stateful: dict, copied: bool) -> CheckpointState:
    """The state to write; `copied`: a copy of every tensor, so training can go on while it is written."""
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:  # tied weights are saved once, under the first name (load_model accepts either)
            seen.add(key)
            weights[name] = (tensor.detach().clone(memory_format=torch.contiguous_format) if copied
                             else tensor.detach().contiguous())
    trainer = {
        "optimizer": optimizer.state_dict(),
        "scheduler": lr_scheduler.state_dict(),  # the key every checkpoint has used
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        **{name: obj.state_dict() for name, obj in stateful.items()},
    }
    return CheckpointState(weights, copy.deepcopy(trainer) if copied else trainer)


def save_checkpoint(
    root: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict,
    keep: int = 2,
    config: dict | None = None,
    stateful: dict | None = None,
) -> str:
    """Write checkpoint `step` atomically (the run's `config` in its meta), then delete all but the newest
    `keep` (0: none); returns its directory. An OSError names the checkpoint if it cannot be written.
    `stateful` (name -> object with state_dict()) adds each object's state to trainer.pt under its name."""
    tmp = prepare_checkpoint(root, step, model, optimizer)
    state = capture_state(model, optimizer, lr_scheduler, stateful or {}, False)
    return write_checkpoint(root, step, tmp, state, fingerprint, keep, config)


def prepare_checkpoint(root: str, step: int, model, optimizer) -> str:
    """The temporary directory of checkpoint `step`, after the room for it is checked; an OSError if not."""
    try:
        os.makedirs(root, exist_ok=True)
        _remove_leftovers(root)
        _check_room(root, model, optimizer)
        return tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=root)
    except OSError as err:
        raise OSError(f"cannot write checkpoint {_final(root, step)} ({err.strerror or err})") from err


def _final(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:06d}")


def write_checkpoint(root: str, step: int, tmp: str, state: CheckpointState, fingerprint: dict, keep: int,
                     config: dict | None) -> str:
    """Write `state` into `tmp`, rename it into place, delete the old checkpoints past `keep`."""
    final = _final(root, step)
    try:
        safetensors.torch.save_file(state.weights, os.path.join(tmp, "model.safetensors"), {"format": "pt"})
        _save_without_crc(state.trainer, os.path.join(tmp, "trainer.pt"))
        files = file_manifest(tmp, _FILES)
        meta = {"step": step, "fingerprint": fingerprint, "config": config, "files": files}
        write_file_atomically(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=2).encode())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except (OSError, SafetensorError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        free = shutil.disk_usage(root).free >> 20
        raise OSError(f"cannot write checkpoint {final} ({free} MiB free): {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_steps(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, f"step-{old:06d}"), ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def _save_without_crc(obj, path: str) -> None:
    """torch.save without its CRC32 of every record: meta.json's sha256 already covers the whole file, and the
    CRCs cost a third of the time of writing the 1 GB of AdamW state of the 135M model."""
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.set_crc32_options(crc)


def _remove_leftovers(root: str) -> None:
    """Delete the temporary directories of saves that were killed (the run holds its folder's lock)."""
    for name in os.listdir(root):
        if name.startswith(".step-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _check_room(root: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise an OSError before writing if `root` lacks the room for the weights and the optimizer state."""
    tensors = [*model.state_dict().values(),
               *(t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    needed = _HEADROOM + sum(storages.values())  # tied weights share a storage and are saved once
    free = shutil.disk_usage(root).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{root} has {free >> 20} MiB free and it needs {needed >> 20} MiB")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict,
    stateful: dict | None = None,
) -> int:
    """Restore weights, optimizer, LR scheduler and RNG from `path` (model checked first); return its step.

    Each object of `stateful` (name -> object with load_state_dict) gets the state saved under its name."""
    check_compatible(path, fingerprint)
    state = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
    missing = [name for name in stateful or {} if name not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks the state of {', '.join(missing)} (saved by a run with "
                         f"other settings); use a fresh --output-dir")
    safetensors.torch.load_model(model, os.path.join(path, "model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    for name, obj in (stateful or {}).items():
        obj.load_state_dict(state[name])
    return int(_read_meta(path)["step"])
