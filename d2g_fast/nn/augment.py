"""``PairedAugment``: one random differentiable augmentation per sample, applied identically to a
generated and a target latent (the ensemble of E-LatentLPIPS)."""
from __future__ import annotations

import torch

from d2g_fast.augment_params import (AugmentParams, device_sampler_available, parse_preset,
                                     sampling_dtype)
from d2g_fast.ops.paired_augment import paired_augment

SAMPLERS = ("auto", "host", "device")


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
        sampler: where the per-sample parameters are drawn.
            "host": on the CPU with torch's CPU generator, in the official draw order
            (:meth:`AugmentParams.sample`: the same seed reproduces the official pipeline,
            float64 latents the official pipeline run in float64);
            a GPU call then pays ~0.1-0.25 ms of host work and cannot be captured in a CUDA
            graph (a graph would replay the same parameters).
            "device": on the latents' device (:meth:`AugmentParams.sample_on_device`: the same
            distributions, other numbers; one kernel launch, no host synchronisation,
            CUDA-graph safe; ``torch.manual_seed`` reproduces it).
            "auto" (default): "device" for CUDA latents when the compiled sampler is available,
            no CPU generator is passed, no ``debug_percentile`` is asked for and impl is not
            "ref"; "host" otherwise (so CPU latents keep the official-compatible draws).

    ``forward(x, y, generator=None, debug_percentile=None, params=None)`` draws the per-sample
    parameters from ``generator`` (None = the default generator of the sampling device; a CPU
    generator selects host sampling under "auto"), or uses ``params`` when given.
    ``debug_percentile`` in [0, 1) gives the deterministic mode of the official pipeline (host
    sampling only).  The module has no state and no learnable parameters.
    """

    def __init__(self, preset: str = "bg", p: float = 1.0, impl: str = "auto", sampler: str = "auto"):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.preset = parse_preset(preset)
        self.p = float(p)
        self.impl = impl
        self.sampler = sampler

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, p={self.p}, impl={self.impl!r}, sampler={self.sampler!r}"

    def resolve_sampler(self, x: torch.Tensor, generator: torch.Generator | None = None,
                        debug_percentile: float | None = None) -> str:
        """"host" or "device": where :meth:`sample_params` draws for these arguments."""
        if self.sampler != "auto":
            return self.sampler
        use_device = (x.is_cuda and device_sampler_available("cuda") and debug_percentile is None
                      and self.impl != "ref"
                      and (generator is None or generator.device.type == x.device.type))
        return "device" if use_device else "host"

    def sample_params(self, x: torch.Tensor, generator: torch.Generator | None = None,
                      debug_percentile: float | None = None) -> AugmentParams:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        n, c, h, w = x.shape
        if self.resolve_sampler(x, generator, debug_percentile) == "device":
            if debug_percentile is not None:
                raise ValueError("debug_percentile needs sampler='host' (or 'auto'); the device "
                                 "sampler has no deterministic mode")
            return AugmentParams.sample_on_device(self.preset, n, h, w, num_channels=c, p=self.p,
                                                  device=x.device, generator=generator)
        return AugmentParams.sample(self.preset, n, h, w, num_channels=c, generator=generator,
                                    debug_percentile=debug_percentile, p=self.p,
                                    dtype=sampling_dtype(x.dtype))

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                debug_percentile: float | None = None, params: AugmentParams | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if params is None:
            params = self.sample_params(x, generator, debug_percentile)
        return paired_augment(x, y, params, impl=self.impl)
