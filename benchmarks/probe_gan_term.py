"""Probe of the GAN term on the demo's recipe (issue 25): D's real / fake scores while training,
and the size of the GAN gradient on G's output against the regression (E-LatentLPIPS)
gradient, both with respect to the fake latents, every 10 steps.

    python benchmarks/probe_gan_term.py [LAMBDA_GAN=0.05] [LR_D=2e-4] [STEPS=120]

Collects 512 ODE pairs of the shipped toy teacher (DDIM 25 steps, guidance 4) into
/tmp/y/probe, then trains from step 0 with the GAN on (no warm-up), batch 16, lr 2e-4, R1 gamma
0.1 every 16 steps, mix-and-match 0.25, one thread. Prints one JSON line per probed step:
"ratio" = lambda_GAN * |dL_GAN/dfake| / |dL_reg/dfake|, "cos" their cosine.
"""
import sys, os, time, json, torch
torch.set_num_threads(1)
from pathlib import Path
from d2g_fast import toy
from d2g_fast.teacher import Teacher
from d2g_fast.teacher.collect import collect
from d2g_fast.train import TrainConfig
from d2g_fast.train.build import build_run
from d2g_fast.train.step import train_step, prepare_micro_batch, gan_gradient
from d2g_fast.train.data import MicroBatchSampler
from d2g_fast.toy.evaluate import quiet_diffusers
quiet_diffusers()
out = Path("/tmp/y/probe"); out.mkdir(exist_ok=True)
world = toy.shipped_dir()
lam = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
lr_d = float(sys.argv[2]) if len(sys.argv) > 2 else 2e-4
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 120
teacher = Teacher.from_pretrained(str(world / "teacher"))
pairs = str(out / "pairs")
collect(teacher, toy.train_prompts(), pairs, 512, steps=25, guidance=4.0, batch_size=64,
        shard_size=256, seed=0, progress=False, log=lambda *a: None)
from d2g_fast.data import PairDataset
ds = PairDataset(pairs)
cfg = TrainConfig(teacher=str(world / "teacher"), pairs=pairs, out=str(out / "run"),
                  lpips_path=str(world / "elatentlpips.safetensors"), augment="bg",
                  max_steps=steps, batch_size=16, lr_g=2e-4, lr_d=lr_d, lambda_gan=lam,
                  warmup_steps=0, ema_decay=0.99, r1_gamma=0.1, r1_interval=16,
                  progress=False, seed=0, device="cpu").validate()
run = build_run(cfg, teacher=Teacher.from_pretrained(str(world / "teacher")), dataset=ds)
g = torch.Generator().manual_seed(0)
t0 = time.time()
for step in range(steps):
    idx = torch.randint(len(ds), (16,), generator=g).tolist()
    batch = torch.utils.data.default_collate([ds[i] for i in idx])
    m = train_step(run, batch, step)
    if step % 10 == 0 or step == steps - 1:
        micro = prepare_micro_batch(run, batch, step, 0)
        fake = run.generator(micro["noise"], micro["ehs"], micro["added"]).detach().requires_grad_(True)
        reg = run.regression(fake, micro["target"]).mean()
        (g_reg,) = torch.autograd.grad(reg, fake)
        gan, g_gan = gan_gradient(run, fake.detach(), micro)
        cos = torch.nn.functional.cosine_similarity(g_reg.flatten(), g_gan.flatten(), dim=0)
        print(json.dumps({"step": step, "reg": round(m["e_latentlpips"], 4),
                          "d_real": m["d_real"], "d_fake": m["d_fake"], "g_gan": m["g_gan"],
                          "grad_reg": g_reg.norm().item(), "grad_gan_x_lambda": lam * g_gan.norm().item(),
                          "ratio": lam * g_gan.norm().item() / g_reg.norm().item(), "cos": cos.item(),
                          "s": round(time.time() - t0)}), flush=True)
