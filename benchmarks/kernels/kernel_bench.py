"""Shared set-up of the kernel micro-benchmarks (`pytest benchmarks/kernels --benchmark-only`).

Each benchmark times one kernel at a realistic shape, as its torch reference ("torch") and as what the
engine runs: on the CPU the C++ kernel of kernels/cpu.py ("cpu"), on a CUDA device the Triton kernel
("triton"). extra_info records the bytes the op must move at least (each
input read once, each output written once), the achieved GB/s, the device's measured copy bandwidth
(a large device-to-device copy, bytes read + written, timed the same way) and their ratio.

On a GPU the GB/s come from `triton.testing.do_bench` (CUDA events, median, inputs rotated so repeated
runs do not just hit the L2 cache): the Triton kernels as CUDA-graph replays, one call per graph and
8 back to back in one graph (per call: how the engine's captured decode step runs them, with no graph
launch in between), the torch references eagerly (they sync). pytest-benchmark's own
wall-clock columns include a synchronize per call. On the CPU no Triton rows run (interpreted timings mean
nothing), over a reduced grid so the run takes a minute; NREFT_BENCH_FULL=1 asks for the full grid there too.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time

import pytest
import torch

from nreft_engine.kernels import cpu as cpu_kernels

HAS_CUDA = torch.cuda.is_available()
FULL = HAS_CUDA or os.environ.get("NREFT_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# bf16 is what the engine runs on a GPU; fp32 on the CPU, where bf16 kernels are slow emulations
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32

MODELS = {
    "qwen2.5-1.5b": {
        "heads": 12,
        "kv_heads": 2,
        "head_dim": 128,
        "hidden": 1536,
        "inter": 8960,
        "vocab": 151936,
    },
    "smollm2-135m": {"heads": 9, "kv_heads": 3, "head_dim": 64, "hidden": 576, "inter": 1536, "vocab": 49152},
}
BATCHES = [1, 64, 256] if FULL else [1, 64]
CONTEXTS = [512, 2048, 8192] if FULL else [512, 2048]
IMPLS = [
    "torch",
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            HAS_CUDA, reason="the C++ CPU kernels are timed where the benchmark runs on the CPU"
        ),
    ),
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1",
            reason="Triton kernels are timed on a CUDA device only (interpreted timings mean nothing)",
        ),
    ),
]


def kernel(module, name: str, impl: str):
    """Kernel `name` of `module` as `impl`: its torch reference ("torch"), the C++ CPU kernel of
    kernels/cpu.py ("cpu"; skipped where the op has none) or the Triton kernel ("triton")."""
    if impl == "cpu":
        fn = getattr(cpu_kernels, f"{name}_cpu", None)
        if fn is None:
            pytest.skip(f"{name} has no C++ CPU kernel: the engine's CPU path is its torch reference")
        return fn
    return getattr(module, f"{name}_{'triton' if impl == 'triton' else 'reference'}")


def _median_seconds_cpu(fn, repeat: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _median_seconds_cuda(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


BACK_TO_BACK = 8  # calls captured in one graph for the back-to-back timing


def _graph_replay(fn, input_sets, calls: int = 1):
    """A callable replaying CUDA graphs of `calls` consecutive fn(*inputs) calls, cycling through the
    input sets (one graph per starting set, in turn). One call per graph still pays the graph's launch;
    several show the kernels as the engine's captured decode step runs them, between other kernels."""
    graphs = []
    for first in range(len(input_sets)):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(*input_sets[(first + i) % len(input_sets)])
        graphs.append(graph)
    turn = itertools.cycle(graphs)
    return lambda: next(turn).replay()


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:  # registered by conftest.py
    """The device's measured copy bandwidth in GB/s (bytes read + bytes written per second)."""
    if HAS_CUDA:
        src = torch.randn(256 * 1024 * 1024 // 2, device=DEVICE, dtype=torch.bfloat16)  # 256 MiB, >> L2
        dst = torch.empty_like(src)
        seconds = _median_seconds_cuda(lambda: dst.copy_(src))
    else:
        src = torch.randn(64 * 1024 * 1024 // 4)  # 64 MiB
        dst = torch.empty_like(src)
        seconds = _median_seconds_cpu(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / seconds / 1e9


class _Rotation:
    """Cycles through several input sets: on a GPU, enough to exceed twice the L2 cache."""

    def __init__(self, make_inputs, working_set_bytes: int):
        n = 1
        if HAS_CUDA:  # at least two, so back-to-back calls never reread one set from the L2
            l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 50 * 2**20)
            n = max(2, min(16, -(-2 * l2 // max(1, working_set_bytes))))
        self.sets = [make_inputs() for _ in range(n)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def run_benchmark(
    benchmark, copy_bw: float, fn, make_inputs, bytes_moved: int, flops: int | None = None, **info
):
    """Time fn(*inputs) with pytest-benchmark and record bandwidth figures in extra_info."""
    rot = _Rotation(make_inputs, bytes_moved)

    def call():
        return fn(*rot.next())

    if HAS_CUDA:

        def timed():
            call()
            torch.cuda.synchronize()

        call()  # compile / warm up outside the timing
        torch.cuda.synchronize()
        benchmark(timed)
        # Triton kernels take no host sync, so they are timed as graph replays; the torch references sync
        # (context lengths read on the host) and are timed eagerly
        graphed = info.get("impl") == "triton"
        seconds = _median_seconds_cuda(_graph_replay(fn, rot.sets) if graphed else call)
        info["timing"] = "graph" if graphed else "eager"
        if graphed:
            per_call = _median_seconds_cuda(_graph_replay(fn, rot.sets, BACK_TO_BACK)) / BACK_TO_BACK
            info["back_to_back_us"] = round(per_call * 1e6, 2)
            info["back_to_back_fraction"] = round(bytes_moved / per_call / 1e9 / copy_bw, 4)
        info["device"] = torch.cuda.get_device_name(DEVICE)
        info["do_bench_median_us"] = round(seconds * 1e6, 2)
    else:
        benchmark(call)
        seconds = benchmark.stats.stats.median if benchmark.stats is not None else _median_seconds_cpu(call)
        info["device"] = "cpu"
    gbps = bytes_moved / seconds / 1e9
    info.update(
        dtype=str(DTYPE).replace("torch.", ""),
        bytes_moved=int(bytes_moved),
        achieved_gbps=round(gbps, 2),
        copy_gbps=round(copy_bw, 2),
        fraction_of_copy_bandwidth=round(gbps / copy_bw, 4),
    )
    if flops is not None:
        info["achieved_tflops"] = round(flops / seconds / 1e12, 3)
    benchmark.extra_info.update(info)
    SUMMARY.append({"name": benchmark.name.split("[")[0].removeprefix("test_"), "seconds": seconds, **info})


SUMMARY: list[dict] = []  # one row per benchmark run, for the table printed when pytest finishes


def summary_table(rows: list[dict]) -> list[str]:
    """Markdown table of the runs: kernel, shape, impl, median time, GB/s and fraction of copy bandwidth."""
    shape_keys = (
        "model", "batch", "context", "prompts", "tokens", "filters", "partition", "block_n", "warps", "stages"
    )
    lines = [
        (
            f"| kernel | shape | impl | timing | median us | GB/s | of copy BW "
            f"| x{BACK_TO_BACK} in a graph: us per call | of copy BW |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = " ".join(f"{k}={r[k]}" for k in shape_keys if k in r)
        b2b = (
            f"{r['back_to_back_us']:.1f} | {100 * r['back_to_back_fraction']:.1f}%"
            if "back_to_back_us" in r
            else " | "
        )
        lines.append(
            f"| {r['name']} | {shape} | {r['impl']} | {r.get('timing', 'wall')} | {r['seconds'] * 1e6:.1f} "
            f"| {r['achieved_gbps']:.1f} | {100 * r['fraction_of_copy_bandwidth']:.1f}% | {b2b} |"
        )
    return lines
