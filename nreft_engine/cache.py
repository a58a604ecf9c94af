"""The paged KV cache: storage for the ACTIVE layers only, sized from a memory budget.

One flat buffer of `budget` bytes is reserved once per engine; each `generate` call views it as
`[active_layers, num_blocks, block_size, kv_heads, head_dim]` for K and V. Skipping layers leaves more
blocks in the same bytes, which the scheduler turns into more concurrent sequences.
"""

from __future__ import annotations

import os

import torch

from nreft_engine import _C

MEMINFO = "/proc/meminfo"
# cgroup v2, then v1: (limit, usage, stats, the stat of page cache the kernel reclaims first)
CGROUP_MEMORY_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
     "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as 2^63 - 4096


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated on `device` now: on CUDA the allocator's free memory; on the CPU the
    kernel's MemAvailable (free memory plus the page cache it can reclaim), capped by the cgroup's limit
    less its usage (inactive page cache not counted) where one is set."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _meminfo_available()
    for limit_file, usage_file, stat_file, reclaimable in CGROUP_MEMORY_FILES:
        if os.path.exists(limit_file):
            room = _cgroup_room(limit_file, usage_file, stat_file, reclaimable)
            return available if room is None else min(available, room)
    return available


def _meminfo_available() -> int:
    """MemAvailable of /proc/meminfo; sysconf's free pages where it is missing (not Linux, kernel < 3.14)."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_room(limit_file: str, usage_file: str, stat_file: str, reclaimable: str) -> int | None:
    """Bytes left under the cgroup's memory limit, or None when it sets none (or cannot be read)."""
    try:
        with open(limit_file) as f:
            limit = f.read().strip()
        if limit == "max" or int(limit) >= NO_LIMIT:
            return None
        with open(usage_file) as f:
            usage = int(f.read())
    except (OSError, ValueError):
        return None
    try:
        with open(stat_file) as f:
            stats = dict(line.split() for line in f if line.strip())
        usage -= int(stats.get(reclaimable, 0))
    except (OSError, ValueError):
        pass
    return max(int(limit) - usage, 0)


def resolve_budget(kv_cache_memory: float | int, device: torch.device) -> int:
    """A budget in bytes from an int (bytes) or a float in (0, 1] (fraction of available memory)."""
    if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, (int, float)):
        raise TypeError(f"kv_cache_memory must be bytes (int) or a fraction (float), got {kv_cache_memory!r}")
    if isinstance(kv_cache_memory, float):
        if not 0 < kv_cache_memory <= 1:
            raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {kv_cache_memory}")
        return int(kv_cache_memory * available_memory(device))
    if kv_cache_memory <= 0:
        raise ValueError(f"kv_cache_memory must be positive, got {kv_cache_memory}")
    available = available_memory(device)
    if kv_cache_memory > available:
        raise ValueError(
            f"kv_cache_memory={kv_cache_memory} bytes is more than the {available} bytes available on "
            f"{device}; ask for less, or for a fraction such as 0.1"
        )
    return kv_cache_memory


def kv_cache_bytes(num_layers: int, num_tokens: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """KV bytes of `num_tokens` cached tokens: layers x tokens x 2 (K, V) x KV heads x head dim x itemsize."""
    return num_layers * num_tokens * 2 * num_kv_heads * head_dim * itemsize


class PagedKVCache:
    """K/V block storage for `num_active_layers` layers, laid out over a reserved buffer."""

    def __init__(
        self, buffer: torch.Tensor, num_active_layers: int, block_size: int, kv_heads: int, head_dim: int
    ):
        self.block_size = block_size
        itemsize = buffer.element_size()
        block_bytes = kv_cache_bytes(num_active_layers, block_size, kv_heads, head_dim, itemsize)
        self.num_blocks = buffer.numel() * itemsize // block_bytes
        if self.num_blocks < 1:
            raise ValueError(
                f"the KV cache budget ({buffer.numel() * itemsize} bytes) holds no block of "
                f"{block_size} tokens for {num_active_layers} layers; raise kv_cache_memory"
            )
        shape = (num_active_layers, self.num_blocks, block_size, kv_heads, head_dim)
        used = buffer[: self.num_blocks * block_bytes // itemsize].view(2, *shape)
        self.k, self.v = used[0], used[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Perform copy-on-write block copies in every active layer."""
        if copies:
            _C.copy_blocks(self.k, self.v, torch.tensor(copies, dtype=torch.int64))  # checked on the host
