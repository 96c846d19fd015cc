"""``make demo`` / ``d2g demo`` / ``python -m d2g_fast.demo``: the whole method in small, offline.

On the embedded default (a tiny Stable-Diffusion-shaped teacher built from configs with random
weights: no download, CPU is enough) it runs every stage that exists today:

1. saves the teacher as a local diffusers folder and loads it back like a real one;
2. collects ODE pairs (DDIM, fixed guidance) into a sharded, checksummed store, and verifies it;
3. distils a one-step generator initialised from the teacher UNet for a few iterations with
   E-LatentLPIPS + lambda * GAN against the conditional multi-scale discriminator (R1 and
   mix-and-match on), alternating G and D steps;
4. exports the generator as a diffusers ``UNet2DConditionModel`` folder.

The numbers it prints are a smoke test of the plumbing, not a result: the teacher, the latent
VGG trunk and the heads are random. The full trainer (EMA, checkpoints, multi-GPU) is its own
issue; this loop is deliberately minimal.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

HELP = "run the whole pipeline in small on a tiny built-in teacher (offline, CPU is enough)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="working folder (reused: collection resumes)")
    p.add_argument("--pairs", type=int, default=32, help="ODE pairs to collect")
    p.add_argument("--steps", type=int, default=10, help="teacher DDIM steps")
    p.add_argument("--guidance", type=float, default=8.0)
    p.add_argument("--iters", type=int, default=30, help="distillation iterations")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lambda-gan", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)


def one_step_generate(unet, scheduler, noise, encoder_hidden_states, timestep: int):
    """G(z, c): the teacher UNet evaluated once at ``timestep`` and its epsilon output
    converted to x0 (the paper's choice is open; see paper-notes section 1)."""
    import torch
    alpha = scheduler.alphas_cumprod[timestep].to(noise)
    t = torch.full((noise.shape[0],), timestep, device=noise.device, dtype=torch.long)
    eps = unet(noise, t, encoder_hidden_states=encoder_hidden_states).sample
    return (noise - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def run(args: argparse.Namespace) -> int:
    import torch

    import d2g_fast
    from d2g_fast.data import PairDataset
    from d2g_fast.data.prompts import load_prompts
    from d2g_fast.losses import DiscriminatorLoss, generator_loss
    from d2g_fast.models import DiffusionDiscriminator
    from d2g_fast.teacher import Teacher
    from d2g_fast.teacher.collect import collect
    from d2g_fast.testing.tiny import save_tiny_sd_pipeline

    for name in ("pairs", "steps", "iters", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    d2g_fast.build_info()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    print("\n[1/4] teacher: a tiny SD-shaped pipeline with random weights, saved and reloaded")
    teacher_dir = os.path.join(out, "teacher")
    if not os.path.isfile(os.path.join(teacher_dir, "model_index.json")):
        save_tiny_sd_pipeline(teacher_dir, seed=args.seed)
    teacher = Teacher.from_pretrained(teacher_dir)
    print(f"      {teacher_dir}: latent shape {teacher.latent_shape}")

    print(f"\n[2/4] collecting {args.pairs} ODE pairs (DDIM {args.steps} steps, guidance {args.guidance})")
    pairs_dir = os.path.join(out, "pairs")
    collect(teacher, load_prompts(None), pairs_dir, args.pairs, steps=args.steps,
            guidance=args.guidance, batch_size=args.batch_size, shard_size=max(args.batch_size, 16),
            seed=args.seed, progress=False)
    dataset = PairDataset(pairs_dir, check="sha256")
    print(f"      {len(dataset)} pairs in {len(dataset.shards)} shards, checksums verified")

    print(f"\n[3/4] distilling a one-step generator for {args.iters} iterations")
    generator = copy.deepcopy(teacher.unet).train().requires_grad_(True)
    discriminator = DiffusionDiscriminator.from_unet(teacher.unet)
    perceptual = d2g_fast.ELatentLPIPS(pretrained=False, pnet_rand=True, encoder="sd15",
                                         augment="bg", verbose=False)
    d_loss_fn = DiscriminatorLoss(r1_gamma=1.0, r1_interval=4, mix_fraction=0.25)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam([p for p in discriminator.parameters() if p.requires_grad],
                             lr=args.lr, betas=(0.0, 0.99))
    scheduler = teacher.make_scheduler("ddim")
    timestep = scheduler.config.num_train_timesteps - 1
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed),
                                         drop_last=True)
    history = []
    step = 0
    while step < args.iters:
        for batch in loader:
            if step >= args.iters:
                break
            with torch.no_grad():
                text = teacher.encode_prompts(batch["prompt"], guided=False).encoder_hidden_states
            noise, target = batch["noise"], batch["latent"]
            # Generator step: regression to the teacher's answer + non-saturating GAN loss.
            discriminator.requires_grad_(False)
            fake = one_step_generate(generator, scheduler, noise, text, timestep)
            regression = perceptual(fake, target).mean()
            gan = generator_loss(discriminator, fake, noise, text)
            opt_g.zero_grad(set_to_none=True)
            (regression + args.lambda_gan * gan).backward()
            opt_g.step()
            # Discriminator step: matched teacher latents vs fakes and mismatched reals, lazy R1.
            discriminator.requires_grad_(True)
            d_out = d_loss_fn(discriminator, target, fake.detach(), noise, text, step=step)
            opt_d.zero_grad(set_to_none=True)
            d_out.loss.backward()
            opt_d.step()
            history.append(regression.item())
            if step % 5 == 0 or step == args.iters - 1:
                logs = {k: round(float(v), 4) for k, v in d_out.logs.items()}
                print(f"      it {step:3d}  E-LatentLPIPS {regression.item():.4f}  "
                      f"G gan {gan.item():.4f}  D {logs}")
            step += 1

    print("\n[4/4] exporting the generator as a diffusers UNet2DConditionModel")
    export_dir = os.path.join(out, "generator")
    generator.eval().save_pretrained(export_dir)
    print(f"      {export_dir}")
    first = sum(history[:3]) / min(3, len(history))
    last = sum(history[-3:]) / min(3, len(history))
    print(f"\ndemo finished in {time.perf_counter() - t_start:.1f} s: E-LatentLPIPS to the teacher "
          f"{first:.4f} -> {last:.4f} over {len(history)} iterations (random tiny models: a "
          f"smoke test of the plumbing, not a result)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m d2g_fast.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:  # bad input: one line naming the argument, no traceback
        print(f"d2g demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
