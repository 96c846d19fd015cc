"""``make demo`` / ``d2g demo`` / ``python -m d2g_fast.demo``: the method, working, in small.

On the toy text-to-image world that ships with the package (d2g_fast.toy: a real, trained,
tiny Stable-Diffusion-shaped teacher for 32x32 pictures of coloured shapes, its own
E-LatentLPIPS and an attribute classifier used only to judge), offline on a CPU:

1. collects ODE pairs from the teacher (DDIM with classifier-free guidance) with the code of
   ``d2g collect``;
2. distils a one-step student with the code of ``d2g distill`` (E-LatentLPIPS + GAN against the
   conditional multi-scale discriminator) and exports it with ``d2g export``;
   with ``--ablation`` also a regression-only student (lambda_GAN = 0), as the paper's ablation;
3. evaluates, on the same held-out prompts and noise, the multi-step teacher, the teacher with
   1, 2 and 4 DDIM steps and the student(s): Frechet distance to real toy images in the
   classifier's feature space, attribute accuracy, E-LatentLPIPS to the multi-step teacher,
   images per second;
4. writes report.md, metrics.json, PNG grids and a chart of FD against network evaluations.

The teacher is a toy: the numbers show the method at work, not Stable Diffusion's quality.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HELP = "distil the shipped toy text-to-image teacher into a one-step student and evaluate it"

# The demo's recipe, the one source of it (d2g toy ablate and benchmarks read it too): sized for
# a 2-core CPU, under 5 minutes (the stage times are in the report). 10 DDIM steps per pair:
# the toy teacher's 10-step samples are its 25-step ones to E-LatentLPIPS 0.001 (the student's
# error is 0.11); 500 steps with G's and D's phases overlapped: issue 23, benchmarks/RESULTS.md
# (the seeds' spread against 560 and 450).
# lr is G's and D's unless lr_d is set; warm-up (GAN term off) for warmup_frac x iters steps.
DEFAULTS = dict(pairs=2048, steps=10, guidance=4.0, iters=500, batch_size=32, lr=2e-4,
                lr_d=None, lambda_gan=0.05, eval_n=288, warmup_frac=0.1, ema_decay=0.99,
                r1_gamma=0.1)
# --quick (the test suite): every stage, minutes less.
QUICK = dict(pairs=256, steps=10, iters=120, eval_n=96)
# --guidance-sweep without a value (d2g_fast/toy/guidance_sweep.py).
SWEEP_SCALES = "1.5,2.5,4,6,8"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo",
                   help="working folder (collection and training resume when it exists)")
    p.add_argument("--pairs", type=int, default=None,
                   help=f"ODE pairs to collect (default {DEFAULTS['pairs']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"teacher DDIM steps per pair (default {DEFAULTS['steps']})")
    p.add_argument("--guidance", type=float, default=DEFAULTS["guidance"],
                   help="classifier-free guidance of the teacher")
    p.add_argument("--iters", type=int, default=None,
                   help=f"distillation steps (default {DEFAULTS['iters']})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate of G and D")
    p.add_argument("--lambda-gan", type=float, default=DEFAULTS["lambda_gan"])
    p.add_argument("--eval-n", type=int, default=None,
                   help=f"held-out samples per sampler (default {DEFAULTS['eval_n']})")
    p.add_argument("--ablation", action="store_true",
                   help="also train a regression-only student (lambda_GAN = 0)")
    p.add_argument("--quick", action="store_true",
                   help="a shortened run (every stage, fewer pairs and steps)")
    p.add_argument("--toy-dir", default=None,
                   help="a toy world written by d2g toy train (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    # fp32 by default: the recorded results (benchmarks/RESULTS.md) are fp32 runs, and bf16's
    # effect on the student's FD and accuracy has not been measured yet (issue 23).
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32",
                   help="the distillation's --precision (default fp32); auto: bf16 (autocast) "
                        "where the CPU computes bf16 in hardware (AMX-BF16 or AVX-512-BF16), "
                        "else fp32")
    p.add_argument("--sequential-phases", action="store_true",
                   help="run G's and D's phases of each step one after the other (default: side "
                        "by side on two threads where torch has 2+ threads, --overlap-phases)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--guidance-sweep", nargs="?", default=None, metavar="SCALES",
                   const=SWEEP_SCALES,
                   help=f"instead: one guidance-conditioned student over these scales (default "
                        f"{SWEEP_SCALES}) beside the teacher and a fixed-scale student at "
                        f"--guidance, evaluated at every scale (its own default counts: "
                        f"d2g_fast/toy/guidance_sweep.py)")


def resolve(args: argparse.Namespace) -> dict:
    """The demo's settings: explicit flags, else --quick's, else the defaults; checked."""
    settings = {}
    for name in ("pairs", "steps", "iters", "eval_n"):
        value = getattr(args, name)
        if value is None:
            value = QUICK[name] if args.quick else DEFAULTS[name]
        settings[name] = value
    for name in ("pairs", "steps", "iters", "eval_n", "batch_size"):
        value = settings.get(name, getattr(args, name, None))
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if settings["pairs"] < args.batch_size:
        raise ValueError(f"--pairs ({settings['pairs']}) must be at least --batch-size "
                         f"({args.batch_size})")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    return settings


def stage(number: int, total: int, text: str) -> None:
    print(f"\n[{number}/{total}] {text}", flush=True)


def training_precision(choice: str) -> str:
    """--precision auto: bf16 where the CPU has bf16 hardware (d2g_fast.cpu_features)."""
    if choice != "auto":
        return choice
    from d2g_fast.cpu_features import bf16_hardware

    return "bf16" if bf16_hardware() else "fp32"


def overlap_phases(args=None) -> bool:
    """G's and D's phases side by side (TrainConfig.overlap_phases) unless --sequential-phases
    or torch has a single thread (the demo's rule; d2g toy ablate's and the sweep's too)."""
    import torch

    return not getattr(args, "sequential_phases", False) and torch.get_num_threads() >= 2


def training_layout(args) -> str:
    """How the distillation ran, for the report and the console."""
    import torch

    phases = "overlapped" if overlap_phases(args) else "sequential"
    return (f"distillation precision {training_precision(args.precision)}, "
            f"{torch.get_num_threads()} torch threads, G's and D's phases {phases}")


def stage_times_section(stage_seconds: dict, layout: str) -> str:
    """The report's "Time per stage" section (markdown)."""
    from d2g_fast.cpu_features import describe

    rows = "\n".join(f"| {name} | {sec:.1f} |" for name, sec in stage_seconds.items())
    return (f"\n## Time per stage\n\n{describe()}; {layout}.\n\n"
            f"| stage | seconds |\n|---|---:|\n{rows}\n")


def toy_world(args) -> Path:
    from d2g_fast import toy

    folder = Path(args.toy_dir) if args.toy_dir else toy.shipped_dir()
    for name in ("teacher/model_index.json", "elatentlpips.safetensors",
                 "classifier.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"--toy-dir: {str(folder / name)!r} is missing (make a toy "
                                    f"world with d2g toy train --out DIR)")
    return folder


def collect_pairs(out: str, settings: dict, args) -> str:
    from d2g_fast import toy
    from d2g_fast.teacher import Teacher
    from d2g_fast.teacher.collect import collect

    teacher = Teacher.from_pretrained(str(toy_world(args) / "teacher"))
    pairs_dir = os.path.join(out, "pairs")
    collect(teacher, toy.train_prompts(), pairs_dir, settings["pairs"], steps=settings["steps"],
            guidance=args.guidance, batch_size=64, shard_size=256, seed=args.seed,
            progress=not args.no_progress, log=lambda *a: None)
    return pairs_dir


def distill(out: str, name: str, pairs_dir: str, settings: dict, args, lambda_gan: float,
            recipe: dict | None = None):
    """Train and export one student; returns its pipeline folder."""
    from d2g_fast.train import export_pipeline, train

    config = train_config(out, name, pairs_dir, settings, args, lambda_gan, recipe)
    train(config, log=lambda *a: None)
    return export_pipeline(config.out, os.path.join(out, name.replace("run", "student")))


def train_config(out: str, name: str, pairs_dir: str, settings: dict, args, lambda_gan: float,
                 recipe: dict | None = None):
    """The TrainConfig of one student. ``recipe``: the GAN settings (lr_d, warmup_frac,
    ema_decay, r1_gamma), DEFAULTS' unless given."""
    from d2g_fast.train import TrainConfig

    recipe = {**DEFAULTS, **(recipe or {})}
    iters = settings["iters"]
    world = toy_world(args)
    config = TrainConfig(
        teacher=str(world / "teacher"), pairs=pairs_dir, out=os.path.join(out, name),
        lpips_path=str(world / "elatentlpips.safetensors"), augment="bg",
        max_steps=iters, batch_size=args.batch_size, lr_g=args.lr,
        lr_d=recipe["lr_d"] or args.lr, lambda_gan=lambda_gan,
        warmup_steps=int(iters * recipe["warmup_frac"]), ema_decay=recipe["ema_decay"],
        r1_gamma=recipe["r1_gamma"], precision=training_precision(args.precision),
        overlap_phases=overlap_phases(args),
        r1_interval=16, checkpoint_every=max(1, iters // 4), keep_checkpoints=1,
        log_every=max(1, iters // 20), sample_every=max(1, iters // 2),
        progress=not args.no_progress, seed=args.seed, device="cpu")
    return config


def summary_table(metrics: dict) -> str:
    lines = [f"{'sampler':<26}{'NFE':>5}{'FD':>10}{'accuracy':>10}{'E-LatentLPIPS':>15}"
             f"{'images/s':>10}"]
    for name, m in metrics.items():
        if not isinstance(m, dict) or "fd" not in m:
            continue
        lines.append(f"{name:<26}{m.get('nfe', ''):>5}{m['fd']:>10.3f}{m['accuracy']:>10.3f}"
                     f"{m.get('e_latentlpips', float('nan')):>15.4f}"
                     f"{m.get('images_per_s', float('nan')):>10.1f}")
    return "\n".join(lines)


ABLATION_NOTE = """
## The method's parts, one at a time

`d2g toy ablate` trains one student per row of the paper's two ablation tables (loss: MSE,
Pseudo-Huber, pixel LPIPS, LatentLPIPS, E-LatentLPIPS; discriminator: regression only, + diffusion
D, + z conditioning, + R1, + multi-scale, + mix-and-match) on the same pairs and seeds and
reports them beside the paper's figures. The full run recorded on the project's CPU (this
demo's settings at 560 steps per student, 3 seeds) is
`benchmarks/results/toy-ablation-cpu-2026-12-05-full/report.md` in the repository, and
`benchmarks/RESULTS.md` (section "The paper's ablations on the toy world: the full run") reads
it: which of the paper's orderings the toy reproduces, and why the GAN term does not move this
demo's numbers.
"""


def append_ablation_note(report: str) -> None:
    """Point the demo's report at the ablation tables (the demo shows the whole method only)."""
    with open(report, "a", encoding="utf-8") as f:
        f.write(ABLATION_NOTE)


def run(args: argparse.Namespace) -> int:
    import torch

    from d2g_fast import toy
    from d2g_fast.teacher.collect_cmd import quiet_model_loading

    if args.guidance_sweep is not None:
        from d2g_fast.toy import guidance_sweep

        return guidance_sweep.run(args)
    settings = resolve(args)
    quiet_model_loading()
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    total = 4 if args.ablation else 3
    stage_seconds = {}  # wall seconds of each stage, for the report
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stage_seconds[name] = now - clock
        clock = now

    stage(1, total, f"collecting {settings['pairs']} ODE pairs from the toy teacher (DDIM "
                    f"{settings['steps']} steps, guidance {args.guidance})")
    pairs_dir = collect_pairs(out, settings, args)
    lap("collection")
    stage(2, total, f"distilling a one-step student: {settings['iters']} steps of "
                    f"E-LatentLPIPS + {args.lambda_gan} x GAN, batch {args.batch_size}")
    students = {"student_1step": distill(out, "run", pairs_dir, settings, args,
                                         args.lambda_gan)}
    lap("distillation")
    if args.ablation:
        stage(3, total, "distilling the regression-only student (lambda_GAN = 0)")
        students["regression_only_1step"] = distill(out, "run_regression_only", pairs_dir,
                                                    settings, args, 0.0)
        lap("distillation (regression only)")
    stage(total, total, f"evaluating on {settings['eval_n']} held-out prompts and noises")
    # The multi-step teacher judged is the pairs' own sampler (DDIM --steps): what the student
    # learnt to reproduce in one step.
    metrics = toy.evaluate(students, out, toy_dir=toy_world(args), n=settings["eval_n"],
                           teacher_steps=settings["steps"], guidance=args.guidance,
                           progress=not args.no_progress)
    append_ablation_note(os.path.join(out, "report.md"))
    lap("evaluation")
    seconds = time.perf_counter() - start
    precision = training_precision(args.precision)
    layout = training_layout(args)
    with open(os.path.join(out, "report.md"), "a", encoding="utf-8") as f:
        f.write(stage_times_section({**stage_seconds, "total": seconds}, layout))
    with open(os.path.join(out, "demo.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": {**settings, "guidance": args.guidance,
                                "batch_size": args.batch_size, "lr": args.lr,
                                "lambda_gan": args.lambda_gan, "seed": args.seed,
                                "ablation": args.ablation, "precision": precision,
                                "overlap_phases": overlap_phases(args)},
                   "seconds": seconds, "stage_seconds": stage_seconds,
                   "threads": torch.get_num_threads()}, f, indent=1)
    print("\n" + summary_table(metrics))
    print("\n" + "  ".join(f"{name} {sec:.0f} s" for name, sec in stage_seconds.items())
          + f"  ({layout})")
    print(f"\ndemo finished in {seconds / 60:.1f} min: report {os.path.join(out, 'report.md')}"
          f", metrics {os.path.join(out, 'metrics.json')} (the teacher is a toy)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m d2g_fast.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, no traceback
        print(f"d2g demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
