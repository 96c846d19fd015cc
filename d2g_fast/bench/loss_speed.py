"""The regression loss alone, forward + backward: E-LatentLPIPS against pixel LPIPS with VAE decode.

This is the paper's comparison (its project page: on an A100, decode + pixel LPIPS 117 ms and
15 GB extra per iteration, E-LatentLPIPS 12.1 ms and 0.6 GB). Both losses take the generator's
latent (requires grad) and the teacher's latent (no grad), as in a training step:

    e-latentlpips   d2g_fast.ELatentLPIPS with the "bg" augmentation, the architecture's latent
                    space, random trunk and heads (speed does not depend on the weights)
    pixel-lpips     decode both latents with the architecture's VAE decoder (random weights; the
                    target's decode without autograd) and run lpips 0.1.4 (VGG, random trunk:
                    ``pnet_rand=True``, nothing downloaded) on the images
Both run at the same precision ("bf16": bfloat16 compute / autocast; "fp32").
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

LOSSES = ("e-latentlpips", "pixel-lpips")


class Unavailable(Exception):
    """This loss cannot run here (a package is missing); the reason is the message."""


def make_loss_fn(loss: str, arch: str, *, device: str, batch: int, precision: str,
                 seed: int = 0) -> Callable[[], torch.Tensor]:
    """A zero-argument function running ``loss`` forward + backward on one latent batch.

    Args:
        loss: one of :data:`LOSSES`; arch: one of :data:`d2g_fast.bench.archs.ARCHS`.
        batch: latents per call; precision: "bf16" or "fp32".
    Returns:
        The function; it returns the per-sample loss [batch, ...] (detached).
    Raises:
        Unavailable: lpips is not installed (pixel-lpips).
    """
    from d2g_fast.bench import archs

    if loss not in LOSSES:
        raise ValueError(f"loss: one of {LOSSES}, got {loss!r}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision: 'bf16' or 'fp32', got {precision!r}")
    info = archs.ARCH_INFO[archs.check_arch(arch)]
    shape = archs.latent_shape(arch)
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, *shape, generator=gen).to(device)
    pred = (target + 0.5 * torch.randn(batch, *shape, generator=gen).to(device)) \
        .requires_grad_(True)
    if loss == "e-latentlpips":
        from d2g_fast import ELatentLPIPS

        torch.manual_seed(seed)
        # check_inputs=False: no NaN-check device sync, as the trainer runs it.
        model = ELatentLPIPS(pretrained=False, pnet_rand=True, verbose=False,
                             encoder=info.lpips_encoder, augment="bg", precision=precision,
                             check_inputs=False).to(device)

        def compute():
            return model(pred, target)
    else:
        try:
            import lpips
        except Exception as exc:
            raise Unavailable(f"lpips is not importable: {type(exc).__name__}: {exc}") from None
        vae = archs.vae_decoder(arch, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metric = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval().to(device)
        metric.requires_grad_(False)
        device_type = torch.device(device).type

        def compute():
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16,
                                enabled=precision == "bf16"):
                image = vae.decode(pred / info.scaling_factor).sample
                with torch.no_grad():
                    image_target = vae.decode(target / info.scaling_factor).sample
                return metric(image, image_target).float()

    def fwd_bwd():
        pred.grad = None
        out = compute()
        out.sum().backward()
        return out.detach()
    return fwd_bwd
