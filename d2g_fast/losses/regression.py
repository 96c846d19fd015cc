"""G's regression losses to the teacher's ODE endpoint (paper section 3, its loss ablation).

Every loss is a module ``loss(fake, target) -> (N,)`` (one distance per sample) on latents in the
teacher's model space (N, C, h, w), chosen by ``TrainConfig.regression_loss``:

- ``e_latentlpips`` (default): d2g_fast's ELatentLPIPS, with the run's augmentation
  (``--augment``); with ``--augment none`` it is plain LatentLPIPS (no ensembling).
- ``mse``: mean squared error over the latent's elements.
- ``pseudo_huber``: sqrt(|x - y|^2 + c^2) - c over the whole latent, c = 0.00054 sqrt(d) with d
  the latent's element count (the constant of Song & Dhariwal's improved consistency training).
- ``pixel_lpips``: LPIPS (the ``lpips`` package, VGG16 trunk) between the VAE decodings of the
  two latents; the fake is decoded with gradients, the target without. The ``lpips`` package
  ships only its calibrated linear heads (lpips/weights/v0.1/vgg.pth); the VGG16 trunk would be
  downloaded from torchvision, which this package never does, so the trunk is RANDOM
  (``pnet_rand=True``, drawn from the run's seed). It is the paper's loss in shape, not its
  ImageNet features.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn

REGRESSION_LOSSES = ("e_latentlpips", "mse", "pseudo_huber", "pixel_lpips")
# Improved consistency training's Pseudo-Huber constant per sqrt(element count).
PSEUDO_HUBER_C = 0.00054


class LatentLPIPSLoss(nn.Module):
    """E-LatentLPIPS with augmentation ensembling, or LatentLPIPS when the module has none."""

    def __init__(self, lpips: nn.Module):
        super().__init__()
        self.lpips = lpips

    def forward(self, fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ensembling = getattr(self.lpips, "augment", None) is not None
        return self.lpips(fake, target, ensembling=ensembling).flatten(1).mean(1)


class MSELoss(nn.Module):
    def forward(self, fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (fake.float() - target.float()).square().flatten(1).mean(1)


class PseudoHuberLoss(nn.Module):
    def forward(self, fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = (fake.float() - target.float()).flatten(1)
        c = PSEUDO_HUBER_C * math.sqrt(diff.shape[1])
        return (diff.square().sum(1) + c * c).sqrt() - c


class PixelLPIPSLoss(nn.Module):
    """LPIPS-VGG (random trunk, shipped linear heads) of the VAE-decoded latents."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        import lpips

        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(vae.config.scaling_factor)
        with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" notices
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        self.lpips.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # frozen: always in eval mode (no dropout)
        return super().train(False)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.float() / self.scale).sample.clamp(-1, 1)

    def forward(self, fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_images = self.decode(target)
        return self.lpips(self.decode(fake), target_images).flatten(1).mean(1)


def load_vae(teacher_folder: str):
    """The teacher's VAE (float32, frozen) from its pipeline folder."""
    from diffusers import AutoencoderKL

    path = os.path.join(teacher_folder, "vae")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"regression_loss (--regression-loss) pixel_lpips: the teacher "
                                f"folder has no VAE ({path!r} missing)")
    return AutoencoderKL.from_pretrained(path).float()


def make_regression_loss(name: str, lpips: nn.Module, teacher_folder: str) -> nn.Module:
    """The regression loss ``name`` (one of REGRESSION_LOSSES); ``lpips`` is the run's
    E-LatentLPIPS module, ``teacher_folder`` the teacher pipeline folder (its VAE)."""
    if name == "e_latentlpips":
        return LatentLPIPSLoss(lpips)
    if name == "mse":
        return MSELoss()
    if name == "pseudo_huber":
        return PseudoHuberLoss()
    if name == "pixel_lpips":
        return PixelLPIPSLoss(load_vae(teacher_folder))
    raise ValueError(f"regression_loss (--regression-loss): one of {REGRESSION_LOSSES}, "
                     f"got {name!r}")
