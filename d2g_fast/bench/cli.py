"""``d2g bench ...``: measurements on this machine (nested subcommands)."""
from __future__ import annotations

import argparse

HELP = "measure on this machine: gpu-days (what a whole distillation costs here)"


def _add_gpu_days(sub) -> None:
    from d2g_fast.bench.archs import ARCHS

    p = sub.add_parser(
        "gpu-days", help="device-days of collection and training on this device, the savings "
        "of each optimisation, and the published costs",
        description="Measure ODE-pair collection, the trainer's full step and the regression "
        "loss on this device with the real architecture (random weights, nothing downloaded), "
        "then write DIR/gpu_days.csv, .md and .png: the recipe's device-days, what each "
        "optimisation saves, and the paper's and peers' published costs (cited).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", required=True, choices=ARCHS, help="teacher architecture")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pairs", type=float, default=3e6, help="ODE pairs of the recipe")
    p.add_argument("--steps", type=int, default=50, help="teacher sampler steps per pair")
    p.add_argument("--iters", type=int, default=20000, help="training iterations of the recipe")
    p.add_argument("--batch", type=int, default=1024, help="global training batch of the recipe")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats, collection timed at 10 steps and extrapolated")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--guidance", type=float, default=8.0, help="classifier-free guidance")
    p.add_argument("--collect-batch", type=int, default=None,
                   help="pairs per collection batch (default: 16 on GPUs, 4 for SDXL and CPUs)")
    p.add_argument("--train-batch", type=int, default=None,
                   help="per-device micro-batch of the timed training step (default by arch)")
    p.add_argument("--compile", action="store_true",
                   help="also measure torch.compile of the teacher UNet (GPU; about a minute)")
    p.add_argument("--no-levers", action="store_true",
                   help="skip the memory levers' stage (memory.plan.* rows: d2g plan's peak per "
                   "GPU of full training, LoRA, light D, checkpointing, FSDP2; 5 simulations, "
                   "minutes of CPU for the large teachers)")
    p.set_defaults(_bench=_run_gpu_days)


def _run_gpu_days(args) -> int:
    from d2g_fast.bench.gpu_days import Settings, run_gpu_days

    run_gpu_days(Settings(
        arch=args.arch, out=args.out, pairs=args.pairs, steps=args.steps, iters=args.iters,
        batch=args.batch, quick=args.quick, device=args.device, guidance=args.guidance,
        collect_batch=args.collect_batch, train_batch=args.train_batch, compile=args.compile,
        levers=not args.no_levers))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True
    _add_gpu_days(sub)


def run(args) -> int:
    return args._bench(args)
