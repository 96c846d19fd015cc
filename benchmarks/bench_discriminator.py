"""One discriminator training step: real and fake latents through DiffusionDiscriminator
(forward and backward), with the fused heads or the reference heads.

On a GPU: the SD1.5 UNet architecture from its config (random weights; 860 M parameters),
64x64 latents, bf16 autocast, N real + N fake in one batched call (the way DiscriminatorLoss
runs it), with and without gradient checkpointing, plus a lazy-R1 step (single sample). On the
CPU: a tiny UNet for --quick, the SD1.5 architecture at N=1 otherwise.

Provider "ref-compiled": the whole discriminator with the reference heads under
``torch.compile`` (benchmarks.harness.COMPILE_KWARGS), base setting only: what a user without
our kernels would run instead.
"""
from __future__ import annotations

import torch

from benchmarks.harness import COMPILED, Case, SkipCase, compiled


_TEACHERS: dict = {}


def _tiny_config():
    return dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _make(arch, N, device, heads_impl, checkpointing, r1, compile_d=False):
    def make():
        try:
            from diffusers import UNet2DConditionModel
        except ImportError as exc:
            raise SkipCase(f"diffusers is not installed ({exc})")
        from d2g_fast.losses import DiscriminatorLoss
        from d2g_fast.models import DiffusionDiscriminator
        if arch == "sd15":
            from d2g_fast.testing.tiny import SD15_UNET_CONFIG
            config, hw, ctx_len, ctx_dim = SD15_UNET_CONFIG, 64, 77, 768
        else:
            config, hw, ctx_len, ctx_dim = _tiny_config(), 8, 5, 32
        key = (arch, device)
        if key not in _TEACHERS:  # one teacher per architecture, built on the device (fast)
            _TEACHERS.clear()
            torch.manual_seed(0)
            with torch.device(device):
                _TEACHERS[key] = UNet2DConditionModel(**config)
        D = DiffusionDiscriminator.from_unet(_TEACHERS[key], heads_impl=heads_impl,
                                             gradient_checkpointing=checkpointing).to(device)
        if compile_d:
            D = compiled(D)
        g = torch.Generator().manual_seed(0)
        real = torch.randn(N, 4, hw, hw, generator=g).to(device)
        fake = torch.randn(N, 4, hw, hw, generator=g).to(device)
        noise = torch.randn(N, 4, hw, hw, generator=g).to(device)
        text = torch.randn(N, ctx_len, ctx_dim, generator=g).to(device)
        loss_fn = DiscriminatorLoss(r1_gamma=1.0 if r1 else 0.0, r1_interval=1, mix_fraction=0.25)

        def step():
            for p in D.parameters():
                p.grad = None
            out = loss_fn(D, real, fake, noise, text, step=0, generator=g)
            out.loss.backward()
            return out.loss

        def fwd():
            with torch.no_grad():
                return D(torch.cat([real, fake]), torch.cat([noise, noise]),
                         torch.cat([text, text]), target=1.0).loss

        return {"fwd": fwd, "fwd+bwd": step}
    return make


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    if device.startswith("cuda"):
        setups = [("sd15", 4, False, False), ("sd15", 4, True, False), ("sd15", 4, False, True),
                  ("sd15", 8, True, False)]
        impls = ["cuda", "ref", COMPILED]
        precision = "bf16 autocast"
    elif quick:
        setups = [("tiny", 4, False, False), ("tiny", 4, False, True)]
        impls = ["cpu", "ref", COMPILED]
        precision = "fp32"
    else:
        setups = [("tiny", 4, False, False), ("sd15", 1, False, False)]
        impls = ["cpu", "ref", COMPILED]
        precision = "fp32"
    for arch, N, ckpt, r1 in setups:
        for impl in impls:
            if (r1 or ckpt or N > 4) and impl != impls[0]:
                continue  # the reference heads only in the base setting (each case builds a UNet)
            config = (f"{'SD1.5' if arch == 'sd15' else 'tiny'} D step, {N} real + {N} fake, "
                      f"{precision}{', checkpointing' if ckpt else ''}{', + R1 (1 sample)' if r1 else ''}")
            provider = COMPILED if impl == COMPILED else f"heads={impl}"
            heads_impl = "ref" if impl == COMPILED else impl
            out.append(Case(op="discriminator_step", config=config, provider=provider,
                            modes=("fwd", "fwd+bwd"),
                            make=_make(arch, N, device, heads_impl, ckpt, r1, compile_d=impl == COMPILED),
                            note="fwd = D forward of 2N latents (no grad); fwd+bwd = DiscriminatorLoss + backward"))
    return out
