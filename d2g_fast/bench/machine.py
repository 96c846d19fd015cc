"""Where a measurement was made: the device's name and the code's revision, recorded with every
result of ``d2g bench`` and of ``benchmarks/``, and the device's name in the receipts of
``d2g collect``, the reports of ``d2g eval`` and ``d2g build-info`` (one source for all).
Imports nothing of d2g_fast, so any layer may use it."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

GIT_REV_ENV = "D2G_GIT_REV"
"""The revision to record when the tree has no .git (a copy on a GPU machine)."""


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's architecture, core count and torch's thread count
    (e.g. "x86_64 CPU (2 cores, 1 torch threads)")."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return (f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads)")


def git_revision() -> str:
    """Short commit of this checkout, "+dirty" with uncommitted changes to tracked files;
    $D2G_GIT_REV when set; "unknown" without git."""
    if os.environ.get(GIT_REV_ENV):
        return os.environ[GIT_REV_ENV]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here,
                               timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or "unknown"
    except Exception:  # noqa: BLE001 - no git: the record says so
        return "unknown"
