"""pytest fixtures of the kernel micro-benchmarks (the helpers live in kernel_bench.py)."""

from kernel_bench import copy_bandwidth  # noqa: F401  (session fixture)
