"""AdamW foreach against fused on the CPU, the toy UNet's 1.1 M parameters, one thread, 30 interleaved
steps (median ms and the median per-call ratio).   python adam_fused.py
"""
import time, statistics, torch
torch.set_num_threads(1)
from d2g_fast import toy
from diffusers import UNet2DConditionModel
u = UNet2DConditionModel.from_pretrained(str(toy.shipped_dir() / "teacher" / "unet"))
def mk(**kw):
    ps = [p.detach().clone().requires_grad_(True) for p in u.parameters()] * 1
    for p in ps: p.grad = torch.randn_like(p)
    return torch.optim.AdamW(ps, lr=2e-4, **kw)
opts = {"foreach": mk(foreach=True), "fused": mk(fused=True)}
for o in opts.values(): o.step()
t = {k: [] for k in opts}
for r in range(30):
    for k, o in opts.items():
        a = time.perf_counter(); o.step(); t[k].append(time.perf_counter() - a)
print(sum(p.numel() for p in u.parameters()), {k: round(statistics.median(v) * 1e3, 2) for k, v in t.items()})
print("ratio fused/foreach", statistics.median([a / b for a, b in zip(t["fused"], t["foreach"])]))
