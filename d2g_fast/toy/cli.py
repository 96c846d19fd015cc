"""``d2g toy``: the embedded toy text-to-image world.

    d2g toy train --out DIR [--seed S] [--quick] [--threads N]
    d2g toy ablate [--out ablation] [--seeds S ...] [--quick] [--rows ROW ...]

makes the whole world (VAE, text encoder + UNet teacher, evaluation classifier, E-LatentLPIPS)
from the seed alone; see d2g_fast/toy/train.py. The shipped d2g_fast/toy/weights/ were made by
``d2g toy train --out d2g_fast/toy/weights --seed 0 --threads 1``: about 21 minutes of stage
time on a 2-core CPU shared with other jobs (load 4-12), recorded per stage in their
provenance.json. A killed run resumes after its last finished stage.
"""
from __future__ import annotations

import argparse
import shlex
import sys

HELP = "the embedded toy text-to-image world (train it: d2g toy train --out DIR)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    sub.required = True
    p = sub.add_parser("train", help="train the toy world into a folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (teacher/, *.safetensors, "
                   "provenance.json)")
    p.add_argument("--seed", type=_seed, default=0, help="the one seed of everything")
    p.add_argument("--quick", action="store_true",
                   help="a few steps per stage (tests: the plumbing, not a usable world)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads (default: torch's; 1 is fastest for these tiny "
                        "models on a busy machine)")
    p.add_argument("--unet-steps", type=_positive_int, default=None,
                   help="teacher UNet training steps (default: the shipped weights' "
                        "ToySettings.unet_steps; recorded in provenance.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_ablate_arguments(sub)


def add_ablate_arguments(sub) -> None:
    from d2g_fast.toy.ablate import ROW_NAMES, AblateSettings

    d = AblateSettings()
    p = sub.add_parser("ablate", help="the paper's loss and discriminator ablations on the toy "
                       "world (one student per row and seed; resumable)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="ablation", help="folder (rerun to resume)")
    p.add_argument("--seeds", type=_seed, nargs="+", default=list(d.seeds),
                   help="training seeds: mean and spread over them")
    p.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=None,
                   help="only these rows (default: all)")
    for name in ("pairs", "steps", "iters", "batch_size", "eval_n"):
        p.add_argument("--" + name.replace("_", "-"), type=_positive_int, default=None,
                       help=f"(default {getattr(d, name)}; --quick: "
                            f"{getattr(AblateSettings.quick(), name)})")
    for name in ("lr", "lambda_gan", "r1_gamma"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--quick", action="store_true",
                   help="tiny steps for every row (tests: the plumbing, not a result)")
    p.add_argument("--toy-dir", default=None, help="a toy world folder (default: the shipped)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_ablate(args: argparse.Namespace) -> int:
    import dataclasses

    from d2g_fast.toy.ablate import AblateSettings, run_ablation

    base = AblateSettings.quick() if args.quick else AblateSettings()
    given = {name: getattr(args, name) for name in ("pairs", "steps", "iters", "batch_size",
                                                     "eval_n") if getattr(args, name) is not None}
    settings = dataclasses.replace(base, seeds=tuple(args.seeds), lr=args.lr,
                                   lambda_gan=args.lambda_gan, r1_gamma=args.r1_gamma, **given)
    command = "d2g " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    run_ablation(args.out, settings, rows=tuple(args.rows) if args.rows else None,
                 toy_dir=args.toy_dir, progress=not args.no_progress, command=command)
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from d2g_fast.toy.evaluate import quiet_diffusers
    from d2g_fast.toy.train import ToySettings, train_all

    quiet_diffusers()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.toy_command == "ablate":
        return run_ablate(args)
    settings = ToySettings.quick() if args.quick else ToySettings()
    if args.unet_steps is not None:
        settings.unet_steps = args.unet_steps
    command = "d2g " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    prov = train_all(args.out, seed=args.seed, settings=settings,
                     progress=not args.no_progress, command=command)
    m = prov["metrics"]
    print(f"toy world written to {args.out} in {prov['runtime_total_s']:.0f} s")
    for key in sorted(m):
        print(f"  {key}: {m[key]:.4g}")
    return 0
