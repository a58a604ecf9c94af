"""Host-to-device copies that do not wait for the device.

A plain copy to a CUDA device synchronizes with the stream: the host would wait for every step already
queued, which undoes async scheduling. Staging through pinned memory makes the copy asynchronous; torch's
caching host allocator keeps the staging buffer until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(
    data: torch.Tensor | list, device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """`data` (a CPU tensor, or a list made into a `dtype` tensor) on `device`, without a host sync."""
    host = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
