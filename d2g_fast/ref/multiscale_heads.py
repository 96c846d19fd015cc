"""Pure-PyTorch reference of the fused multi-scale discriminator heads.

One head k reads a feature map f_k of shape (N, C_k, H_k, W_k) and gives one logit per pixel:

    xhat  = (f - mean_c f) / sqrt(var_c f + eps)      # plain LayerNorm over channels, no affine
    a     = SiLU(xhat)
    logit = sum_c w_k[c] * a[c] + b_k                  # 1x1 conv to one channel

The non-saturating GAN loss of the batch, with target[n] = +1 for "real" and -1 for "fake":

    loss   = sum_k head_weights[k] * mean_{n,h,w} softplus(-target[n] * logit_k[n,h,w])
    scores = (K, N): the spatial mean logit of every head and sample

``scores`` is what R1 differentiates (the discriminator's raw output) and what accuracy is
measured on; ``loss`` is what the optimiser sees. This file is the test oracle and the
fallback, written from the formulas above, independently of the kernels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from d2g_fast._dispatch import accumulation_dtype


def head_logits(feature: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float = 1e-5) -> torch.Tensor:
    """Logit map (N, H, W) of one head, computed in float32 (float64 for float64 inputs)."""
    acc = accumulation_dtype(feature.dtype)
    f = feature.to(acc)
    xhat = F.layer_norm(f.movedim(1, -1), (f.shape[1],), eps=eps)  # normalise over channels
    a = F.silu(xhat)
    return torch.einsum("nhwc,c->nhw", a, weight.to(acc)) + bias.to(acc)


def multiscale_heads(features: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                     bias: torch.Tensor, target: torch.Tensor,
                     head_weights: Sequence[float], eps: float = 1e-5,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss: scalar, scores: (K, N)); see the module docstring."""
    losses = []
    scores = []
    for k, (f, w) in enumerate(zip(features, weights)):
        logit = head_logits(f, w, bias[k], eps)
        t = target.to(logit.dtype).view(-1, 1, 1)
        losses.append(float(head_weights[k]) * F.softplus(-t * logit).mean())
        scores.append(logit.mean(dim=(1, 2)))
    return torch.stack(losses).sum(), torch.stack(scores)
