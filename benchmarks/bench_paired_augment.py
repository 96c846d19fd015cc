"""Paired latent augmentation: ours (every provider) vs the official E-LatentLPIPS AdaAugment.

Every provider includes drawing the per-sample parameters (that is what a training step pays):
ours = ``PairedAugment(preset)(x, y)`` (CPU-side sampling + the op; providers "<impl>+devrng":
``PairedAugment(preset, sampler="device")``, the parameters drawn on the device by the
augment_params_sample_on_device_ kernel, no host synchronisation), official =
``AdaAugment(**ada_augpipe[preset])(x, y)``. Both tensors require grad; "bwd" re-runs the
backward of ``(x_aug * gx).sum() + (y_aug * gy).sum()``.

Op "augment_params_sample": the parameter draw alone at N=16, "host" = AugmentParams.sample +
packed(device) (numpy on the CPU and the copy of the packed tensor: what the host path pays per
call) vs "device" = AugmentParams.sample_on_device on the benchmark device (one kernel launch).

"ref-compiled": the same host draw, then ``torch.compile`` of the reference transform
(d2g_fast.ref.paired_augment). Every call draws new parameters, as training does; the reflect
margins are Python ints that change from draw to draw, so the compiled code is specialised per
margin combination (recompiles, then eager fallback past dynamo's cache limit): what a user who
compiles the reference would get.

Bytes (an ideal fused pass): forward reads x and y and writes x_aug and y_aug (4 N C H W
elements); the backward reads two output gradients and writes two input gradients (same).
"""
from __future__ import annotations

import torch

from benchmarks.harness import COMPILED, Case, SkipCase, compiled, require_backend


def _official_module(preset: str, device: str):
    try:
        from elatentlpips.ada_aug import AdaAugment
        from elatentlpips.elatentlpips import ada_augpipe
    except Exception as exc:  # not installed, or pkg_resources missing
        raise SkipCase(f"elatentlpips not importable: {type(exc).__name__}: {exc}")
    aug = AdaAugment(**ada_augpipe[preset]).to(device)
    aug.p = torch.tensor(1.0, device=device)
    return aug


def _official_fn(preset: str, device: str, x: torch.Tensor, y: torch.Tensor):
    """The official pipeline; on a GPU it JIT-builds its upfirdn2d CUDA plugin on first use.
    If that build fails, fall back to its reference upfirdn2d (slower) and say so."""
    aug = _official_module(preset, device)
    try:
        aug(x, y)
    except Exception as exc:  # noqa: BLE001 - any plugin build failure
        from elatentlpips.style_ops import upfirdn2d
        upfirdn2d._init = lambda: False  # noqa: SLF001
        print(f"bench_paired_augment: official upfirdn2d plugin unavailable ({type(exc).__name__}: "
              f"{exc}); timing its reference upfirdn2d path instead")
    return lambda a, b: aug(a, b)


def _make(provider: str, preset: str, N: int, C: int, H: int, W: int, dtype, device: str):
    def make():
        if provider == "official":
            probe = torch.randn(N, C, H, W, device=device, dtype=dtype)
            fn = _official_fn(preset, device, probe, probe)
        elif provider == COMPILED:
            from d2g_fast.nn import PairedAugment
            from d2g_fast.ref.paired_augment import paired_augment as reference
            sampler = PairedAugment(preset, impl="ref", sampler="host")
            transform = compiled(reference)
            gen = torch.Generator().manual_seed(0)
            fn = lambda a, b: transform(a, b, sampler.sample_params(a, generator=gen))  # noqa: E731
        else:
            from d2g_fast.augment_params import device_sampler_available
            from d2g_fast.nn import PairedAugment
            impl, _, rng = provider.partition("+")
            require_backend("paired_augment", impl, device)
            if impl == "triton" and not hasattr(torch.ops.d2g_fast, "paired_augment_triton"):
                raise SkipCase("no Triton paired_augment kernel registered")
            if rng == "devrng":
                if not device_sampler_available():
                    raise SkipCase("compiled extension without augment_params_sample_on_device_")
                mod = PairedAugment(preset, impl=impl, sampler="device")
                fn = lambda a, b: mod(a, b)  # noqa: E731
            else:
                mod = PairedAugment(preset, impl=impl, sampler="host")
                gen = torch.Generator().manual_seed(0)
                fn = lambda a, b: mod(a, b, generator=gen)  # noqa: E731
        x = torch.randn(N, C, H, W, device=device, dtype=dtype, requires_grad=True)
        y = torch.randn(N, C, H, W, device=device, dtype=dtype, requires_grad=True)
        gx, gy = torch.randn_like(x), torch.randn_like(y)
        state = {}

        def loss():
            ax, ay = fn(x, y)
            return (ax * gx).sum() + (ay * gy).sum()

        def fwd():
            with torch.no_grad():
                return fn(x, y)

        def fwd_bwd():
            return torch.autograd.grad(loss(), (x, y))

        state["loss"] = loss()

        def bwd():
            return torch.autograd.grad(state["loss"], (x, y), retain_graph=True)

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    return make


def _make_sample(provider: str, preset: str, N: int, C: int, H: int, W: int, device: str):
    def make():
        from d2g_fast.augment_params import AugmentParams, device_sampler_available
        if provider == "host":
            gen = torch.Generator().manual_seed(0)
            return {"fwd": lambda: AugmentParams.sample(preset, N, H, W, num_channels=C,
                                                        generator=gen).packed(device)}
        if not device_sampler_available():
            raise SkipCase("compiled extension without augment_params_sample_on_device_")
        return {"fwd": lambda: AugmentParams.sample_on_device(preset, N, H, W, num_channels=C,
                                                             device=device)}
    return make


def cases(device: str, quick: bool) -> list[Case]:
    cuda = device.startswith("cuda")
    providers = (["official", "ref", "cuda", "cuda+devrng", "triton", "triton+devrng", COMPILED] if cuda
                 else ["official", "ref", "cpu", "cpu+devrng", COMPILED])
    batches = (16, 4) if cuda else ((4, 16) if not quick else (4,))  # the GPU target (N=16) first
    presets = ("bg", "bgco")  # what E-LatentLPIPS runs: both, even in a quick run
    C, H, W = 4, 64, 64
    out = []
    # the parameter draw alone first: a few milliseconds, and the point of the device sampler
    for preset in ("bgco", "bg"):
        for provider in ("host", "device"):
            out.append(Case(op="augment_params_sample", config=f"{preset} N=16 {C}x{H}x{W}",
                            provider=provider, make=_make_sample(provider, preset, 16, C, H, W, device),
                            modes=("fwd",),
                            note="parameter draw only (host: numpy + packed copy; device: one kernel)"))
    for preset in presets:
        for N in batches:
            dtype = torch.float32
            elt = torch.empty((), dtype=dtype).element_size()
            moved = 4 * N * C * H * W * elt
            for provider in providers:
                out.append(Case(
                    op="paired_augment", config=f"{preset} N={N} {C}x{H}x{W} fp32", provider=provider,
                    make=_make(provider, preset, N, C, H, W, dtype, device),
                    bytes=moved, bwd_bytes=moved,
                    note="includes per-sample parameter sampling"))
    return out
