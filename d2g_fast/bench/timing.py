"""Timing for ``d2g bench``: median wall time of a callable and its peak device memory.

The package's own copy of the rule of ``benchmarks/harness.py`` (which is not installed with the
package): warm-up calls first, then repeats until both a minimum count and a minimum time are
reached; the median is reported. CUDA work is timed with events and synchronised.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float
    reps: int
    peak_mem_gb: float | None   # peak allocated during the calls, resident weights included (CUDA)


def measure(fn: Callable[[], object], device: str, *, warmup: int = 1, min_reps: int = 3,
            min_time_s: float = 0.5, max_reps: int = 100) -> Timing:
    """Median seconds per call of ``fn`` on ``device`` ("cpu" or "cuda[:N]").

    Args:
        fn: a zero-argument callable doing one unit of work (a batch, a training step).
        warmup: untimed calls first (compilation, allocator, cuDNN autotuning).
        min_reps, min_time_s, max_reps: repeat until ``min_reps`` calls and ``min_time_s``
            seconds are reached, at most ``max_reps`` calls.
    Returns:
        :class:`Timing` (median seconds, repeats, peak allocated memory in GiB during the calls,
        what was resident before included, as a device must hold it; None on a CPU).
    """
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps
                                     or time.perf_counter() - start_all < min_time_s):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return Timing(statistics.median(times), len(times), peak)


def free_memory(device: str) -> None:
    """Release cached blocks between measurements so each one's peak is its own."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
