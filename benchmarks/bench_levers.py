"""The memory levers of issue 22 against full training: memory per process and step time.

One timed call = one optimiser step of ``d2g_fast.train.train_step`` (plain steps: no R1) with
one lever on, beside full training at the same shape and micro-batch:

  full           every parameter of G and D trained, one process
  lora           G a LoRA student (``--lora-rank 4``, the default targets): adapters trained
  light-d        D's backbone frozen (``--light-d``; skipped while the trainer lacks it)
  checkpointing  ``--gradient-checkpointing`` (G and D recompute activations in the backward)
  fsdp-2proc     FSDP2 (``--fsdp``) over 2 CPU processes (gloo), the same micro-batch per
                 process: each step waits for both processes (two workers driven over pipes)

Shapes: "tiny" (the tiny SD test model, 4x8x8 latents, B=4, random E-LatentLPIPS) and "toy"
(the shipped toy world's teacher and E-LatentLPIPS, B=32, the demo's augmentation), fp32. The
same ``cases()`` serve ``benchmarks/run.py`` and ``pytest benchmarks/ --benchmark-only`` (times
only: their peak-memory column is the calling process's, which for fsdp-2proc is not the
workers'). The lever table, with the memory each process holds, comes from this file:

    OMP_NUM_THREADS=1 python benchmarks/bench_levers.py --rounds 5 --out DIR

Memory per process = what the run keeps between steps (``d2g_fast.plan.measure
.persistent_bytes``: weights, EMA, AdamW states, frozen networks) + the peak of an R1 step
above it (``profiler_peak_bytes``, the CPU allocator's events), what ``d2g plan`` predicts;
the plan's prediction for the same run is printed beside it (``--no-plan`` skips it). Times: every round
times every case in turn (interleaved), a case's ratio is the median over rounds of its round
median / full's round median of the same round.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import weakref

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Case, SkipCase, markdown_table  # noqa: E402

LEVERS = {  # lever -> (TrainConfig overrides, processes)
    "full": ({}, 1),
    "lora": ({"lora_rank": 4}, 1),
    "light-d": ({"light_d": True}, 1),
    "checkpointing": ({"gradient_checkpointing": True}, 1),
    "fsdp-2proc": ({"fsdp": True}, 2),
}
SHAPES = {"tiny": 4, "toy": 32}  # shape -> micro-batch per process


# ------------------------------------------------------------------------------ building
def _teacher_and_config(shape: str, batch: int, overrides: dict):
    from d2g_fast.train import TrainConfig

    common = dict(batch_size=batch, precision="fp32", progress=False, device="cpu", seed=0,
                  **overrides)
    if shape == "tiny":
        from d2g_fast.bench import archs

        return archs.teacher("tiny"), TrainConfig(lpips_random=True, **common)
    from d2g_fast import toy
    from d2g_fast.demo import DEFAULTS
    from d2g_fast.teacher import Teacher

    world = toy.shipped_dir()  # the demo's distillation (d2g_fast.demo.distill) at its batch
    config = TrainConfig(augment="bg", lpips_path=str(world / "elatentlpips.safetensors"),
                         lambda_gan=DEFAULTS["lambda_gan"], warmup_steps=0, ema_decay=0.99,
                         r1_gamma=0.1, r1_interval=16, **common)
    return Teacher.from_pretrained(str(world / "teacher")), config


def build(shape: str, lever: str, procs=None):
    """(run, batch, plain step numbers) of ``lever`` at ``shape`` in this process."""
    from d2g_fast.train import TrainConfig, build_run

    overrides, _ = LEVERS[lever]
    missing = [k for k in overrides if k not in TrainConfig.__dataclass_fields__]
    if missing:
        raise SkipCase(f"the trainer has no {missing[0]} yet")
    torch.manual_seed(0)
    teacher, config = _teacher_and_config(shape, SHAPES[shape], overrides)
    run = build_run(config, teacher=teacher, dataset=None, device="cpu", procs=procs)
    from d2g_fast.plan.simulate import synthetic_batch

    data = synthetic_batch(run, config.batch_size)
    steps = (s for s in itertools.count(1) if s % config.r1_interval)
    return run, data, steps


def memory_of(run, data) -> dict:
    """Bytes this process holds: persistent state, and the peak of an R1 step (the costlier
    kind, whose peak ``d2g plan`` predicts) above it."""
    from d2g_fast.plan.measure import persistent_bytes, profiler_peak_bytes
    from d2g_fast.plan.simulate import r1_step
    from d2g_fast.train import train_step

    peak = profiler_peak_bytes(lambda: train_step(run, data, r1_step(run.config)))
    return {"persistent": persistent_bytes(run), "step_peak": peak}


# ------------------------------------------------------------------------------ 2 processes
def _worker(rank: int, world: int, port: int, shape: str, lever: str, conn) -> None:
    """One process of a multi-process run: build, then step / measure on command."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK="0")
    torch.set_num_threads(1)
    from d2g_fast.train import train_step
    from d2g_fast.train.distributed import start_processes, stop_processes

    try:
        procs, _ = start_processes("cpu")
        run, data, steps = build(shape, lever, procs)
        train_step(run, data, next(steps))  # AdamW states exist from here on
        conn.send("ready")
        while True:
            command = conn.recv()
            if command == "step":
                train_step(run, data, next(steps))
                conn.send("done")
            elif command == "memory":
                conn.send(memory_of(run, data))
            else:
                break
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(f"failed: {type(exc).__name__}: {exc}")
    finally:
        stop_processes()


class Workers:
    """``world`` worker processes of one run, driven in lock-step from this process."""

    def __init__(self, shape: str, lever: str, world: int):
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(rank, world, port, shape, lever, child),
                            daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self._ask(None)  # wait until every worker is built
        weakref.finalize(self, Workers._stop, self.conns, self.procs)

    def _ask(self, command):
        if command is not None:
            for c in self.conns:
                c.send(command)
        answers = [c.recv() for c in self.conns]
        for a in answers:
            if isinstance(a, str) and a.startswith("failed"):
                raise RuntimeError(f"bench_levers worker {a}")
        return answers

    def step(self) -> None:
        self._ask("step")

    def memory(self) -> dict:
        """The larger process's bytes (ranks hold equal shares; rank 0 also the extras)."""
        return max(self._ask("memory"), key=lambda m: m["persistent"] + m["step_peak"])

    @staticmethod
    def _stop(conns, procs) -> None:
        for c in conns:
            try:
                c.send("stop")
            except (OSError, BrokenPipeError):
                pass
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


# ------------------------------------------------------------------------------ the cases
def _make(shape: str, lever: str, device: str, box: dict):
    def make():
        if device.startswith("cuda"):
            raise SkipCase("the lever comparison is a CPU case (2 gloo processes)")
        world = LEVERS[lever][1]
        if world > 1:
            workers = Workers(shape, lever, world)
            box["memory"] = workers.memory
            return {"fwd+bwd": workers.step}
        from d2g_fast.train import train_step

        run, data, steps = build(shape, lever)
        train_step(run, data, next(steps))
        box["memory"] = lambda: memory_of(run, data)
        box["run"] = run
        return {"fwd+bwd": lambda: train_step(run, data, next(steps))}
    return make


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    for shape in ("tiny",) if quick else tuple(SHAPES):
        batch = SHAPES[shape]
        for lever in LEVERS:
            box: dict = {}
            out.append(Case(op="train_lever", config=f"{shape} B={batch} fp32", provider=lever,
                            modes=("fwd+bwd",), make=_make(shape, lever, device, box),
                            extra={"box": box, "shape": shape},
                            note=f"plain step; samples/s per process = {batch}e3/median_ms"))
    return out


# ------------------------------------------------------------------------------ the table
def predicted_bytes(shape: str, lever: str) -> int | None:
    """``d2g plan``'s prediction (CPU, no reserve) for the lever's run, or None (toy)."""
    if shape != "tiny":
        return None
    from d2g_fast.plan.planner import PlanRequest, plan

    overrides, world = LEVERS[lever]
    options = {k: v for k, v in overrides.items() if k not in ("fsdp", "gradient_checkpointing")}
    req = PlanRequest("tiny", batch_size=SHAPES[shape], gpus=world, gpu_memory_gb=1e6,
                      fsdp=overrides.get("fsdp", False), precision="fp32", device="cpu",
                      gradient_checkpointing=overrides.get("gradient_checkpointing", False),
                      options=options)
    return plan(req, max_batch=1).peak


def main(argv=None) -> int:
    import csv
    import datetime as dt

    from benchmarks.harness import machine_tags, time_callable

    p = argparse.ArgumentParser(description="memory and step time of each lever vs full training")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--no-plan", action="store_true", help="skip the plan's predictions")
    p.add_argument("--out", default=None, help="folder for levers.csv / levers.md")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.min_reps < 1:
        p.error("--rounds and --min-reps: positive integers")
    from d2g_fast.plan.fake import portable_trunk

    tags = machine_tags("cpu")
    built = []
    with portable_trunk():  # the trunk every device runs (and the plan models)
        for case in cases("cpu", quick=False):
            if case.extra["shape"] not in args.shapes:
                continue
            try:
                fn = case.build()["fwd+bwd"]
            except SkipCase as exc:
                print(f"# {case.config} {case.provider}: skipped ({exc})", flush=True)
                continue
            mem = case.extra["box"]["memory"]()
            pred = None if args.no_plan else predicted_bytes(case.extra["shape"], case.provider)
            built.append({"case": case, "fn": fn, "memory": mem, "predicted": pred,
                          "rounds": []})
            print(f"# built {case.config} {case.provider}: {sum(mem.values()) / 2**20:.1f} MiB",
                  flush=True)
        for r in range(args.rounds):
            for b in built:
                t = time_callable(b["fn"], "cpu", min_time_s=0.0, min_reps=args.min_reps,
                                  max_reps=args.min_reps, warmup=1)
                b["rounds"].append(t["median_ms"])
            print(f"# round {r + 1}/{args.rounds} done", flush=True)
    rows = _rows(built)
    text = _markdown(rows, tags, argv)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "levers.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "levers.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["date", *tags])
            w.writeheader()
            date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
            for row in rows:
                w.writerow({**row, "date": date, **tags})
    return 0


def _rows(built: list[dict]) -> list[dict]:
    mib = 2 ** 20
    rows = []
    for b in built:
        case = b["case"]
        full = next(x for x in built if x["case"].config == case.config
                    and x["case"].provider == "full")
        ratios = [t / f for t, f in zip(b["rounds"], full["rounds"])]
        total = sum(b["memory"].values())
        full_total = sum(full["memory"].values())
        rows.append({"shape": case.config, "lever": case.provider,
                     "persistent_mib": b["memory"]["persistent"] / mib,
                     "step_peak_mib": b["memory"]["step_peak"] / mib,
                     "total_mib": total / mib, "memory_vs_full": total / full_total,
                     "predicted_mib": None if b["predicted"] is None else b["predicted"] / mib,
                     "median_ms": statistics.median(b["rounds"]),
                     "time_vs_full": statistics.median(ratios),
                     "ratio_spread": f"{min(ratios):.2f}-{max(ratios):.2f}",
                     "rounds": len(ratios)})
    return rows


def _markdown(rows: list[dict], tags: dict, argv) -> str:
    command = "python benchmarks/bench_levers.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
    lines = [f"Device: {tags['device']}; torch {tags['torch']}; {tags['threads']} threads per "
             f"process; git {tags['git']}; CPU flags {tags['cpu_flags']}; command: `{command}`",
             "",
             "memory per process = persistent state (weights, EMA, AdamW states, frozen "
             "networks) + an R1 step's peak above it (CPU allocator events); plan: d2g plan's "
             "prediction of the same (no GPU reserve); time (plain steps): median over rounds "
             "of the round median, x full: median of the per-round ratios (spread: lowest-"
             "highest round ratio).",
             ""]
    header = ["shape", "lever", "persistent MiB", "step peak MiB", "memory MiB",
              "x full memory", "plan MiB", "step ms", "x full time", "ratio spread"]
    cells = [[r["shape"], r["lever"], f"{r['persistent_mib']:.1f}", f"{r['step_peak_mib']:.1f}",
              f"{r['total_mib']:.1f}", f"{r['memory_vs_full']:.2f}",
              "" if r["predicted_mib"] is None else f"{r['predicted_mib']:.1f}",
              f"{r['median_ms']:.0f}", f"{r['time_vs_full']:.2f}", r["ratio_spread"]]
             for r in rows]
    return "\n".join(lines + markdown_table(header, cells, align="llrrrrrrrl"))


if __name__ == "__main__":
    sys.exit(main())
