"""The trainer's full distillation step (issue 10): fused kernels against D2G_IMPL=ref.

One timed call = one optimiser step of ``d2g_fast.train.train_step`` on a synthetic batch: G
forward + backward (E-LatentLPIPS + GAN), D forward + backward, AdamW on both, the EMA. Plain
steps only (R1 runs on every 16th step; ``d2g bench gpu-days`` amortises it). Providers:
  ref     D2G_IMPL=ref while the run is built and at every call: every op's PyTorch reference
  fused   every op picks its fastest backend (impl "auto")
with and without gradient checkpointing (G and D). Peak memory is the runner's peak above the
built run (activations, gradients, optimiser states). samples/s = B / median step time.
Shapes: CPU (and --quick) the tiny SD model, B=4, fp32 with and without checkpointing, and
fp32 against bf16 (autocast, the trainer's --precision bf16) without; on the CPU without --quick
also the demo's run on the shipped toy world ("toy": its teacher, its E-LatentLPIPS with "bg"
augmentation, B=32, as ``make demo`` trains) in fp32 and bf16. bf16 pays on a CPU with AMX-BF16
or AVX-512-BF16 (recorded in the results' CPU flags; d2g_fast.cpu_features); elsewhere it is
emulated. CUDA: the SD1.5 architecture (random weights, nothing downloaded), bf16, B=8. The
builders live in d2g_fast.bench.train_speed (tiny, SD) and here (toy).

Largest per-GPU batch that fits (a search over out-of-memory, GPU only; capped to 80 GB so that
an H200's figure holds for an 80 GB card):

    python benchmarks/bench_train_step.py --max-batch [--memory-gb 80] [--arch sd15]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Case, SkipCase  # noqa: E402


def _channels_last(run) -> None:
    """G's and D's 4-D weights in channels_last (the variant issue 23 asks about for bf16 on
    the CPU; measured, not adopted by the trainer: see benchmarks/RESULTS.md)."""
    run.generator.to(memory_format=torch.channels_last)
    run.discriminator.to(memory_format=torch.channels_last)


def _make(arch: str, device: str, batch: int, precision: str, kernels: str, checkpointing: bool,
          channels_last: bool = False):
    def make():
        from d2g_fast.bench.train_speed import Unavailable, build_step
        from d2g_fast.bench.train_speed import kernels as kernels_env

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SkipCase("no GPU")
        try:
            with kernels_env(kernels):
                step_fn, run = build_step(arch, device=device, batch=batch, precision=precision,
                                          gradient_checkpointing=checkpointing)
        except Unavailable as exc:
            raise SkipCase(str(exc)) from None
        if channels_last:
            _channels_last(run)
        interval = run.config.r1_interval
        plain_steps = (s for s in itertools.count(1) if s % interval)

        def step():
            with kernels_env(kernels):
                return step_fn(next(plain_steps))
        return {"fwd+bwd": step}
    return make


def _make_toy(device: str, batch: int, precision: str, kernels: str, channels_last: bool = False):
    """The demo's distillation step (d2g_fast.demo.distill's settings) on a synthetic batch."""
    def make():
        from d2g_fast import toy
        from d2g_fast.bench.train_speed import kernels as kernels_env
        from d2g_fast.teacher import Teacher
        from d2g_fast.train import TrainConfig, build_run, train_step

        if device.startswith("cuda"):
            raise SkipCase("the toy step is a CPU case")
        world = toy.shipped_dir()
        with kernels_env(kernels):
            teacher = Teacher.from_pretrained(str(world / "teacher"))
            config = TrainConfig(
                batch_size=batch, precision=precision, augment="bg",
                lpips_path=str(world / "elatentlpips.safetensors"), lambda_gan=0.05,
                warmup_steps=0, ema_decay=0.99, r1_gamma=0.1, r1_interval=16, progress=False,
                device=device, seed=0)
            run = build_run(config, teacher=teacher, dataset=None, device=device)
        if channels_last:
            _channels_last(run)
        gen = torch.Generator().manual_seed(0)
        shape = tuple(teacher.latent_shape)
        data = {"noise": torch.randn(batch, *shape, generator=gen),
                "latent": torch.randn(batch, *shape, generator=gen),
                "prompt": (toy.train_prompts() * batch)[:batch]}
        plain_steps = (s for s in itertools.count(1) if s % config.r1_interval)

        def step():
            with kernels_env(kernels):
                return train_step(run, data, next(plain_steps))
        return {"fwd+bwd": step}
    return make


def cases(device: str, quick: bool) -> list[Case]:
    if device.startswith("cuda") and not quick:
        arch, batch, precision = "sd15", 8, "bf16"
    else:
        arch, batch, precision = "tiny", 4, "fp32"
    out = []
    # Checkpointing first: `d2g bench gpu-days` measures the step without it, and a time-boxed
    # GPU run keeps the first cases.
    for checkpointing in (True, False):
        config = f"{arch} B={batch} {precision}{' grad-ckpt' if checkpointing else ''}"
        for kernels in ("ref", "fused"):
            out.append(Case(op="train_step", config=config, provider=kernels, modes=("fwd+bwd",),
                            make=_make(arch, device, batch, precision, kernels, checkpointing),
                            note=f"samples/s = {batch}e3/median_ms; plain steps (no R1)"))
    if device.startswith("cuda"):
        return out
    # The CPU's bf16 (issue 23): fp32 against bf16 autocast, at the tiny and the toy shapes,
    # and bf16 with G's and D's weights in channels_last ("bf16 cl").
    for cl in (False, True):
        for kernels in ("ref", "fused"):
            out.append(Case(op="train_step", config=f"{arch} B={batch} bf16{' cl' if cl else ''}",
                            provider=kernels, modes=("fwd+bwd",),
                            make=_make(arch, device, batch, "bf16", kernels, False, cl),
                            note=f"samples/s = {batch}e3/median_ms; plain steps (no R1)"))
    if not quick:
        for precision, cl in (("fp32", False), ("bf16", False), ("bf16", True)):
            for kernels in ("ref", "fused"):
                out.append(Case(op="train_step",
                                config=f"toy B=32 {precision}{' cl' if cl else ''}",
                                provider=kernels, modes=("fwd+bwd",),
                                make=_make_toy(device, 32, precision, kernels, cl),
                                note="the demo's step (toy world); samples/s = 32e3/median_ms"))
    return out


def main(argv=None) -> int:
    from benchmarks.harness import markdown_table_lines
    from d2g_fast.bench.train_speed import largest_batch

    p = argparse.ArgumentParser(description="largest per-GPU batch of the full training step")
    p.add_argument("--max-batch", action="store_true", help="run the search (GPU only)")
    p.add_argument("--arch", default="sd15")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--memory-gb", type=float, default=80.0,
                   help="cap the process to this much GPU memory (0: no cap)")
    args = p.parse_args(argv)
    if not args.max_batch:
        p.error("--max-batch: nothing else to do here; the timings run through benchmarks/run.py")
    if not torch.cuda.is_available():
        p.error("--max-batch needs a CUDA GPU")
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if args.memory_gb > 0:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gb / total))
    print(f"# {torch.cuda.get_device_name()} ({total:.0f} GiB, capped to "
          f"{args.memory_gb or total:.0f}) | torch {torch.__version__} | {args.arch} "
          f"{args.precision}")

    def rows():   # each row is printed as soon as its search ends
        for checkpointing in (False, True):
            b = largest_batch(args.arch, device="cuda", precision=args.precision,
                              gradient_checkpointing=checkpointing)
            yield ["on" if checkpointing else "off", str(b)]

    for line in markdown_table_lines(
            ["gradient checkpointing", "largest micro-batch (R1 step included)"], rows(),
            align="lr"):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
