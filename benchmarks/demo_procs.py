"""The demo's distillation step laid out over the cores (issue 23 item 3): the threads of one
process, one process with G's and D's phases side by side (--overlap-phases), or data
parallelism over processes (torchrun, gloo)? The same work, the demo's own trainer settings,
interleaved rounds.

    python benchmarks/demo_procs.py --pairs STORE [--rounds 3] [--steps 48] [--out DIR]

Variants, each a fresh ``d2g distill --config`` of ``--steps`` steps (batch 32, fp32, the GAN
term on from the first step, R1 every 16 steps: d2g_fast.demo.train_config with no warm-up):

  1p x 1t             one process, one torch thread (the basis of the floor);
  1p x Nt             one process, N = all cores' torch threads, phases one after the other;
  1p x Nt overlapped  the same with --overlap-phases (each phase on N/2 threads; the demo);
  Np x 1t             N processes of one thread each under torchrun (gloo), each with 32/N of
                      the batch.

Per variant and round: the training's own wall seconds per step (the run's device_hours, which
add up every process, divided by the processes, between its first and last logged step: no
start-up, no export) and the whole command's wall time. The floor
beside them: the one-thread step divided by N (N cores with no overhead at all). Ratios are per
round, against ``1p x Nt``; the table reports their medians. STORE: a toy pair store
(``d2g demo --out D`` leaves one in D/pairs).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import markdown_table  # noqa: E402


def write_config(pairs: str, out: Path, steps: int) -> Path:
    """The demo's TrainConfig for ``steps`` steps, GAN term on from the start, as a file."""
    from d2g_fast import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--no-progress"])
    config = demo.train_config(str(out), "run", pairs, {"iters": steps}, args,
                               demo.DEFAULTS["lambda_gan"], {"warmup_frac": 0.0})
    values = {k: v for k, v in config.to_dict().items()
              if k not in ("out", "checkpoint_every", "sample_every")}
    values.update(checkpoint_every=steps, sample_every=0, log_every=8, overlap_phases=False)
    path = out / "config.json"
    path.write_text(json.dumps(values, indent=1))
    return path


def run_variant(name: str, procs: int, threads: int, overlap: bool, config: Path,
                run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "d2g_fast.cli", "distill", "--config", str(config),
           "--out", str(run_dir), "--no-progress"] + (["--overlap-phases"] if overlap else [])
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={procs}"] + cmd[1:]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: d2g distill failed:\n{proc.stderr[-3000:]}")
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("device_hours")]
    first, last = rows[0], rows[-1]
    steps = int(last["step"]) - int(first["step"])
    hours = float(last["device_hours"]) - float(first["device_hours"])
    # device_hours counts every process's time (the GPU-hours of a multi-GPU run): / procs.
    return {"variant": name, "step_s": hours * 3600 / steps / procs, "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", required=True, help="a toy pair store")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--out", default="demo_procs_out")
    args = p.parse_args(argv)
    if not (Path(args.pairs) / "manifest.json").is_file():
        p.error(f"--pairs: {args.pairs!r} is not a pair store")
    cores = os.cpu_count() or 1
    if cores < 2:
        p.error("needs at least 2 cores")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = write_config(os.path.abspath(args.pairs), out, args.steps)
    variants = [("1p x 1t", 1, 1, False), (f"1p x {cores}t", 1, cores, False),
                (f"1p x {cores}t overlapped", 1, cores, True),
                (f"{cores}p x 1t", cores, 1, False)]
    results = []
    for r in range(args.rounds):
        for name, procs, threads, overlap in variants:
            run_dir = out / f"run_{name.replace(' ', '')}_r{r}"
            res = run_variant(name, procs, threads, overlap, config, run_dir)
            res["round"] = r
            results.append(res)
            print(json.dumps(res), flush=True)
    base = variants[1][0]
    by = {v[0]: [x for x in results if x["variant"] == v[0]] for v in variants}
    floor = statistics.median(x["step_s"] for x in by["1p x 1t"]) / cores
    rows = []
    for name, *_ in variants:
        ratios = [x["step_s"] / b["step_s"] for x, b in zip(by[name], by[base])]
        rows.append([name, f"{statistics.median(x['step_s'] for x in by[name]):.3f}",
                     f"{statistics.median(ratios):.2f}",
                     f"{statistics.median(x['wall_s'] for x in by[name]):.1f}"])
    rows.append([f"floor: 1p x 1t / {cores}", f"{floor:.3f}", "", ""])
    lines = [f"The demo's distillation step (toy, batch 32, fp32, GAN on), {args.steps} steps per "
             f"run, {args.rounds} interleaved rounds, {cores} cores; ratio: per round against "
             f"{base}, median.", ""]
    lines += markdown_table(["variant", "s / step (median)", f"ratio to {base}",
                             "whole process, s (median)"], rows, "lrrr")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    (out / "results.md").write_text(table)
    (out / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
