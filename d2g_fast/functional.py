"""Functional forms of the package's losses, for code that prefers calls over modules."""
from __future__ import annotations

import torch

__all__ = ["e_latent_lpips"]

REDUCTIONS = ("none", "mean", "sum")


def e_latent_lpips(x: torch.Tensor, y: torch.Tensor, model: "torch.nn.Module", *,
                   normalize: bool = False, ensembling: bool | None = None,
                   add_l1_loss: bool = True, reduction: str = "mean") -> torch.Tensor:
    """E-LatentLPIPS between latent batches ``x`` (prediction) and ``y`` (target).

    ``model`` is a :class:`d2g_fast.ELatentLPIPS` (built once by the caller: it holds the
    trunk, the heads and the augmentation). ``ensembling`` defaults to "augment if the model
    has an augmentation". Returns the per-sample distances (N,) with ``reduction="none"``
    (or the (N, 1, H, W) maps of a ``spatial`` model), else their mean or sum.
    """
    from d2g_fast.nn.elatentlpips import ELatentLPIPS  # noqa: PLC0415

    if not isinstance(model, ELatentLPIPS):
        raise TypeError(f"e_latent_lpips: model must be a d2g_fast.ELatentLPIPS, got "
                        f"{type(model).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"e_latent_lpips: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if ensembling is None:
        ensembling = model.augment is not None
    dist = model(x, y, normalize=normalize, ensembling=ensembling, add_l1_loss=add_l1_loss)
    if not model.spatial:
        dist = dist.view(-1)
    if reduction == "mean":
        return dist.mean()
    if reduction == "sum":
        return dist.sum()
    return dist
