"""``PairedAugment``: one random differentiable augmentation per sample, applied identically to a
generated and a target latent (the ensemble of E-LatentLPIPS)."""
from __future__ import annotations

import torch

from d2g_fast.augment_params import AugmentParams, parse_preset
from d2g_fast.ops.paired_augment import paired_augment


class PairedAugment(torch.nn.Module):
    """``x_aug, y_aug = PairedAugment("bg")(x, y)``.

    Args:
        preset: letters of ``"bgco"``: b = x-flip / 90-degree rotation / integer translation,
            g = scale / rotation / anisotropic scale / fractional translation, c = brightness /
            contrast / saturation, o = cutout.  The official presets are b, g, c, o, co, bg
            (default), bgc, bgco; any other combination works too.
        p: ADA probability multiplier; 1 (default, as in E-LatentLPIPS) fires every transform.
        impl: backend of :func:`d2g_fast.ops.paired_augment` ("auto", "ref", "cpu", "cuda",
            "triton").

    ``forward(x, y, generator=None, debug_percentile=None, params=None)`` draws the per-sample
    parameters on the CPU from ``generator`` (a CPU ``torch.Generator``; None = torch's default
    one), or uses ``params`` when given.  ``debug_percentile`` in [0, 1) gives the deterministic
    mode of the official pipeline.  The module has no state and no learnable parameters.
    """

    def __init__(self, preset: str = "bg", p: float = 1.0, impl: str = "auto"):
        super().__init__()
        self.preset = parse_preset(preset)
        self.p = float(p)
        self.impl = impl

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, p={self.p}, impl={self.impl!r}"

    def sample_params(self, x: torch.Tensor, generator: torch.Generator | None = None,
                      debug_percentile: float | None = None) -> AugmentParams:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        n, c, h, w = x.shape
        return AugmentParams.sample(self.preset, n, h, w, num_channels=c, generator=generator,
                                    debug_percentile=debug_percentile, p=self.p)

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                debug_percentile: float | None = None, params: AugmentParams | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if params is None:
            params = self.sample_params(x, generator, debug_percentile)
        return paired_augment(x, y, params, impl=self.impl)
