"""Weight sync from a trainer: (HF name, full tensor) pairs staged and checked, then loaded all at once.

Every tensor is checked against the engine's model (a known name, the same shape) as it arrives and kept
on the host in the model's dtype; `commit` then copies them into the parameters under the engine's lock
and refreshes the packed copies once. A bad tensor raises before anything was loaded, so the engine keeps
its previous weights.
"""

from __future__ import annotations

import torch

from nreft_engine.engine import Engine


class WeightUpdate:
    """One update of `engine`'s weights, fed in buckets by `stage` and applied by `commit`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.targets = dict(engine.model.state_dict(keep_vars=True))  # tied weights appear under each name
        self.staged: dict[str, torch.Tensor] = {}

    def stage(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Check each (name, tensor) against the model and keep a host copy in the model's dtype."""
        for name, tensor in named_tensors:
            target = self.targets.get(name)
            if target is None:
                known = ", ".join(list(self.targets)[:3])
                raise ValueError(
                    f"weight {name!r} is not a parameter of the rollout model (e.g. {known}); the trainer "
                    "and the rollout must load the same architecture"
                )
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, the rollout model's is "
                    f"{tuple(target.shape)}"
                )
            self.staged[name] = tensor.detach().to("cpu", target.dtype, copy=True)

    @torch.no_grad()
    def commit(self) -> int:
        """Copy the staged tensors into the model and refresh the engine's packed copies; returns how many
        tensors were loaded."""
        with self.engine.lock:
            for name, tensor in self.staged.items():
                self.targets[name].copy_(tensor)
        self.engine.refresh_packed_weights(force=True)
        count, self.staged = len(self.staged), {}
        return count
