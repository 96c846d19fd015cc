"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import os

import torch


def poisoned_empty(*args, **kwargs) -> torch.Tensor:
    """torch.empty, NaN-filled under D2G_POISON=1 (the test suite sets it) so that an element a
    kernel forgets to write fails the comparison."""
    t = torch.empty(*args, **kwargs)
    if os.environ.get("D2G_POISON", "") not in ("", "0"):
        t.fill_(float("nan"))
    return t


def poisoned_empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t, memory_format=torch.preserve_format)
    if os.environ.get("D2G_POISON", "") not in ("", "0"):
        out.fill_(float("nan"))
    return out
