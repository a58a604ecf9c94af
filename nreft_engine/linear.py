"""FusedLinear: one matmul for the projections that read the same input (q/k/v, gate/up), over a weight
prepared for the backend once and re-prepared whenever one of the model's parameters behind it changes."""

from __future__ import annotations

import logging

import torch

from nreft_engine import ops
from nreft_engine.cache import available_memory
from nreft_engine.kernels.cpu import PackedLinear

logger = logging.getLogger(__name__)


def _version(t: torch.Tensor) -> int:
    # Inference tensors keep no version counter; they cannot change outside inference mode.
    return 0 if t.is_inference() else t._version


def _update(current, new):
    """`new`, copied into `current` when both are plain tensors of one shape: captured CUDA graphs read the
    storage they were captured with, so a refreshed weight must stay where it was."""
    if isinstance(current, torch.Tensor) and isinstance(new, torch.Tensor) and current.shape == new.shape:
        if current is not new:
            current.copy_(new)
        return current
    return new


class FusedLinear:
    """y_i = x @ W_i.T + b_i for each source weight W_i [out_i, in], computed as one matmul.

    With `prepack`, the sources are concatenated and laid out by `ops.prepare_linear_weight` (copies: on
    the CPU, oneDNN's blocked layout and the small-batch kernel's; on CUDA, the plain concatenation);
    `refresh` rebuilds them (in place where they are plain tensors) when a source's version counter moved,
    which every in-place update (optimizer step, `load_state_dict`, `copy_`) does.
    Without `prepack` the sources are used in place, one matmul each, and nothing is copied.
    """

    def __init__(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None, *, prepack: bool
    ):
        biases = biases if biases is not None else [None] * len(weights)
        if len(biases) != len(weights):
            raise ValueError(f"got {len(biases)} biases for {len(weights)} weights")
        self.sources = list(weights)
        self.biases = biases
        self.splits = [w.shape[0] for w in weights]
        self.prepack = prepack
        self.weight: torch.Tensor | PackedLinear | None = None
        self.bias: torch.Tensor | None = None
        self._versions: tuple[int, ...] | None = None
        self.refresh()

    def _source_versions(self) -> tuple[int, ...]:
        return tuple(_version(t) for t in self.sources + [b for b in self.biases if b is not None])

    def refresh(self, force: bool = False) -> bool:
        """Re-prepare the fused weight if a source's version counter moved since the last call (or `force`);
        True if it did."""
        if not self.prepack:
            return False
        versions = self._source_versions()
        if versions == self._versions and not force:
            return False
        with torch.no_grad():
            weight = torch.cat(self.sources) if len(self.sources) > 1 else self.sources[0]
            self.weight = _update(self.weight, ops.prepare_linear_weight(weight))
            if all(b is None for b in self.biases):
                self.bias = None
            else:
                self.bias = _update(self.bias, torch.cat([
                    b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(self.sources, self.biases)
                ]))
        self._versions = versions
        return True

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One output per source weight (column views of one fused output when prepacked)."""
        if self.prepack:
            y = ops.linear(x, self.weight, self.bias)
            return y.split(self.splits, dim=-1) if len(self.splits) > 1 else (y,)
        return tuple(ops.linear(x, w, b) for w, b in zip(self.sources, self.biases))


def training_prepack(model: torch.nn.Module) -> bool | None:
    """`prepack_weights` for an engine whose weights change every step (a trainer's): False on the CPU, where
    each rollout would first re-pack every matrix (0.3-0.7 s for the 135M model) and the packed layouts gain
    nothing at 64 sequences; None (the default) elsewhere, where re-packing is a device copy."""
    return False if next(model.parameters()).device.type == "cpu" else None


def default_prepack(model: torch.nn.Module, device: torch.device) -> bool:
    """Pack where packing helps and the copies fit in half the memory available now: on CUDA the fused
    q/k/v and gate/up copies (one matmul each: decode steps 1.16x faster at batch 64 on an H200), on the
    CPU oneDNN's and the small-batch kernel's layouts of every matrix."""
    if device.type == "cuda":
        copies = 1  # of the fused projections only: an over-estimate
    elif ops.can_prepack_linear(device):
        copies = 2
    else:
        return False
    # every matrix, tied ones once (an untied embedding is not packed: a slight over-estimate)
    matrices = {p.data_ptr(): p for p in model.parameters() if p.dim() == 2}
    needed = copies * sum(p.numel() * p.element_size() for p in matrices.values())
    available = available_memory(device)
    if needed > available // 2:
        logger.warning(
            "running on the model's own weights: their packed copies (%.2f GB) would take more than half "
            "of the %.2f GB available; pass prepack_weights=True to pack anyway",
            needed / 1e9,
            available / 1e9,
        )
        return False
    return True
