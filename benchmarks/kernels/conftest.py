"""pytest fixtures of the kernel micro-benchmarks (the helpers live in kernel_bench.py)."""

from kernel_bench import SUMMARY, copy_bandwidth, summary_table  # noqa: F401  (pytest fixture)


def pytest_terminal_summary(terminalreporter):
    if SUMMARY:
        terminalreporter.section(
            f"kernel bandwidth (copy: {SUMMARY[0]['copy_gbps']:.0f} GB/s, {SUMMARY[0]['device']})"
        )
        for line in summary_table(SUMMARY):
            terminalreporter.write_line(line)
