"""Loading of the compiled extension ``d2g_fast._C``.

The extension registers the C++ CPU/CUDA kernels of every op with the dispatcher
(``torch.ops.d2g_fast.*``). When it cannot be loaded the package still works through the
reference and Triton paths, but the reason is reported once, loudly: a silent slow path is
a bug report nobody can write.
"""
from __future__ import annotations

import os
import warnings

import torch  # loads libc10/libtorch, which d2g_fast._C links against

from d2g_fast import _build_record

# Plain Python values only: the dispatch rule reads them inside torch.compile'd code, where
# calls into a pybind11 module would break the graph.
_STATE: dict = {"loaded": False, "error": None, "cuda": False, "archs": "", "warned": False,
                "constants": {}}


def _load() -> None:
    if os.environ.get("D2G_NO_EXT", "") not in ("", "0"):
        _STATE["error"] = "disabled by the environment variable D2G_NO_EXT"
        return
    # Checked before the import: loading an extension compiled for another torch can fail with
    # an obscure undefined symbol or, worse, load and misbehave.
    mismatch = _build_record.torch_mismatch(
        _build_record.read(os.path.dirname(os.path.abspath(__file__))), torch.__version__)
    if mismatch is not None:
        _STATE["error"] = mismatch
        _STATE["warned"] = True
        warnings.warn(f"d2g_fast: {mismatch} Until then the ops run their slow pure-PyTorch "
                      f"reference (or Triton) paths.", RuntimeWarning, stacklevel=2)
        return
    try:
        from d2g_fast import _C  # noqa: F401  (static initialisers register the ops)
    except Exception as exc:  # ImportError, OSError (undefined symbol, ABI mismatch), ...
        _STATE["error"] = f"{type(exc).__name__}: {exc}"
        return
    _STATE["loaded"] = True
    _STATE["cuda"] = bool(_C.compiled_with_cuda())
    _STATE["archs"] = str(_C.cuda_archs())
    _STATE["constants"] = dict(_C.constants())


_load()


def ext_loaded() -> bool:
    """True when the compiled extension is importable and its ops are registered."""
    return _STATE["loaded"]


def ext_error() -> str | None:
    """Why the extension is not available (None when it is)."""
    return _STATE["error"]


def cuda_kernels_compiled() -> bool:
    return _STATE["cuda"]


def cuda_archs() -> str:
    return _STATE["archs"]


def constant(name: str) -> int:
    """A constant the C++ kernels define (csrc/module.cpp lists them), e.g.
    ``"multiscale_heads_stat_rows"``; only the compiled paths need them, so it raises when the
    extension is not loaded."""
    if not _STATE["loaded"]:
        raise RuntimeError(f"d2g_fast: the constant {name!r} comes from the compiled extension, "
                           f"which is not available ({_STATE['error']})")
    return _STATE["constants"][name]


def warn_missing_once(op: str) -> None:
    """Report the missing extension the first time an op has to fall back because of it."""
    if _STATE["warned"] or _STATE["loaded"]:
        return
    _STATE["warned"] = True
    warnings.warn(
        f"d2g_fast: the compiled extension d2g_fast._C is not available "
        f"({_STATE['error']}); '{op}' and every other op fall back to the slow pure-PyTorch "
        f"reference. Rebuild with `{_build_record.REBUILD_COMMAND}` (see README.md) "
        f"or pass impl='ref' to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
