"""The discriminator's readout heads: parameters in a module, math in the fused op.

Head design (chosen to be simple and fusable into one op, see d2g_fast/ref/multiscale_heads.py):
per pixel a plain LayerNorm over channels (no affine), SiLU, then a 1x1 conv to ONE logit.
The heads have no spatial extent: everything spatial is the UNet's job, the heads only read
out what the features already say at every pixel, at every scale.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from d2g_fast.ref.multiscale_heads import head_logits


class MultiScaleHeads(nn.Module):
    def __init__(self, channels: Sequence[int], head_weights: Sequence[float] | None = None,
                 eps: float = 1e-5, impl: str = "auto"):
        super().__init__()
        if len(channels) == 0:
            raise ValueError("MultiScaleHeads: 'channels' must name at least one head")
        self.channels = [int(c) for c in channels]
        k = len(self.channels)
        if head_weights is None:
            head_weights = [1.0 / k] * k  # the loss scale does not depend on the head count
        if len(head_weights) != k:
            raise ValueError(f"MultiScaleHeads: 'head_weights' has {len(head_weights)} entries "
                             f"for {k} heads")
        self.head_weights = [float(w) for w in head_weights]
        self.eps = float(eps)
        self.impl = impl
        # std 1/sqrt(C): the initial logits are O(1) on unit-variance SiLU(LayerNorm) features.
        self.weight = nn.ParameterList(
            [nn.Parameter(torch.randn(c) / math.sqrt(c)) for c in self.channels])
        self.bias = nn.Parameter(torch.zeros(k))

    def forward(self, features: Sequence[torch.Tensor], target: torch.Tensor,
                impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, scores (K, N)) for target (N,) of +1 (real) / -1 (fake)."""
        from d2g_fast.ops.multiscale_heads import multiscale_heads

        return multiscale_heads(list(features), list(self.weight), self.bias, target,
                                self.head_weights, eps=self.eps, impl=impl or self.impl)

    def logits(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The logit maps (N, H_k, W_k) of every head (reference math; for inspection)."""
        return [head_logits(f, w, self.bias[k], self.eps)
                for k, (f, w) in enumerate(zip(features, self.weight))]

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """The discriminator's scalar output per sample: sum_k head_weights[k] * scores[k]."""
        w = torch.tensor(self.head_weights, dtype=scores.dtype, device=scores.device)
        return (w[:, None] * scores).sum(0)
