"""Pure-PyTorch reference of the paired latent augmentation: the test oracle and the fallback.

Written step by step from the math of the ADA pipeline (see d2g_fast/augment_params.py):

1. reflect-pad the latent by the batch margins (x0, x1, y0, y1);
2. upsample 2x: insert zeros between samples and filter with the 12-tap sym6 low-pass filter
   (gain 2 per axis), ``U[a] = 2 * sum_t f[t] * Pz[a + 5 - t]``;
3. resample U bilinearly (zeros outside) on a grid of 2(H+6) x 2(W+6) points through the
   per-sample affine map of :meth:`AugmentParams.sampling_affine`;
4. downsample 2x with the same filter, reversed: ``out[q] = sum_k f[k] * S[2q + k + 1]``, which
   also crops back to H x W;
5. colour: brightness, contrast (mean over C, H, W), saturation (mean over C);
6. cutout: zero a rectangle.

The same transform is applied to ``x`` and ``y``; each tensor uses its own means.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from d2g_fast.augment_params import FILTER_PAD, AugmentParams

# Scaling (low-pass) filter of the Symlet-6 wavelet, 12 taps (the PyWavelets ``sym6``
# reconstruction low-pass filter); the pipeline normalises it to unit sum.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036,
        -0.007800708325034148)
TAPS = len(SYM6)


def resampling_filter(dtype=torch.float64, device="cpu") -> torch.Tensor:
    f = torch.tensor(SYM6, dtype=torch.float64)
    return (f / f.sum()).to(dtype=dtype, device=device)


def _depthwise_separable(img: torch.Tensor, kernel: torch.Tensor, stride: int,
                         pad: tuple[int, int]) -> torch.Tensor:
    """Correlate every channel with ``kernel`` along W then H (zero padding ``pad`` = (before,
    after) on both axes), keeping every ``stride``-th output."""
    c = img.shape[1]
    img = F.pad(img, [pad[0], pad[1], pad[0], pad[1]])
    kx = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    img = F.conv2d(img, kx, stride=(1, stride), groups=c)
    return F.conv2d(img, ky, stride=(stride, 1), groups=c)


def _geometry(img: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    n, c, h, w = img.shape
    f = resampling_filter(img.dtype, img.device)
    mx0, my0, mx1, my1 = params.margins
    padded = F.pad(img, [mx0, mx1, my0, my1], mode="reflect") if max(params.margins) > 0 else img
    hp, wp = padded.shape[2:]

    # 2x upsampling: zero insertion, then U[a] = 2 * sum_t f[t] Pz[a + 5 - t] per axis, i.e. a
    # correlation with the reversed filter after 6 zeros before and 5 after.
    zero_inserted = torch.zeros(n, c, 2 * hp, 2 * wp, dtype=img.dtype, device=img.device)
    zero_inserted[:, :, ::2, ::2] = padded
    up = _depthwise_separable(zero_inserted, 2 * f.flip(0), 1, (TAPS // 2, TAPS // 2 - 1))

    # Bilinear resampling of U at the transformed grid (zeros outside, pixel centres at +0.5).
    gh, gw = 2 * (h + 2 * FILTER_PAD), 2 * (w + 2 * FILTER_PAD)
    a = params.sampling_affine().to(device=img.device, dtype=torch.float64)
    jy, jx = torch.meshgrid(torch.arange(gh, dtype=torch.float64, device=img.device),
                            torch.arange(gw, dtype=torch.float64, device=img.device),
                            indexing="ij")
    ax = a[:, 0, None, None] * jx + a[:, 1, None, None] * jy + a[:, 2, None, None]
    ay = a[:, 3, None, None] * jx + a[:, 4, None, None] * jy + a[:, 5, None, None]
    grid = torch.stack([(2 * ax + 1) / up.shape[3] - 1, (2 * ay + 1) / up.shape[2] - 1], dim=-1)
    sampled = F.grid_sample(up, grid.to(img.dtype), mode="bilinear", padding_mode="zeros",
                            align_corners=False)

    # 2x downsampling: out[q] = sum_k f[k] S[2q + k + 1] (drop the first grid point).
    return _depthwise_separable(sampled[:, :, 1:, 1:], f, 2, (0, 0))


def _colour(img: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    view = lambda v: v.to(device=img.device, dtype=img.dtype).view(-1, 1, 1, 1)  # noqa: E731
    img = img + view(params.brightness)
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - mean) * view(params.contrast) + mean
    mean = img.mean(dim=1, keepdim=True)
    return (img - mean) * view(params.saturation) + mean


def cutout_mask(params: AugmentParams, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """(N, 1, H, W) mask of ``dtype``: 0 inside the cutout rectangle, 1 elsewhere.  The
    rectangle test runs in ``dtype`` too (float32, or float64 for float64 latents), as the
    pipeline's does at its precision."""
    h, w = params.height, params.width
    center = params.cutout_center.to(device=device, dtype=dtype)
    half = (params.cutout_size.to(dtype) / 2).to(device=device)
    u = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    v = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    keep_x = (u.view(1, 1, 1, w) - center[:, 0].view(-1, 1, 1, 1)).abs() >= half[:, 0].view(-1, 1, 1, 1)
    keep_y = (v.view(1, 1, h, 1) - center[:, 1].view(-1, 1, 1, 1)).abs() >= half[:, 1].view(-1, 1, 1, 1)
    return (keep_x | keep_y).to(dtype)


def _augment_one(img: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    out_dtype = img.dtype
    if img.dtype in (torch.float16, torch.bfloat16):
        img = img.float()  # the reference computes half types in float32
    if params.has_geometry:
        img = _geometry(img, params)
    if params.has_colour:
        img = _colour(img, params)
    if params.has_cutout:
        img = img * cutout_mask(params, img.device, img.dtype)
    return img.to(out_dtype)


def paired_augment(x: torch.Tensor, y: torch.Tensor, params: AugmentParams
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the transform described by ``params`` identically to ``x`` and ``y`` (N, C, H, W).
    Device-drawn parameters are first copied to the host (AugmentParams.to_host)."""
    params = params.to_host()
    if params.is_identity:
        return x.clone(), y.clone()
    return _augment_one(x, params), _augment_one(y, params)
