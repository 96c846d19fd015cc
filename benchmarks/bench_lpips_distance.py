"""LatentLPIPS per-layer distance: the five layers of a 64x64 latent, every provider; and the
five layers in one lpips_distance_multi call against five single-layer calls.

Bytes: the forward must read f0 and f1 once (2 N C H W elements; the kernels' second pass over
a pixel's channels reads from cache) and writes 6 floats per pixel (map + 5 stats); the backward
reads f0, f1 and the stats and writes two gradients (4 N C H W elements).
"""
from __future__ import annotations

import torch

from benchmarks.harness import COMPILED, Case, compiled, require_backend

# Feature shapes of the five LatentLPIPS taps for a 64x64 latent (pools 4 and 5 kept).
LAYERS = [(64, 64, 64), (128, 64, 64), (256, 64, 64), (512, 32, 32), (512, 16, 16)]


def _provider_fn(provider: str):
    from d2g_fast.ops import lpips_distance
    from d2g_fast.ref.lpips_distance import lpips_distance as ref
    if provider == COMPILED:
        return compiled(ref)
    if provider == "official-style":  # the official LPIPS formulation, layer by layer
        def official(a, b, w):
            na = a / torch.sqrt((a * a).sum(1, keepdim=True) + 1e-8)
            nb = b / torch.sqrt((b * b).sum(1, keepdim=True) + 1e-8)
            return torch.nn.functional.conv2d((na - nb) ** 2, w.view(1, -1, 1, 1)).mean((2, 3)).view(-1)
        return official
    return lambda a, b, w: lpips_distance(a, b, w, impl=provider)


def _make(provider, N, C, H, W, dtype, device, channels_last):
    def make():
        if provider in ("cpu", "cuda", "triton"):
            require_backend("lpips_distance", provider, device)
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


def _multi_fn(provider: str):
    """One call for every layer (multi), five single-layer calls (5x-*), or the reference."""
    from d2g_fast.ops import lpips_distance, lpips_distance_multi
    from d2g_fast.ref.lpips_distance import lpips_distance_multi as ref
    if provider == COMPILED:
        return compiled(ref)
    if provider.startswith("5x-"):
        impl = provider[3:]
        return lambda a, b, w: torch.stack([lpips_distance(x, y, v, impl=impl) for x, y, v in zip(a, b, w)])
    return lambda a, b, w: lpips_distance_multi(a, b, w, impl=provider)


def _make_multi(provider, N, size, dtype, device, channels_last):
    def make():
        backend = provider[3:] if provider.startswith("5x-") else provider
        if backend not in ("ref", COMPILED):
            require_backend("lpips_distance_multi", backend, device)
        fn = _multi_fn(provider)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        shapes = [(N, C, H * size // 64, W * size // 64) for C, H, W in LAYERS]
        a = [torch.randn(s, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
             for s in shapes]
        b = [torch.randn(s, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
             for s in shapes]
        w = [torch.rand(s[1], device=device) for s in shapes]  # float32 heads, as in the loss
        state = {"out": fn(a, b, w).sum()}

        def fwd():
            with torch.no_grad():
                return fn(a, b, w)

        def fwd_bwd():
            return torch.autograd.grad(fn(a, b, w).sum(), a + b)

        def bwd():
            return torch.autograd.grad(state["out"], a + b, retain_graph=True)

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    return make


def multi_cases(device: str, quick: bool) -> list[Case]:
    """The five taps in one lpips_distance_multi call vs five lpips_distance calls vs the
    reference (what ELatentLPIPS does per loss evaluation, without the trunk)."""
    out = []
    if device.startswith("cuda"):
        providers = ["cuda", "5x-cuda", "triton", "ref", COMPILED]  # (5x-triton: JIT time in a time box)
        variants = [(16, 64, torch.bfloat16, True), (16, 64, torch.float32, False)]
    else:
        # The loss's taps on a CPU: 32x32 latents (quick) and SD1.5's 64x64, N = 2.
        providers = ["cpu", "5x-cpu", "ref", COMPILED]
        variants = [(2, 32, torch.float32, False), (2, 32, torch.float32, True)] if quick else \
            [(2, 32, torch.float32, False), (2, 32, torch.float32, True), (2, 64, torch.float32, False),
             (2, 64, torch.float32, True)]
    for N, size, dtype, channels_last in variants:
        elt = torch.empty((), dtype=dtype).element_size()
        elems = sum(N * C * (H * size // 64) * (W * size // 64) for C, H, W in LAYERS)
        pixels = sum(N * (H * size // 64) * (W * size // 64) for _, H, W in LAYERS)
        config = f"N={N} 5 taps of {size}x{size} {str(dtype).replace('torch.', '')}{' cl' if channels_last else ''}"
        for provider in providers:
            out.append(Case(
                op="lpips_distance_multi", config=config, provider=provider,
                make=_make_multi(provider, N, size, dtype, device, channels_last),
                # forward: read f0, f1, write 5 stats per pixel; backward: read f0, f1 and the
                # stats, write both gradients.
                bytes=2 * elems * elt + 5 * 4 * pixels, bwd_bytes=4 * elems * elt + 5 * 4 * pixels,
                flops=14 * elems))
    return out


def cases(device: str, quick: bool) -> list[Case]:
    out = multi_cases(device, quick)  # first: what the loss runs (time-boxed GPU runs)
    if device.startswith("cuda"):
        providers = ["ref", "official-style", "cuda", "triton", COMPILED]
        # fp32 planar (parity setting) and bf16 channels_last (the loss's fast path).
        variants = [(16, torch.float32, False), (16, torch.bfloat16, True)]
    else:
        providers = ["ref", "official-style", "cpu", COMPILED]
        variants = [(2 if quick else 4, torch.float32, False), (2 if quick else 4, torch.float32, True)]
    layers = LAYERS if not quick else LAYERS[:1] + LAYERS[3:4]
    for N, dtype, channels_last in variants:
        elt = torch.empty((), dtype=dtype).element_size()
        for C, H, W in layers:
            feat = N * C * H * W * elt
            pix = N * H * W * 4
            config = f"N={N} {C}x{H}x{W} {str(dtype).replace('torch.', '')}{' cl' if channels_last else ''}"
            for provider in providers:
                out.append(Case(
                    op="lpips_distance", config=config, provider=provider,
                    make=_make(provider, N, C, H, W, dtype, device, channels_last),
                    bytes=2 * feat + 6 * pix, bwd_bytes=4 * feat + 5 * pix, flops=14 * N * C * H * W))
    return out
