"""The demo's distillation stage under several training seeds: the seeds' spread of the
student's FD and accuracy, and its time, for a recipe (issue 23 item 3, issue 25).

    python benchmarks/demo_recipe_spread.py --recipe old|new|defaults --seed S --out DIR
        [--lambda-gan X] [--lr-d X] [--warmup-frac X] [--r1-gamma X] [--tag NAME]

One (recipe, seed) per call, so that several run side by side at one thread each (or one at a
time with --threads 2, where the demo's rule overlaps G's and D's phases). The pairs
are collected once per recipe into DIR/pairs-<recipe> (the collection's seed is fixed at 0:
only the training seed varies) and reused by every later call; the student is trained and
exported under DIR/<tag>_seed<S>/ and judged on the demo's held-out prompts and noise
(d2g_fast.toy.ablate.Judge: FD, accuracy, per attribute, E-LatentLPIPS to the multi-step
teacher). Appends one JSON line to DIR/results.jsonl with the metrics, the training's wall and
CPU seconds (CPU seconds at one thread hardly depend on the machine's load) and the settings.

Recipes: "old" is the demo's recipe of git 60fc6f1 (2304 pairs of 25 DDIM steps, 700 steps at
batch 32); "new" the shorter one measured against it for issue 23 item 3 (2048 pairs of 10
DDIM steps, 560 steps); "defaults" d2g_fast.demo.DEFAULTS as they are now. Flags override the
GAN settings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OLD = dict(pairs=2304, steps=25, guidance=4.0, iters=700, batch_size=32, lr=2e-4, lr_d=2e-4,
           lambda_gan=0.05, eval_n=288, warmup_frac=0.1, ema_decay=0.99, r1_gamma=0.1)


NEW = dict(OLD, pairs=2048, steps=10, iters=560, lr_d=None)


def recipe(name: str) -> dict:
    from d2g_fast.demo import DEFAULTS

    return dict({"old": OLD, "new": NEW}.get(name) or DEFAULTS)


def main(argv=None) -> int:
    import torch

    from d2g_fast import demo
    from d2g_fast.toy.ablate import AblateSettings, Judge
    from d2g_fast.toy.evaluate import quiet_diffusers

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=("old", "new", "defaults"), required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default=None, help="run name (default: the recipe's)")
    p.add_argument("--toy-dir", default=None,
                   help="a copy of a toy world (default: the shipped one; a copy keeps runs "
                        "consistent when the shipped weights change while they train)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1); with 2 or more the demo overlaps G's and "
                        "D's phases unless --sequential-phases")
    p.add_argument("--sequential-phases", action="store_true")
    for flag in ("lambda_gan", "lr_d", "warmup_frac", "r1_gamma"):
        p.add_argument("--" + flag.replace("_", "-"), type=float, default=None)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    quiet_diffusers()
    r = recipe(args.recipe)
    for flag in ("lambda_gan", "lr_d", "warmup_frac", "r1_gamma"):
        if getattr(args, flag) is not None:
            r[flag] = getattr(args, flag)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or args.recipe
    ns = argparse.Namespace(guidance=r["guidance"], seed=0, toy_dir=args.toy_dir, no_progress=True,
                            batch_size=r["batch_size"], lr=r["lr"], precision="fp32",
                            sequential_phases=args.sequential_phases)
    settings = {k: r[k] for k in ("pairs", "steps", "iters", "eval_n")}
    pairs_dir = out / f"pairs-{args.recipe}"
    if not (pairs_dir / "manifest.json").is_file():
        demo.collect_pairs(str(out / f"collect-{args.recipe}"), settings, ns)
        os.replace(out / f"collect-{args.recipe}" / "pairs", pairs_dir)
    ns.seed = args.seed
    t0, c0 = time.perf_counter(), time.process_time()
    student = demo.distill(str(out), f"{tag}_seed{args.seed}_run", str(pairs_dir), settings, ns,
                           r["lambda_gan"], recipe=r)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    judge = Judge(demo.toy_world(ns), AblateSettings(eval_n=r["eval_n"],
                                                     guidance=r["guidance"]))
    m = judge.student(student)
    keep = ("fd", "accuracy", "attribute_accuracy", "e_latentlpips", "precision", "recall")
    line = {"tag": tag, "recipe": args.recipe, "seed": args.seed, "settings": r,
            "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
            "threads": torch.get_num_threads(), "overlap_phases": demo.overlap_phases(ns),
            "load_after": os.getloadavg()[0],
            **{k: m[k] for k in keep if k in m}}
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
