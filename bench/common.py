"""What the three benchmarks share: the machine's matmul peak and a plain-text table."""

import os
import time

import torch


def matmul_peak(size=2048, reps=5):
    """The machine's fp32 matmul rate in GFLOP/s: the best of a few size^3 products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def prepare_machine(threads):
    """Set torch's threads (if asked) and warn when another job already loads the CPU."""
    if threads:
        torch.set_num_threads(threads)
    if os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.1f} before starting: another job shares the CPU, timings will be noisy")
