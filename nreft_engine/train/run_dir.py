"""A run's output folder: the exclusive lock that keeps a second run out, and the recorded run config.

`run_config.json` holds what defines the run (the TrainConfig, model, task, rewards); a resumed run must
match it, except for the settings in CHANGEABLE when the caller allows them to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator

from nreft_engine.models.loader import write_file_atomically
from nreft_engine.train.config import TrainConfig
from nreft_engine.train.data import Task

LOCK_FILE = ".lock"
CONFIG_FILE = "run_config.json"
# settings a resumed run may change with --allow-config-change: bookkeeping, chunking and the fp32 update's
# batching (the same numbers) and steps (extending a run; the cosine LR schedule is then stretched over the
# new total from the next step)
CHANGEABLE = ("steps", "eval_every", "save_every", "keep_checkpoints", "background_save", "chunk_size",
              "data_path", "update_path", "max_update_tokens", "head_memory_mb")
_HELD: set[str] = set()  # output dirs this process holds (the CLI locks before loading, the Trainer again)


@contextlib.contextmanager
def hold_run_dir(path: str) -> Iterator[None]:
    """Hold an exclusive flock on `path`/.lock during the block (creating `path`); fail if another run has it.

    If the block fails and the folder was created for it and holds nothing else, both are removed again.
    """
    key = os.path.realpath(path)
    if key in _HELD:
        yield
        return
    created = not os.path.exists(path)
    fd = _locked_fd(path)
    _HELD.add(key)
    try:
        yield
    except BaseException:
        if created and os.listdir(path) == [LOCK_FILE]:
            os.remove(os.path.join(path, LOCK_FILE))
            os.rmdir(path)
        raise
    finally:
        _HELD.discard(key)
        os.close(fd)


def _locked_fd(path: str) -> int:
    """Open and flock `path`/.lock (writing this pid into it); the lock file must still be the one locked."""
    lock = os.path.join(path, LOCK_FILE)
    while True:
        try:
            os.makedirs(path, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileExistsError, NotADirectoryError) as err:
            raise ValueError(f"output dir {path} is not a folder ({err.strerror}: {err.filename})") from err
        except OSError as err:
            raise OSError(f"output dir {path} cannot be written ({err.strerror})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{path} is in use by another run (pid {pid})") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # else a failed run removed it meanwhile: again
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        os.close(fd)


def run_record(
    config: TrainConfig, model_name: str, task: Task, rewards: list, accuracy_fn, extra: dict | None = None
) -> dict:
    """What defines a run, as JSON values: the config's fields (objective.* and correction.* flattened), the
    model name, the task (name, sizes, a digest of its problems), reward functions and `extra` settings."""
    flat = {}
    for key, value in dataclasses.asdict(config).items():
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    problems = json.dumps([[p.question, p.answer] for p in task.train + task.heldout])
    record = {
        "model": model_name, "task": task.name, "train_problems": len(task.train),
        "heldout_problems": len(task.heldout),
        "problems_sha256": hashlib.sha256(problems.encode()).hexdigest()[:16],
        "rewards": [_qualified_name(fn) for fn in rewards], "accuracy": _qualified_name(accuracy_fn),
        **flat, **(extra or {}),
    }
    return json.loads(json.dumps(record))  # as read back from the file: lists, not tuples


def _qualified_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def check_run_config(output_dir: str, record: dict, allow_change: bool = False) -> str:
    """Refuse to continue the run recorded in `output_dir` with another config, listing each difference.

    Changes of CHANGEABLE settings pass when `allow_change`, and are returned as text ('' if none); a folder
    without a recorded run passes.
    """
    recorded = read_run_config(output_dir)
    if recorded is None:
        return ""
    changes = {k: (recorded.get(k, "(absent)"), record.get(k, "(absent)"))
               for k in sorted(set(recorded) | set(record)) if recorded.get(k) != record.get(k)}
    if not changes:
        return ""
    listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    fixed = [k for k in changes if k not in CHANGEABLE]
    if fixed:
        raise ValueError(
            f"{output_dir} holds a run with another config ({listed}); {', '.join(fixed)} cannot change "
            f"within a run: rerun with its settings or choose another --output-dir"
        )
    if not allow_change:
        raise ValueError(f"{output_dir} holds a run with other settings ({listed}); rerun with its settings, "
                         f"or pass --allow-config-change to continue it with these")
    return listed


def read_run_config(output_dir: str) -> dict | None:
    """The run config recorded in `output_dir`, or None if there is none."""
    path = os.path.join(output_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ValueError(f"{path} is damaged ({err}); restore it or choose another --output-dir") from err


def write_run_config(output_dir: str, record: dict) -> None:
    """Record the run's config in `output_dir` atomically (a temp file fsynced, then renamed)."""
    write_file_atomically(os.path.join(output_dir, CONFIG_FILE), json.dumps(record, indent=2).encode())

