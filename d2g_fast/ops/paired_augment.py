"""Public op: the paired latent augmentation (one per-sample transform applied to x and y)."""
from __future__ import annotations

import torch

from d2g_fast._dispatch import resolve_impl
from d2g_fast.augment_params import AugmentParams
from d2g_fast.ref import paired_augment as _ref

OP = "paired_augment"
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_inputs(x, y, params) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{OP}: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{OP}: {name} must be float32/float64/float16/bfloat16, got {t.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"{OP}: x and y must have the same shape, got x {tuple(x.shape)} and "
                         f"y {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"{OP}: x and y must have the same dtype, got x {x.dtype} and y {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{OP}: x and y must be on the same device, got x on {x.device} and y on "
                         f"{y.device}")
    if not isinstance(params, AugmentParams):
        raise TypeError(f"{OP}: params must be an AugmentParams, got {type(params).__name__}")
    params.check(x, "x")


def paired_augment(x: torch.Tensor, y: torch.Tensor, params: AugmentParams, impl: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the per-sample transform ``params`` identically to ``x`` and ``y`` (N, C, H, W).

    Differentiable in x and y.  Identity parameters return copies of the inputs."""
    _check_inputs(x, y, params)
    backend = resolve_impl(OP, impl, x.device)
    if backend in ("cpu", "cuda") and not hasattr(torch.ops.d2g_fast, OP) and impl == "auto":
        backend = "ref"  # an extension built before this op existed
    if params.is_identity or backend == "ref":
        return _ref.paired_augment(x, y, params)
    raise NotImplementedError(f"{OP}: backend {backend!r} is not implemented yet")
