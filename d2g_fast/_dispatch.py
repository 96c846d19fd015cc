"""One dispatch rule for every op.

``impl`` per call: ``"auto" | "ref" | "cpu" | "cuda" | "triton"``. ``D2G_IMPL`` in the
environment replaces ``"auto"`` (an explicit per-call choice still wins). ``"auto"`` takes
the fastest backend available for the tensor's device, in the order the op declares.
A backend that was asked for explicitly but cannot run raises, saying why.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from d2g_fast import _ext

IMPLS = ("auto", "ref", "cpu", "cuda", "triton")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend accumulates in and returns its float results in: float64 for
    float64 inputs, else float32 (bfloat16 and float16 inputs too). The C++ twin is
    ``accumulation_type`` in csrc/common/checks.h; tests/test_foundation_constants.py checks
    that the compiled ops follow this rule."""
    return torch.float64 if dtype == torch.float64 else torch.float32

# Fastest-first order used by "auto" when an op declares none of its own.
DEFAULT_CUDA_ORDER = ("cuda", "triton", "ref")


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """(importable, version or reason)."""
    try:
        import triton
    except Exception as exc:  # pragma: no cover - depends on the machine
        return False, f"{type(exc).__name__}: {exc}"
    return True, triton.__version__


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _unavailable_reason(impl: str, device: torch.device) -> str | None:
    """None when ``impl`` can run on ``device``, else the reason it cannot."""
    if impl == "ref":
        return None
    if impl == "cpu":
        if device.type != "cpu":
            return f"impl='cpu' needs CPU tensors, got tensors on {device}"
        if not _ext.ext_loaded():
            return f"the compiled extension is not available ({_ext.ext_error()})"
        return None
    if impl == "cuda":
        if device.type != "cuda":
            return f"impl='cuda' needs CUDA tensors, got tensors on {device}"
        if not _ext.ext_loaded():
            return f"the compiled extension is not available ({_ext.ext_error()})"
        if not _ext.cuda_kernels_compiled():
            return "the extension was built without CUDA kernels (D2G_NO_CUDA or no toolkit)"
        return None
    if impl == "triton":
        ok, why = triton_status()
        if not ok:
            return f"triton cannot be imported ({why})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (f"impl='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                f"got tensors on {device}")
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def resolve_impl(op: str, impl: str, device: torch.device,
                 cuda_order: tuple[str, ...] = DEFAULT_CUDA_ORDER) -> str:
    """Return the concrete backend that runs ``op`` for tensors on ``device``."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        env = os.environ.get("D2G_IMPL", "").strip()
        if env:
            if env not in IMPLS:
                raise ValueError(f"{op}: the environment variable D2G_IMPL must be one of "
                                 f"{IMPLS}, got {env!r}")
            impl = env
    if impl != "auto":
        reason = _unavailable_reason(impl, device)
        if reason is not None:
            raise RuntimeError(f"{op}: impl={impl!r} cannot run: {reason}")
        return impl
    order = ("cpu", "ref") if device.type == "cpu" else cuda_order
    for candidate in order:
        if _unavailable_reason(candidate, device) is None:
            if candidate == "ref" and device.type in ("cpu", "cuda"):
                _warn_reference_once(op, device, order)
            return candidate
    return "ref"


_WARNED_DEVICES: set = set()


def _warn_reference_once(op: str, device: torch.device, order: tuple[str, ...]) -> None:
    """A fast path was expected but none can run: say so once per device type, with why."""
    if device.type in _WARNED_DEVICES:
        return
    _WARNED_DEVICES.add(device.type)
    if not _ext.ext_loaded():
        _ext.warn_missing_once(op)
        return
    reasons = "; ".join(f"{c}: {_unavailable_reason(c, device)}" for c in order if c != "ref")
    warnings.warn(f"d2g_fast: no fast backend for '{op}' on {device.type} ({reasons}); using the "
                  f"slow pure-PyTorch reference. Pass impl='ref' to silence this.",
                  RuntimeWarning, stacklevel=3)
