"""FusedLinear: one matmul for the projections that read the same input (q/k/v, gate/up), over a weight
prepared for the backend once and re-prepared whenever one of the model's parameters behind it changes."""

from __future__ import annotations

import logging

import torch

from nreft_engine import ops, tuning
from nreft_engine.cache import available_memory
from nreft_engine.kernels import cpu as cpu_kernels
from nreft_engine.kernels.cpu import PACKED_LINEAR_DTYPES, PackedLinear
from nreft_engine.models.weights import DecoderWeights

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


# How many times the re-pack the timed saving must be: one MLP's timing overstates a whole rollout's saving
# (AMX Xeon, 64 x 128-token rollouts: it predicted 2.3x the re-pack, the rollouts ran 0.98x), so the engine
# copies nothing unless the gain is clear
PACK_MARGIN = 4.0


def training_prepack(model: torch.nn.Module, rows: int, decode_steps: int) -> bool | None:
    """`prepack_weights` for an engine whose weights change before every rollout (a trainer's). Off the CPU,
    None (the default: re-packing is a device copy). On the CPU, timed on the model's first MLP (a few ms,
    logged): pack when what the packed layouts save over a rollout of `decode_steps` steps of `rows`
    sequences exceeds PACK_MARGIN times re-packing them, which every rollout after an update does."""
    param = next(model.parameters())
    if param.device.type != "cpu":
        return None
    if not ops.can_prepack_linear(param.device) or param.dtype not in PACKED_LINEAR_DTYPES:
        return False
    layer = DecoderWeights.from_model(model).layers[0]
    sources = [layer.gate, layer.up]
    x = torch.randn(max(rows, 1), layer.gate.shape[1], dtype=param.dtype)
    with torch.no_grad():
        plain, packed = FusedLinear(sources, prepack=False), FusedLinear(sources, prepack=True)
        saved = tuning.best_time(lambda: plain(x)) - tuning.best_time(lambda: packed(x))
        repack = tuning.best_time(lambda: packed.refresh(force=True), repeats=2)
    pack = decode_steps * saved > PACK_MARGIN * repack
    logger.info(
        "trainer's engine %s its weights: packed layouts save %.3f ms per MLP matmul at %d rows (x %d decode "
        "steps), re-packing costs %.3f ms (timed on this CPU; packs past %gx)",
        "packs" if pack else "does not pack", saved * 1e3, rows, decode_steps, repack * 1e3, PACK_MARGIN,
    )
    return pack


def default_prepack(model: torch.nn.Module, device: torch.device) -> bool:
    """Pack where packing helps and the copies fit in half the memory available now: on CUDA the fused
    q/k/v and gate/up copies (one matmul each: decode steps 1.16x faster at batch 64 on an H200), on the
    CPU oneDNN's and the small-batch kernel's layouts of every matrix."""
    dtype = next(model.parameters()).dtype
    if device.type == "cuda":
        copies = 1  # of the fused projections only: an over-estimate
    elif ops.can_prepack_linear(device):
        # the small-batch copy, and oneDNN's (float32, twice the bytes, for bf16 without native bf16)
        copies = 1 + cpu_kernels.onednn_dtype(dtype).itemsize / dtype.itemsize
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


def log_cpu_linears(dtype: torch.dtype, prepack: bool) -> None:
    """One log line on how an engine's CPU linears run: a warning where bf16 has no native matmul here."""
    isa = f"kernels {cpu_kernels.isa()}, torch {torch.backends.cpu.get_cpu_capability()}"
    if dtype != torch.bfloat16 or cpu_kernels.onednn_bf16():
        layout = "packed (oneDNN and the small-batch kernel)" if prepack else "the model's own weights"
        logger.info("CPU linears (%s, %s): %s", str(dtype).removeprefix("torch."), isa, layout)
    else:
        path = (
            "oneDNN runs on float32 copies of the weights, the small-batch kernel widens the bf16 weights "
            f"({tuning.describe_small_batch(tuning.small_batch_rows(dtype))})"
            if prepack else "weights not packed: every linear runs torch's slow bf16 fallback"
        )
        logger.warning("bfloat16 on a CPU without native bf16 matmuls (oneDNN needs AVX-512 BW/VL/DQ, "
                       "AVX-NE-CONVERT or AMX; %s): %s", isa, path)
