"""pytest-benchmark configuration of the benchmark suite (``pytest benchmarks/ --benchmark-only``).

Options (besides pytest-benchmark's own --benchmark-*):
  --bench-full            the full shapes of every case (default: the quick shapes that
                          ``run.py --quick`` uses); also D2G_BENCH_FULL=1
  --bench-device D        cpu, cuda or all (default): the CUDA cases skip without a GPU
  --bench-warmup-rounds N untimed calls before the timed rounds (default 1; the first call of
                          a ref-compiled case compiles)
  --bench-threads N       torch.set_num_threads for the CPU cases
The timed rounds per case are pytest-benchmark's --benchmark-min-rounds (default 5), one call
each (pedantic mode). machine_info (in the JSON and what --benchmark-compare checks) carries
the device names, torch version, git revision, thread count and the CPU's flags.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks.harness import cpu_flags, device_name, disable_tf32, git_revision


def pytest_addoption(parser):
    group = parser.getgroup("d2g_fast benchmarks")
    group.addoption("--bench-full", action="store_true", default=os.environ.get("D2G_BENCH_FULL") == "1",
                    help="full shapes instead of the quick ones (also D2G_BENCH_FULL=1)")
    group.addoption("--bench-device", choices=("cpu", "cuda", "all"), default="all",
                    help="which device's cases to collect (default all; CUDA cases skip without a GPU)")
    group.addoption("--bench-warmup-rounds", type=int, default=1,
                    help="untimed calls of each case before its timed rounds (default 1)")
    group.addoption("--bench-threads", type=int, default=None, help="torch.set_num_threads (CPU)")


def pytest_configure(config):
    if config.getoption("--bench-warmup-rounds") < 0:
        raise pytest.UsageError("--bench-warmup-rounds must be at least 0, got "
                                f"{config.getoption('--bench-warmup-rounds')}")
    threads = config.getoption("--bench-threads")
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--bench-threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    disable_tf32()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["d2g_fast"] = {
        "cpu": device_name("cpu"),
        "cpu_flags": cpu_flags(),
        "gpu": device_name("cuda") if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git": git_revision(),
        "threads": torch.get_num_threads(),
        "shapes": "full" if config.getoption("--bench-full") else "quick",
    }
