"""Reference LatentLPIPS per-layer distance, written straight from the definition."""
from __future__ import annotations

import torch

from d2g_fast._dispatch import accumulation_dtype

EPS = 1e-8


def _unit_normalize(f: torch.Tensor) -> torch.Tensor:
    return f / torch.sqrt((f * f).sum(dim=1, keepdim=True) + EPS)


def lpips_distance(f0: torch.Tensor, f1: torch.Tensor, weight: torch.Tensor,
                   spatial: bool = False) -> torch.Tensor:
    """Per sample ``mean_hw sum_c w_c (f0/|f0| - f1/|f1|)^2`` with ``|f| = sqrt(sum_c f^2 + 1e-8)``.

    Returns (N,) or, with ``spatial``, the (N, 1, H, W) map. Half-precision inputs are
    computed in float32 (as the kernels accumulate); the result is float32 (float64 for
    float64 inputs).
    """
    acc = accumulation_dtype(f0.dtype)
    a = _unit_normalize(f0.to(acc))
    b = _unit_normalize(f1.to(acc))
    diff2 = (a - b) ** 2
    dist_map = (diff2 * weight.to(acc).view(1, -1, 1, 1)).sum(dim=1, keepdim=True)
    return dist_map if spatial else dist_map.mean(dim=(1, 2, 3))


def lpips_distance_multi(f0s, f1s, weights) -> torch.Tensor:
    """The distance of several layers at once: (L, N), row l = ``lpips_distance(f0s[l],
    f1s[l], weights[l])`` (per-sample spatial means). Layers may differ in C, H, W; they share
    the batch N."""
    return torch.stack([lpips_distance(a, b, w.reshape(-1)) for a, b, w in zip(f0s, f1s, weights)])
