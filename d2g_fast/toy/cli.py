"""``d2g toy``: the embedded toy text-to-image world.

    d2g toy train --out DIR [--seed S] [--quick] [--threads N]

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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    from d2g_fast.toy.evaluate import quiet_diffusers
    from d2g_fast.toy.train import ToySettings, train_all

    quiet_diffusers()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ToySettings.quick() if args.quick else ToySettings()
    command = "d2g " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    prov = train_all(args.out, seed=args.seed, settings=settings,
                     progress=not args.no_progress, command=command)
    m = prov["metrics"]
    print(f"toy world written to {args.out} in {prov['runtime_total_s']:.0f} s")
    for key in sorted(m):
        print(f"  {key}: {m[key]:.4g}")
    return 0
