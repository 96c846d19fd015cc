"""LatentLPIPS per-layer distance: the five layers of a 64x64 latent, every provider.

Bytes: the forward must read f0 and f1 once (2 N C H W elements) and writes 5 floats per
pixel; the backward reads f0, f1 and the stats and writes two gradients (4 N C H W elements).
"""
from __future__ import annotations

import torch

from benchmarks.harness import Case, SkipCase

# Feature shapes of the five LatentLPIPS taps for a 64x64 latent (pools 4 and 5 kept).
LAYERS = [(64, 64, 64), (128, 64, 64), (256, 64, 64), (512, 32, 32), (512, 16, 16)]


def _provider_fn(provider: str):
    from d2g_fast.ops import lpips_distance
    from d2g_fast.ref.lpips_distance import lpips_distance as ref
    if provider == "ref-compiled":
        return torch.compile(lambda a, b, w: ref(a, b, w))
    if provider == "official-style":  # the official LPIPS formulation, layer by layer
        def official(a, b, w):
            na = a / torch.sqrt((a * a).sum(1, keepdim=True) + 1e-8)
            nb = b / torch.sqrt((b * b).sum(1, keepdim=True) + 1e-8)
            return torch.nn.functional.conv2d((na - nb) ** 2, w.view(1, -1, 1, 1)).mean((2, 3)).view(-1)
        return official
    return lambda a, b, w: lpips_distance(a, b, w, impl=provider)


def _make(provider, N, C, H, W, dtype, device, channels_last):
    def make():
        from d2g_fast import _dispatch
        if provider in ("cpu", "cuda", "triton"):
            try:
                _dispatch.resolve_impl("lpips_distance", provider, torch.device(device))
            except RuntimeError as exc:
                raise SkipCase(str(exc))
        fn = _provider_fn(provider)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        a = torch.randn(N, C, H, W, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
        b = torch.randn(N, C, H, W, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
        w = torch.rand(C, device=device, dtype=dtype)
        state = {}

        def fwd():
            with torch.no_grad():
                return fn(a, b, w)

        def fwd_bwd():
            out = fn(a, b, w)
            return torch.autograd.grad(out.sum(), (a, b))

        state["out"] = fn(a, b, w).sum()

        def bwd():
            return torch.autograd.grad(state["out"], (a, b), retain_graph=True)

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    return make


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    if device.startswith("cuda"):
        providers = ["ref", "official-style", "cuda", "triton"]
        # fp32 planar (parity setting) and bf16 channels_last (the loss's fast path).
        variants = [(16, torch.float32, False), (16, torch.bfloat16, True)]
    else:
        providers = ["ref", "official-style", "cpu"]
        variants = [(2 if quick else 4, torch.float32, False), (2 if quick else 4, torch.float32, True)]
    layers = LAYERS if not quick else LAYERS[:1] + LAYERS[3:4]
    for N, dtype, channels_last in variants:
        elt = torch.empty((), dtype=dtype).element_size()
        for C, H, W in layers:
            extra = ["ref-compiled"] if device.startswith("cuda") and (C, H, W) == LAYERS[0] else []
            feat = N * C * H * W * elt
            pix = N * H * W * 4
            config = f"N={N} {C}x{H}x{W} {str(dtype).replace('torch.', '')}{' cl' if channels_last else ''}"
            for provider in providers + extra:  # inductor's fused reference: once, it compiles slowly
                out.append(Case(
                    op="lpips_distance", config=config, provider=provider,
                    make=_make(provider, N, C, H, W, dtype, device, channels_last),
                    bytes=2 * feat + 5 * pix, bwd_bytes=4 * feat + 5 * pix, flops=10 * N * C * H * W))
    return out
