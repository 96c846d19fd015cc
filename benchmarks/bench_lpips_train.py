"""LatentLPIPS trunk training (d2g lpips train-trunk): one optimizer step of the latent VGG16-BN
classifier, our training path against the same model with plain PyTorch modules.

"ours" is d2g_fast.lpips.trunk as train_trunk runs it: fused optimizer step, channels_last
memory format on CUDA and with bf16 (contiguous for CPU fp32, where it measured no faster).
"ref" is the same model, settings and data with a per-parameter optimizer loop and the
contiguous format; "ref-compiled" is that plain model under torch.compile (the harness's
COMPILE_KWARGS). Images/s = batch / median time of one step ("fwd+bwd": forward, backward and
optimizer step).

CPU (--quick and default): tiny shapes, 4x8x8 and 16x8x8 latents, width_div 8 and 1, fp32 and
bf16. GPU (--device cuda): SD latents 4x32x32 (256 px images), batch 256, bf16, full width.
"""
from __future__ import annotations

import torch

from benchmarks.harness import COMPILED, Case, compiled

PROVIDERS = ("ours", "ref", COMPILED)


def _make(channels: int, hw: int, batch: int, width_div: int, precision: str, provider: str,
          device: str):
    def make():
        from d2g_fast.lpips.trunk import (LatentVGGClassifier, TrunkSettings, make_optimizer,
                                          memory_format_for, training_step)
        plain = provider != "ours"
        s = TrunkSettings(width_div=width_div, batch_size=batch, precision=precision)
        memory_format = torch.contiguous_format if plain else memory_format_for(s, torch.device(device))
        torch.manual_seed(0)
        model = LatentVGGClassifier(channels, 10, width_div).to(device, memory_format=memory_format).train()
        opt = make_optimizer(model, s, plain=plain)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, channels, hw, hw, generator=g).to(device).contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        run = compiled(model) if provider == COMPILED else model
        return {"fwd+bwd": lambda: training_step(run, opt, x, y, precision)}
    return make


def cases(device: str, quick: bool) -> list[Case]:
    if device.startswith("cuda"):
        setups = [(4, 32, 256, 1, "bf16")]
    else:
        setups = [(4, 8, 32, 8, "fp32"), (16, 8, 32, 8, "fp32"), (4, 8, 32, 8, "bf16")]
        if not quick:
            setups.append((4, 8, 32, 1, "fp32"))
    out = []
    for channels, hw, batch, width_div, precision in setups:
        config = f"{channels}x{hw}x{hw} N={batch} width/{width_div} {precision}"
        for provider in PROVIDERS:
            out.append(Case(op="lpips_trunk_train_step", config=config, provider=provider, modes=("fwd+bwd",),
                            make=_make(channels, hw, batch, width_div, precision, provider, device),
                            note=f"images/s = {batch} / median s"))
    return out
