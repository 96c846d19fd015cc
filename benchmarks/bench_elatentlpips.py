"""E-LatentLPIPS loss: official package vs our reference path vs our fast path (fp32, bf16),
and pixel LPIPS with VAE decode (the comparison of the paper's "9.7x faster" claim).

Every provider computes loss(pred, target) for a latent batch; ``pred`` requires grad, the
target does not (the training situation). Modes: "fwd" (no autograd) and "fwd+bwd" (the
gradient with respect to ``pred``).

Providers
  official            elatentlpips 0.2 (random weights, trunk fixed to the latent channels),
                      augmentation off (ensembling=False), fp32
  official-tf32       the same with cuDNN TF32 convs allowed (PyTorch's default on a GPU)
  official+aug        the same with its "bg" augmentation (CPU only: on a GPU it JIT-compiles
                      StyleGAN ops on first call)
  ref                 d2g_fast.ELatentLPIPS(impl="ref"): BatchNorm unfolded, distances op by op
  ref-compiled        torch.compile of that same module (benchmarks.harness.COMPILE_KWARGS), fp32
  fast-fp32           d2g_fast.ELatentLPIPS fast path, fp32 (BN folded, channels_last, fused op)
  fast-bf16           the same in bf16
  fast-bf16+aug       fast-bf16 with the "bg" augmentation: the full E-LatentLPIPS
  fast-bf16+aug-unfused  the same with D2G_FUSED_TRUNK=0: the CPU trunk without oneDNN's fused
                      ReLU and the hand-written backward (the path before issue 23)
  trunk-bf16          floor: the bare latent-VGG trunk alone (folded weights), bf16
                      channels_last conv, a separate in-place ReLU, max-pool; the generated
                      branch with autograd (gradients of ones into the five taps), the target
                      branch without; no augmentation, distance, L1 or checks
  trunk-bf16-fused    floor without ReLU passes: conv with oneDNN's ReLU post-op + pool forward,
                      and a backward of only the data-gradient convs and pool backwards (no ReLU
                      mask: a lower bound, not a gradient)
  pixel-lpips+vae     decode both latents with the SD1.5-shaped AutoencoderKL decoder (random
                      weights) and run pixel LPIPS (lpips 0.1.4, VGG, random trunk); fp32
  pixel-lpips+vae-bf16  the same under bf16 autocast

Ours run with ``check_inputs=False`` (no NaN-check device sync), as in a training loop.

FLOPs: the trunk (13 3x3 convs) costs ``trunk_flops(C, H, W)`` per latent per forward
(about 77 GFLOP at 4x64x64); a forward runs it on both inputs, the backward once more (input
gradients of the prediction branch only; the trunk is frozen), so ``tflop_s`` of the latent
providers is the trunk's achieved throughput.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import torch

from benchmarks.harness import COMPILED, Case, SkipCase, compiled
from d2g_fast.nn.latent_vgg import VGG16_CFG

_MODELS: dict = {}  # built models, shared between cases of one run


def trunk_flops(c: int, h: int, w: int) -> float:
    """Multiply-adds x 2 of the latent VGG16-BN convs (pools 1-3 removed, 4-5 kept)."""
    flops, cin, pools = 0.0, c, 0
    for item in VGG16_CFG:
        if item == "M":
            pools += 1
            if pools > 3:
                h, w = h // 2, w // 2
            continue
        flops += 2.0 * cin * item * 9 * h * w
        cin = item
    return flops


ENCODER_OF_CHANNELS = {4: "sd15", 16: "sd3"}


def _official(channels: int, augment, device):
    key = ("official", channels, augment, device)
    if key not in _MODELS:
        try:
            import elatentlpips
            from elatentlpips.vgg16 import LatentVGG16BN
        except Exception as exc:  # not installed, or pkg_resources missing
            raise SkipCase(f"elatentlpips not importable: {type(exc).__name__}: {exc}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = elatentlpips.ELatentLPIPS(pretrained=False, pnet_rand=True, verbose=False,
                                              encoder=ENCODER_OF_CHANNELS[channels], augment=augment)
            features = LatentVGG16BN(channels).model.features
        bounds = (0, 7, 14, 24, 34, 44)
        for k in range(5):
            setattr(model.net, f"slice{k + 1}", torch.nn.Sequential(OrderedDict(
                (str(i), features[i]) for i in range(bounds[k], bounds[k + 1]))))
        with torch.no_grad():
            for lin in model.lins:
                lin.model[1].weight.abs_()
        model.net.requires_grad_(False)
        _MODELS[key] = model.eval().to(device)
    return _MODELS[key]


def _ours(channels: int, device, **kwargs):
    key = ("ours", channels, device, tuple(sorted(kwargs.items())))
    if key not in _MODELS:
        from d2g_fast import ELatentLPIPS
        torch.manual_seed(0)
        # check_inputs=False: the NaN/Inf input check is a device sync per call, which a training
        # loop turns off (the official package has no such check).
        _MODELS[key] = ELatentLPIPS(pretrained=False, pnet_rand=True, verbose=False,
                                    encoder=ENCODER_OF_CHANNELS[channels], check_inputs=False,
                                    **kwargs).to(device)
    return _MODELS[key]


def _pixel(device):
    key = ("pixel", device)
    if key not in _MODELS:
        try:
            import lpips
            from diffusers import AutoencoderKL
        except Exception as exc:
            raise SkipCase(f"lpips/diffusers not importable: {type(exc).__name__}: {exc}")
        torch.manual_seed(0)
        # The SD1.5 VAE architecture (its config), random weights: only the decoder runs.
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
            act_fn="silu")
        vae.encoder = None  # never used; saves memory
        vae.requires_grad_(False).eval().to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metric = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval().to(device)
        metric.requires_grad_(False)
        _MODELS[key] = (vae, metric)
    return _MODELS[key]


def _trunk_floor(model, fused: bool, pred: torch.Tensor, target: torch.Tensor):
    """fwd / fwd+bwd callables of the bare trunk (providers trunk-bf16, trunk-bf16-fused)."""
    import torch.nn.functional as F

    from d2g_fast.nn import latent_vgg as lv
    if fused and not lv.fused_trunk_supported(pred.device, torch.bfloat16):
        raise SkipCase("oneDNN's fused convolution is not available here")
    net = model.net
    weights = net.folded_weights(torch.bfloat16, True)
    flipped = net.flipped_weights(torch.bfloat16, True)
    plan = lv._trunk_plan(net.slices)

    def forward(x, save=None):
        h = x.to(torch.bfloat16, memory_format=torch.channels_last)
        taps, k = [], 0
        for step in plan:
            if step == "conv":
                w, b = weights[k]
                h = lv._conv_relu(h, w, b) if fused else F.relu(F.conv2d(h, w, b, padding=1), inplace=True)
                k += 1
            elif step == "pool" and save is not None:
                h, idx = torch.ops.aten.max_pool2d_with_indices(h, [2, 2], [2, 2])
                save.append((h, idx))
            elif step == "pool":
                h = F.max_pool2d(h, kernel_size=2, stride=2)
            else:
                taps.append(h)
        return taps

    def backward_floor(taps, saved, x):
        # Data-gradient convs (tap gradients through the add post-op) and pool backwards only.
        g, t, k, pools = torch.ones_like(taps[-1]), len(taps) - 1, len(flipped), list(saved)
        for i in range(len(plan) - 2, -1, -1):
            step = plan[i]
            if step == "pool":
                out, idx = pools.pop()
                g = torch.ops.aten.max_pool2d_with_indices_backward(
                    g, torch.empty(out.shape[:2] + (out.shape[2] * 2, out.shape[3] * 2),
                                   dtype=out.dtype).contiguous(memory_format=torch.channels_last),
                    [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
            elif step == "conv":
                k -= 1
                tap = None
                if i > 0 and plan[i - 1] == "tap":
                    t -= 1
                    tap = torch.ones_like(taps[t])
                g = lv._conv_data_grad(g, flipped[k], tap)
        return g

    def fwd():
        with torch.no_grad():
            forward(target)
            return forward(pred)

    grads = []

    def fwd_bwd():
        pred.grad = None
        with torch.no_grad():
            forward(target)
        if fused:
            with torch.no_grad():
                saved = []
                taps = forward(pred, saved)
                return backward_floor(taps, saved, pred).float()
        taps = forward(pred)
        if not grads:
            grads.extend(torch.ones_like(t) for t in taps)
        torch.autograd.backward(taps, grads)
        return taps[0]
    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _make(provider: str, n: int, c: int, h: int, w: int, device: str):
    def make():
        if provider == "official+aug" and device.startswith("cuda"):
            raise SkipCase("the official augmentation JIT-compiles CUDA ops on first use")
        if provider.startswith("official"):
            model = _official(c, "bg" if provider.endswith("+aug") else None, device)
            loss = lambda a, b: model(a, b, ensembling=provider.endswith("+aug"))  # noqa: E731
        elif provider.startswith("pixel"):
            if c != 4:
                raise SkipCase("the SD1.5 VAE decodes 4-channel latents")
            vae, metric = _pixel(device)
            autocast = provider.endswith("bf16")

            def loss(a, b):
                with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                                    dtype=torch.bfloat16, enabled=autocast):
                    img_a = vae.decode(a / 0.18215).sample
                    with torch.no_grad():
                        img_b = vae.decode(b / 0.18215).sample
                    return metric(img_a, img_b).float()
        elif provider.startswith("trunk"):
            model = _ours(c, device, augment=None, precision="bf16", impl="auto")
            g = torch.Generator(device="cpu").manual_seed(0)
            target = torch.randn(n, c, h, w, generator=g).to(device)
            pred = (target + 0.5 * torch.randn(n, c, h, w, generator=g).to(device)).requires_grad_(True)
            return _trunk_floor(model, provider.endswith("fused"), pred, target)
        else:
            unfused = provider.endswith("-unfused")
            name = provider.removesuffix("-unfused")
            kwargs = {"augment": "bg" if name.endswith("+aug") else None,
                      "precision": "bf16" if "bf16" in name else "fp32",
                      "impl": "ref" if name in ("ref", COMPILED) else "auto"}
            model = _ours(c, device, **kwargs)
            if provider == COMPILED:
                model = compiled(model)
            aug = name.endswith("+aug")
            loss = lambda a, b: model(a, b, ensembling=aug)  # noqa: E731
            if unfused:
                loss = _without_fused_trunk(loss)
        g = torch.Generator(device="cpu").manual_seed(0)
        target = torch.randn(n, c, h, w, generator=g).to(device)
        pred = (target + 0.5 * torch.randn(n, c, h, w, generator=g).to(device)).requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return loss(pred, target)

        def fwd_bwd():
            pred.grad = None
            out = loss(pred, target)
            out.sum().backward()
            return out

        if provider.endswith("tf32"):
            # The runner turns TF32 off; PyTorch's default lets cuDNN convs use TF32, which is
            # what an official user gets out of the box: "official-tf32" measures that.
            def with_tf32(fn):
                def run():
                    saved = torch.backends.cudnn.allow_tf32
                    torch.backends.cudnn.allow_tf32 = True
                    try:
                        return fn()
                    finally:
                        torch.backends.cudnn.allow_tf32 = saved
                return run
            fwd, fwd_bwd = with_tf32(fwd), with_tf32(fwd_bwd)
        return {"fwd": fwd, "fwd+bwd": fwd_bwd}
    return make


def _without_fused_trunk(fn):
    """``fn`` run with D2G_FUSED_TRUNK=0 (the unfused CPU trunk), the variable restored after."""
    from d2g_fast.nn.latent_vgg import FUSED_ENV

    def run(*args):
        saved = os.environ.get(FUSED_ENV)
        os.environ[FUSED_ENV] = "0"
        try:
            return fn(*args)
        finally:
            if saved is None:
                del os.environ[FUSED_ENV]
            else:
                os.environ[FUSED_ENV] = saved
    return run


LATENT_PROVIDERS = ["official", "ref", "fast-fp32", "fast-bf16", "fast-bf16+aug", COMPILED]
PIXEL_PROVIDERS = ["pixel-lpips+vae", "pixel-lpips+vae-bf16"]
# Issue 23's CPU comparison: ours (fused and not) against the bare trunk, with and without
# separate ReLU passes.
TRUNK_FLOOR_PROVIDERS = ["fast-bf16+aug-unfused", "trunk-bf16", "trunk-bf16-fused"]


def cases(device: str, quick: bool) -> list[Case]:
    cuda = device.startswith("cuda")
    if quick:
        # CPU-friendly: one small latent batch, every provider once.
        plan = [(1, 4, 32, 32, LATENT_PROVIDERS + ["official+aug"] + TRUNK_FLOOR_PROVIDERS),
                (1, 4, 8, 8, PIXEL_PROVIDERS[:1])]
    elif cuda:
        fast = ["official", "fast-fp32", "fast-bf16"]
        # Ordered by importance: a time-boxed GPU run keeps the first cases.
        plan = [
            (16, 4, 64, 64, LATENT_PROVIDERS + ["official-tf32"]),  # SD1.5, the headline case
            (16, 4, 128, 128, fast),                                # SDXL
            (16, 16, 64, 64, fast),                                 # SD3 / FLUX 16-channel
            (8, 4, 64, 64, PIXEL_PROVIDERS + ["fast-fp32", "fast-bf16+aug"]),  # vs decode + LPIPS
            (1, 4, 64, 64, fast), (8, 4, 64, 64, fast),
            (1, 4, 128, 128, fast), (8, 4, 128, 128, fast),
            (1, 4, 64, 64, PIXEL_PROVIDERS + ["fast-bf16+aug"]),
        ]
    else:
        # CPU, the target: batch 4, 4x64x64, forward+backward.
        # Pixel LPIPS at 4x32x32 latents (256x256 images): a 512x512 decode + backward takes
        # minutes per repetition on 2 cores.
        plan = [(4, 4, 64, 64, LATENT_PROVIDERS + ["official+aug"] + TRUNK_FLOOR_PROVIDERS),
                (1, 4, 32, 32, PIXEL_PROVIDERS + ["fast-bf16+aug", "fast-fp32"])]
    out = []
    for n, c, h, w, providers in plan:
        flops = trunk_flops(c, h, w) * n
        for provider in providers:
            latent = not provider.startswith("pixel")
            out.append(Case(
                op="elatentlpips", config=f"N={n} {c}x{h}x{w}", provider=provider, modes=("fwd", "fwd+bwd"),
                make=_make(provider, n, c, h, w, device),
                flops=2 * flops if latent else None, bwd_flops=flops if latent else None,
                note="trunk TFLOP/s" if latent else "decode + pixel LPIPS"))
    return out


if __name__ == "__main__":  # quick look without the runner: python -m benchmarks.bench_elatentlpips
    import sys

    from benchmarks.harness import time_callable
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    for case in cases(dev, quick="--full" not in sys.argv):
        try:
            fns = case.make()
        except SkipCase as exc:
            print(f"{case.config:<16} {case.provider:<22} skipped: {exc}")
            continue
        for mode, fn in fns.items():
            r = time_callable(fn, dev, min_time_s=0.3, min_reps=3)
            print(f"{case.config:<16} {case.provider:<22} {mode:<8} {r['median_ms']:10.1f} ms", flush=True)
