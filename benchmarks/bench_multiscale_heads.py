"""Fused multi-scale discriminator heads at SD1.5 shapes (a 64x64 latent), every provider.

The 13 heads of DiffusionDiscriminator on the SD1.5 UNet: per up block (8, 16, 32, 64 px) the
features before the skip connection, at it (the concatenation) and after it, plus the UNet
output. On a GPU, two single-head cases show where the time goes: the low-resolution,
many-channel head (8x8, C = 2560: latency-bound unless its channels are split over threads) and
the largest 64x64 head (C = 960: bandwidth-bound).

Bytes (the GB/s and "of floor" columns) are the least any implementation must move: forward,
read the features once and write the 5 per-pixel stats (4 bytes each) the backward needs;
backward, read the features and the stats once and write the feature gradient once. The fused
forward actually reads the features twice (moments, then logits; the second pass partly hits
L2), so its forward cannot exceed about half the copy floor.
"""
from __future__ import annotations

import torch

from benchmarks.harness import COMPILED, Case, compiled, require_backend

# (C, H, W) of the 13 taps of the SD1.5 discriminator for a 64x64 latent
# (names: up{i}.before, up{i}.skip, up{i}.after for i = 0..3, then final).
SD15_HEADS = [
    (1280, 8, 8), (2560, 8, 8), (1280, 8, 8),
    (1280, 16, 16), (2560, 16, 16), (1280, 16, 16),
    (1280, 32, 32), (1920, 32, 32), (640, 32, 32),
    (640, 64, 64), (960, 64, 64), (320, 64, 64),
    (4, 64, 64),
]


def _heads_fn(provider):
    """(features, weights, bias, target, head_weights) -> (loss, scores) of one provider."""
    from d2g_fast.ops import multiscale_heads
    from d2g_fast.ref.multiscale_heads import multiscale_heads as reference
    if provider == COMPILED:
        return compiled(reference)
    return lambda *args: multiscale_heads(*args, impl=provider)


def _make(provider, N, shapes, dtype, device):
    def make():
        if provider in ("cpu", "cuda", "triton"):
            require_backend("multiscale_heads", provider, device)
        heads = _heads_fn(provider)
        # Drawn on the device: 215 M numbers (SD1.5, N = 16) take seconds on the host, and this
        # file runs in a time box on the GPU machine.
        g = torch.Generator(device=device).manual_seed(0)
        feats = [torch.randn(N, c, h, w, generator=g, device=device).to(dtype).requires_grad_(True)
                 for c, h, w in shapes]
        ws = [(torch.randn(c, generator=g, device=device) / c ** 0.5).requires_grad_(True)
              for c, _, _ in shapes]
        bias = torch.zeros(len(shapes), device=device, requires_grad=True)
        target = torch.cat([torch.ones(N // 2), -torch.ones(N - N // 2)]).to(device)
        hw = [1.0 / len(shapes)] * len(shapes)
        leaves = feats + ws + [bias]

        def run():
            loss, scores = heads(feats, ws, bias, target, hw)
            return loss

        def fwd():
            with torch.no_grad():
                return run()

        state = {"out": run()}

        def bwd():
            return torch.autograd.grad(state["out"], leaves, retain_graph=True)

        def fwd_bwd():
            return torch.autograd.grad(run(), leaves)

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    return make


STAT_BYTES = 5 * 4  # per pixel: logit, mean, rstd, m1, m2 in fp32


def _case(provider, N, shapes, dtype, device, config):
    elt = torch.empty((), dtype=dtype).element_size()
    feat = sum(N * c * h * w for c, h, w in shapes) * elt
    pix = sum(N * h * w for _, h, w in shapes)
    return Case(op="multiscale_heads", config=config, provider=provider,
                make=_make(provider, N, shapes, dtype, device),
                bytes=feat + STAT_BYTES * pix, bwd_bytes=2 * feat + STAT_BYTES * pix,
                flops=12 * feat / elt, note="ref = d2g_fast/ref (LayerNorm, SiLU, einsum, softplus)")


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    dt = lambda d: str(d).replace("torch.", "")  # noqa: E731
    if device.startswith("cuda"):
        # Ordered by importance (gpu_check.sh gives this file a time box): the full SD1.5 call
        # in fp32, the two single-head cases, then bf16.
        providers = ["ref", "cuda", "triton", COMPILED]
        for provider in providers:
            out.append(_case(provider, 16, SD15_HEADS, torch.float32, device,
                             "SD1.5 13 heads N=16 float32"))
        for c, h, w in [(2560, 8, 8), (960, 64, 64)]:
            for provider in providers:
                out.append(_case(provider, 16, [(c, h, w)], torch.float32, device,
                                 f"one head {h}x{w} C={c} N=16 float32"))
        for provider in providers:
            out.append(_case(provider, 16, SD15_HEADS, torch.bfloat16, device,
                             "SD1.5 13 heads N=16 bfloat16"))
        return out
    # The discriminator's real batches on a CPU: N = 2 (quick) up to 16, fp32 and bf16.
    providers = ["ref", "cpu", COMPILED]
    variants = [(2, torch.float32), (2, torch.bfloat16)] if quick else \
        [(2, torch.float32), (2, torch.bfloat16), (8, torch.float32), (8, torch.bfloat16),
         (16, torch.float32), (16, torch.bfloat16)]
    for N, dtype in variants:
        for provider in providers:
            out.append(_case(provider, N, SD15_HEADS, dtype, device,
                             f"SD1.5 13 heads N={N} {dt(dtype)}"))
    return out
