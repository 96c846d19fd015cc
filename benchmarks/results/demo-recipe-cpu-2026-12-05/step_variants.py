"""The demo's distillation step (toy world, B=32, the demo's trainer settings, real pairs), one
thread, variants timed in interleaved rounds (the same batch for every variant in a round):
fp32, bf16 (autocast), "+cl" G's and D's weights in channels_last, "+math" attention on the
MATH backend. Ratios are per round against the first variant.

    PAIRS=STORE python step_variants.py ROUNDS fp32 bf16 bf16+cl ...
"""
import os, sys, time, contextlib, statistics, torch
torch.set_num_threads(1)
from torch.nn.attention import sdpa_kernel, SDPBackend
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
rounds = int(sys.argv[1]); names = sys.argv[2:]
def make(prec):
    cfg = TrainConfig(teacher=str(world / "teacher"), pairs=PAIRS, out="/tmp/step_variants",
        lpips_path=str(world / "elatentlpips.safetensors"), augment="bg", max_steps=700, batch_size=32,
        lr_g=2e-4, lr_d=2e-4, lambda_gan=0.05, warmup_steps=0, ema_decay=0.99, r1_gamma=0.1,
        r1_interval=16, precision=prec, progress=False, seed=0, device="cpu").validate()
    return build_run(cfg, dataset=ds)
g = torch.Generator().manual_seed(0)
def batch():
    idx = torch.randint(len(ds), (32,), generator=g).tolist()
    return torch.utils.data.default_collate([ds[i] for i in idx])
V = {}
for n in names:
    prec = "bf16" if "bf16" in n else "fp32"
    run = make(prec)
    if "cl" in n.split("+"):
        run.generator.to(memory_format=torch.channels_last); run.discriminator.to(memory_format=torch.channels_last)
    ctx = (lambda: sdpa_kernel([SDPBackend.MATH])) if "math" in n.split("+") else contextlib.nullcontext
    V[n] = (run, ctx)
    with ctx():
        for s in (1, 2): train_step(run, batch(), s)
times = {n: [] for n in names}
step = 17
for r in range(rounds):
    b = batch()
    for n in names:
        run, ctx = V[n]
        with ctx():
            t = time.perf_counter(); train_step(run, b, step); times[n].append(time.perf_counter() - t)
    step += 1
base = names[0]
for n in names:
    ratios = [a / c for a, c in zip(times[n], times[base])]
    print(f"{n:22s} median {statistics.median(times[n])*1e3:7.1f} ms  ratio/{base} median {statistics.median(ratios):.3f} "
          f"({min(ratios):.2f}-{max(ratios):.2f})", flush=True)
