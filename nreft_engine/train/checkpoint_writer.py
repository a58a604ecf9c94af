"""Checkpoints written from a thread while training goes on (the layout and guarantees of checkpoint.py)."""

from __future__ import annotations

import threading

from nreft_engine.train.checkpoint import capture_state, prepare_checkpoint, save_checkpoint, write_checkpoint


class CheckpointWriter:
    """Writes a run's checkpoints as save_checkpoint does; with `background`, from a thread.

    A background `save` checks the room, copies the state in memory (the size of the weights and the
    optimizer state) and returns: the files are written, fsynced and checksummed while training goes on.
    One write at a time: the next `save`, and `wait()`, first finish the one in flight and raise its error.
    A process killed mid-write leaves only a temporary folder: the run resumes from the checkpoint before.
    It helps where the CPU idles while training runs (an accelerator's steps); on a CPU that training keeps
    busy, the write takes as long in the thread as in the step.
    """

    def __init__(self, background: bool = False):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, root: str, step: int, model, optimizer, lr_scheduler, fingerprint: dict, keep: int = 2,
             config: dict | None = None, stateful: dict | None = None) -> None:
        """Checkpoint `step` (see save_checkpoint); in the background, written by the time of `wait()`."""
        self.wait()
        if not self.background:
            save_checkpoint(root, step, model, optimizer, lr_scheduler, fingerprint, keep, config, stateful)
            return
        tmp = prepare_checkpoint(root, step, model, optimizer)
        state = capture_state(model, optimizer, lr_scheduler, stateful or {}, True)
        self._thread = threading.Thread(target=self._write, name=f"checkpoint-{step}",
                                        args=(root, step, tmp, state, fingerprint, keep, config))
        self._thread.start()

    def _write(self, *args) -> None:
        try:
            write_checkpoint(*args)
        except BaseException as err:  # raised to the trainer by the next save or wait
            self._error = err

    def wait(self) -> None:
        """Finish the write in flight, if any; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
