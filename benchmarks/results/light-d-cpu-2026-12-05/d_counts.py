"""Trained and owned parameters of the light D for SD1.5, SDXL and FLUX.1-dev shapes (meta device)."""
import torch
from d2g_fast.plan.simulate import meta_run
from d2g_fast.train import TrainConfig
for arch in ("sd15", "sdxl", "flux-dev"):
    for kw in ({}, {"light_d": True}, {"light_d": True, "lora_rank": 64}):
        cfg = TrainConfig(lpips_random=True, device="cpu", progress=False, batch_size=1, **kw)
        run = meta_run(arch, cfg)
        d = run.discriminator
        tr = sum(p.numel() for p in d.parameters() if p.requires_grad)
        own = sum(p.numel() for p in d.parameters())
        print(arch, kw, "D trained %.3f M" % (tr / 1e6), "D owned %.3f B" % (own / 1e9), flush=True)
