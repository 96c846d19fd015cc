"""Profile of the demo's distillation step (toy world, B=32, the demo's trainer settings, real
pairs), one thread: the plain step's time, torch.profiler's table over 6 steps and cProfile over
4 steps.   PAIRS=STORE python profile_step.py [fp32|bf16]
"""
import os, sys, time, cProfile, pstats, torch
torch.set_num_threads(1)
from d2g_fast import toy
from d2g_fast.train import TrainConfig
from d2g_fast.train.build import build_run
from d2g_fast.train.step import train_step
from d2g_fast.data import PairDataset
from d2g_fast.toy.evaluate import quiet_diffusers
quiet_diffusers()
world = toy.shipped_dir()
PAIRS = os.environ.get("PAIRS", "/tmp/demo_run/pairs")  # a complete toy store
ds = PairDataset(PAIRS)
prec = sys.argv[1] if len(sys.argv) > 1 else "fp32"
cfg = TrainConfig(teacher=str(world / "teacher"), pairs=PAIRS, out="/tmp/profile_step",
    lpips_path=str(world / "elatentlpips.safetensors"), augment="bg", max_steps=700, batch_size=32,
    lr_g=2e-4, lr_d=2e-4, lambda_gan=0.05, warmup_steps=0, ema_decay=0.99, r1_gamma=0.1,
    r1_interval=16, precision=prec, progress=False, seed=0, device="cpu").validate()
run = build_run(cfg, dataset=ds)
g = torch.Generator().manual_seed(0)
def batch():
    idx = torch.randint(len(ds), (32,), generator=g).tolist()
    return torch.utils.data.default_collate([ds[i] for i in idx])
for s in range(1, 4): train_step(run, batch(), s)
bs = [batch() for _ in range(12)]
t = time.perf_counter()
for i, b in enumerate(bs[:6]): train_step(run, b, 17 + i)
print("plain step ms", (time.perf_counter() - t) / 6 * 1e3)
t = time.perf_counter(); b = batch(); print("batch load ms", (time.perf_counter() - t) * 1e3)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    for i, b in enumerate(bs[6:]): train_step(run, b, 33 + i)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
pr = cProfile.Profile(); pr.enable()
for i in range(4): train_step(run, bs[i], 49 + i)
pr.disable(); pstats.Stats(pr).sort_stats("cumulative").print_stats(45)
