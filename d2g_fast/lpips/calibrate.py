"""Fit the non-negative linear heads of a LatentLPIPS on 2AFC judgements, as LPIPS does.

A 2AFC triplet is (reference, distortion p0, distortion p1, judge) with the BAPPS convention:
``judge`` is the FRACTION OF HUMANS WHO JUDGED p1 CLOSER TO THE REFERENCE (0: all preferred p0,
1: all preferred p1). Given distances d0 = D(ref, p0) and d1 = D(ref, p1), the 2AFC score is
the mean over triplets of ``judge * [d1 < d0] + (1 - judge) * [d0 < d1]`` with a tie counting
0.5: the expected agreement with a random human judge (BAPPS reports human agreement ~73.9 %).

Calibration (LPIPS's "lin" training): the trunk is frozen (eval mode, BatchNorm running
statistics). The distance of one layer is mean_hw(w_k . (n0 - n1)^2) with unit-normalised
features n, which is linear in the head weights: w_k . mean_hw((n0 - n1)^2). So the pooled
per-channel differences are computed once per triplet and the heads are fitted on them (no
dropout: it would act on the unpooled maps that the pooling removes). As in LPIPS's
``BCERankingLoss``, a small ranking network maps (d0, d1, d0 - d1, d0 / (d1 + 0.1),
d1 / (d0 + 0.1)) to the probability that p1 is preferred and is trained with binary
cross-entropy against ``judge``, with Adam (LPIPS: lr 1e-4, beta1 0.5, batch 50, 5 epochs then
5 epochs of linear decay); the heads are clamped non-negative after every step.

Python API::

    from d2g_fast.lpips import Triplets, calibrate_heads
    trip = Triplets(ref, p0, p1, judge)          # latents (N, C, H, W), judge (N,) in [0, 1]
    path = calibrate_heads("trunk.safetensors", trip, "my-vae.safetensors", epochs=10)
    loss = ELatentLPIPS.from_safetensors(path)   # trunk + heads + metadata in one file
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2g_fast.nn import elatentlpips_io as io

# LPIPS's Dist2LogitLayer: the ratio terms' offset and the hidden width.
RATIO_EPS = 0.1
RANKING_HIDDEN = 32


@dataclass
class Triplets:
    """2AFC triplets: latents ``ref``, ``p0``, ``p1`` (N, C, H, W) in model space and ``judge``
    (N,) = fraction of humans who judged p1 closer to ref (BAPPS convention)."""

    ref: torch.Tensor
    p0: torch.Tensor
    p1: torch.Tensor
    judge: torch.Tensor

    def __post_init__(self):
        shapes = {name: tuple(getattr(self, name).shape) for name in ("ref", "p0", "p1")}
        if len(set(shapes.values())) != 1 or len(shapes["ref"]) != 4:
            raise ValueError(f"Triplets: ref, p0 and p1 must be latent batches of one shape "
                             f"(N, C, H, W), got {shapes}")
        self.judge = self.judge.reshape(-1).float()
        if len(self.judge) != shapes["ref"][0]:
            raise ValueError(f"Triplets: judge must hold one value per triplet "
                             f"({shapes['ref'][0]}), got {len(self.judge)}")
        if len(self.judge) and not ((self.judge >= 0) & (self.judge <= 1)).all():
            raise ValueError("Triplets: judge values must lie in [0, 1] (fraction preferring p1)")

    def __len__(self) -> int:
        return len(self.judge)

    def subset(self, idx: torch.Tensor) -> "Triplets":
        return Triplets(self.ref[idx], self.p0[idx], self.p1[idx], self.judge[idx])


def two_afc_score(d0: torch.Tensor, d1: torch.Tensor, judge: torch.Tensor) -> float:
    """Mean of judge*[d1 < d0] + (1 - judge)*[d0 < d1] + 0.5*[d0 == d1], in [0, 1]."""
    d0, d1, judge = d0.reshape(-1).double(), d1.reshape(-1).double(), judge.reshape(-1).double()
    score = judge * (d1 < d0) + (1 - judge) * (d0 < d1) + 0.5 * (d0 == d1)
    return float(score.mean())


class RankingNet(nn.Module):
    """LPIPS's ranking network: (d0, d1) -> logit of P(p1 judged closer)."""

    def __init__(self, hidden: int = RANKING_HIDDEN):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(5, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                   nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([d0, d1, d0 - d1, d0 / (d1 + RATIO_EPS), d1 / (d0 + RATIO_EPS)], dim=1)
        return self.model(feats).squeeze(1)


def _unit(f: torch.Tensor) -> torch.Tensor:
    from d2g_fast.nn.elatentlpips import EPS  # noqa: PLC0415
    return f / torch.sqrt(f.square().sum(dim=1, keepdim=True) + EPS)


@torch.no_grad()
def pooled_differences(trunk: nn.Module, a: torch.Tensor, b: torch.Tensor, batch_size: int = 64,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """Per-channel mean_hw((n_a - n_b)^2) of the five taps, concatenated: (N, sum of tap
    channels), float64. ``trunk`` is a LatentVGG16BN in eval mode."""
    out = []
    for i in range(0, len(a), batch_size):
        fa = trunk.fast_features(a[i:i + batch_size].to(device))
        fb = trunk.fast_features(b[i:i + batch_size].to(device))
        out.append(torch.cat([(_unit(x.double()) - _unit(y.double())).square().mean(dim=(2, 3))
                              for x, y in zip(fa, fb)], dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, sum(trunk.tap_channels), dtype=torch.float64)


def _lpips_lr(epoch: int, epochs: int, lr: float) -> float:
    # LPIPS: constant for the first half of the epochs, then linear decay to 0.
    flat = (epochs + 1) // 2
    return lr if epoch < flat else lr * (epochs - epoch) / (epochs - flat + 1)


def fit_heads(m0: torch.Tensor, m1: torch.Tensor, judge: torch.Tensor, *, epochs: int = 10,
              lr: float = 1e-4, batch_size: int = 50, seed: int = 0,
              init: torch.Tensor | None = None) -> torch.Tensor:
    """Fit the concatenated non-negative head weights on pooled differences.

    Args:
        m0, m1: (N, D) pooled differences (ref vs p0, ref vs p1), see :func:`pooled_differences`.
        judge: (N,) fraction of humans preferring p1.
        epochs, lr, batch_size, seed: Adam(beta1 0.5) schedule as LPIPS (see module docstring).
        init: (D,) starting weights (default: uniform in [0, C_k^-1/2) as LinearHead).

    Returns:
        (D,) float32 non-negative weights.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"fit_heads: epochs and batch_size must be >= 1 and lr > 0, got "
                         f"{epochs}, {batch_size}, {lr}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rank = RankingNet()
    w = (init.clone().float() if init is not None
         else torch.rand(m0.shape[1], generator=g) * m0.shape[1] ** -0.5)
    w.requires_grad_(True)
    opt = torch.optim.Adam([w, *rank.parameters()], lr=lr, betas=(0.5, 0.999))
    m0, m1, judge = m0.float(), m1.float(), judge.float()
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = _lpips_lr(epoch, epochs, lr)
        order = torch.randperm(len(judge), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            logit = rank(m0[idx] @ w, m1[idx] @ w)
            loss = F.binary_cross_entropy_with_logits(logit, judge[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                w.clamp_(min=0.0)  # LPIPS clamp_weights(): a distance needs non-negative weights
    return w.detach()


def _module_with_trunk(trunk_path: str | os.PathLike, device) -> "torch.nn.Module":
    from d2g_fast.nn.elatentlpips import ELatentLPIPS  # noqa: PLC0415

    spec = io.spec_of_file(trunk_path)
    if spec.latent_channels is None:
        raise ValueError(f"calibrate: trunk {str(trunk_path)!r} is not a d2g_fast safetensors trunk "
                         "(from 'd2g lpips train-trunk' / train_trunk) recording its latent space")
    model = ELatentLPIPS(pretrained=False, encoder=spec.encoder, augment=None, verbose=False,
                         trunk_path=trunk_path)
    return model.to(device).eval()


def calibrate_heads(trunk_path: str | os.PathLike, triplets: Triplets, output: str | os.PathLike,
                    *, val_triplets: Triplets | None = None, val_fraction: float = 0.1,
                    epochs: int = 10, lr: float = 1e-4, batch_size: int = 50, seed: int = 0,
                    device: str | torch.device = "cpu") -> Path:
    """Fit heads for the trunk file ``trunk_path`` and write ONE module file ``output``.

    Args:
        trunk_path: our safetensors trunk (from :func:`d2g_fast.lpips.train_trunk`).
        triplets: training :class:`Triplets` (latents with the trunk's channel count).
        output: the safetensors module file to write (trunk + heads; metadata as the trunk's
            plus ``two_afc_train`` / ``two_afc_val``, scores in [0, 1]).
        val_triplets: held-out triplets; default: a seeded ``val_fraction`` of ``triplets``.
        epochs, lr, batch_size, seed: see :func:`fit_heads`.
        device: where the frozen trunk runs.

    Returns:
        ``output`` as a Path; ``ELatentLPIPS.from_safetensors(output)`` loads it.
    """
    from d2g_fast.lpips.trunk import split_indices  # noqa: PLC0415

    model = _module_with_trunk(trunk_path, device)
    if triplets.ref.shape[1] != model.latent_channels:
        raise ValueError(f"calibrate: triplets have {triplets.ref.shape[1]} latent channels, the "
                         f"trunk {str(trunk_path)!r} takes {model.latent_channels}")
    if val_triplets is None and val_fraction > 0:
        train_idx, val_idx = split_indices(len(triplets), val_fraction, seed)
        triplets, val_triplets = triplets.subset(train_idx), triplets.subset(val_idx)
    if len(triplets) == 0:
        raise ValueError("calibrate: no training triplets")
    m0 = pooled_differences(model.net, triplets.ref, triplets.p0, device=device)
    m1 = pooled_differences(model.net, triplets.ref, triplets.p1, device=device)
    w = fit_heads(m0, m1, triplets.judge, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    set_head_weights(model, w)
    scores = {"two_afc_train": two_afc_score(m0 @ w.double(), m1 @ w.double(), triplets.judge)}
    if val_triplets is not None and len(val_triplets):
        scores["two_afc_val"] = two_afc_of_module(model, val_triplets, device=device)
    meta = io.read_safetensors_metadata(trunk_path)
    extra = {k: meta[k] for k in ("top1", "num_classes") if k in meta}
    model.save_safetensors(output, **extra, **{k: f"{v:.6f}" for k, v in scores.items()})
    return Path(output)


def set_head_weights(model, w: torch.Tensor) -> None:
    """Copy the concatenated weights ``w`` (sum of tap channels,) into the module's heads."""
    with torch.no_grad():
        for head, part in zip(model.lins, w.split(model.chns)):
            head.weight.copy_(part.view_as(head.weight))


@torch.no_grad()
def module_distances(model, a: torch.Tensor, b: torch.Tensor, batch_size: int = 64,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """(N,) distances of an ELatentLPIPS without augmentation and without the L1 term (the
    calibrated perceptual distance)."""
    out = [model(a[i:i + batch_size].to(device), b[i:i + batch_size].to(device),
                 ensembling=False, add_l1_loss=False).reshape(-1).cpu()
           for i in range(0, len(a), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def two_afc_of_module(model, triplets: Triplets, batch_size: int = 64,
                      device: str | torch.device = "cpu") -> float:
    """2AFC score in [0, 1] of an ELatentLPIPS (any weights it loads) on ``triplets``."""
    d0 = module_distances(model, triplets.ref, triplets.p0, batch_size, device)
    d1 = module_distances(model, triplets.ref, triplets.p1, batch_size, device)
    return two_afc_score(d0, d1, triplets.judge)
