"""The light D's trade-off on the toy world (issue 22 item 2): the demo's student trained with
the full D and with the light D (``--light-d``), same pairs, same steps, same seeds, evaluated
like ``d2g toy ablate`` (FD, attribute accuracy, E-LatentLPIPS to the multi-step teacher), plus
each run's D memory (trained / frozen weights, gradients, AdamW states, from the built run) and
seconds per step.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/light_d_tradeoff.py OUT \
        [--pairs 512] [--steps 25] [--iters 80] [--batch-size 16] [--eval-n 144] [--seeds 0 1]

The recipe is the full method's row of the toy ablation (d2g_fast.toy.ablate, the demo's
DEFAULTS) with fewer pairs and steps when asked. Resumable: each finished (variant, seed) is
OUT/rows/<variant>_seed<S>.json. Writes OUT/results.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import markdown_table  # noqa: E402

VARIANTS = {"full_d": {}, "light_d": {"light_d": True}}


def d_memory(config) -> dict:
    """Bytes of D's trained and frozen weights, and of its gradients + AdamW states (3 x the
    trained weights), from the run the trainer builds."""
    from d2g_fast.train.build import build_run

    run = build_run(config)
    d = run.discriminator
    trained = sum(p.numel() * p.element_size() for p in d.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in d.parameters() if not p.requires_grad)
    return {"d_trained_bytes": trained, "d_frozen_bytes": frozen,
            "d_grad_adamw_bytes": 3 * trained}


def main(argv=None) -> int:
    from d2g_fast import toy
    from d2g_fast.toy.ablate import (ROWS, AblateSettings, Judge, _seconds_per_step,
                                     collect_pairs, row_config)
    from d2g_fast.train import export_pipeline, train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--steps", type=int, default=25, help="teacher DDIM steps per pair")
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-n", type=int, default=144)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = AblateSettings(pairs=args.pairs, steps=args.steps, iters=args.iters, batch_size=args.batch_size,
                       eval_n=args.eval_n, seeds=tuple(args.seeds)).validate()
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    world = toy.shipped_dir()
    row = [r for r in ROWS if r[0] == "mix_and_match"][0]  # the full method
    start = time.perf_counter()
    pairs_dir = collect_pairs(world, out, s, progress=False)
    judge = Judge(world, s)
    results = {"settings": {**dataclasses.asdict(s), "seeds": list(s.seeds)},
               "command": " ".join(sys.argv), "rows": {}}
    for name, extra in VARIANTS.items():
        for seed in s.seeds:
            path = out / "rows" / f"{name}_seed{seed}.json"
            if not path.is_file():
                run_dir = out / "runs" / f"{name}_seed{seed}"
                config = dataclasses.replace(
                    row_config(row, s, seed, world, pairs_dir, str(run_dir), False), **extra)
                summary = train(config, log=lambda *a: None)
                student = export_pipeline(str(run_dir), str(out / "students" / path.stem))
                m = judge.student(student)
                m["seconds_per_step"] = _seconds_per_step(summary)
                m.update(d_memory(config))
                path.write_text(json.dumps(m, indent=1))
                shutil.rmtree(out / "students" / path.stem, ignore_errors=True)
                print(f"{name} seed {seed}: FD {m['fd']:.2f}", flush=True)
            results["rows"].setdefault(name, {})[seed] = json.loads(path.read_text())
    results["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(results: dict) -> str:
    header = ["D", "seed", "FD", "accuracy", "E-LatentLPIPS to teacher", "s / step",
              "D trained MB", "D frozen MB", "D grads + AdamW MB"]
    cells = [[name, str(seed), f"{m['fd']:.2f}", f"{m['accuracy']:.3f}",
              f"{m['e_latentlpips']:.4f}", f"{m['seconds_per_step']:.2f}",
              *(f"{m[k] / 1e6:.2f}" for k in ("d_trained_bytes", "d_frozen_bytes",
                                              "d_grad_adamw_bytes"))]
             for name, seeds in results["rows"].items() for seed, m in seeds.items()]
    return "\n".join(markdown_table(header, cells, align="lrrrrrrrr"))


if __name__ == "__main__":
    sys.exit(main())
