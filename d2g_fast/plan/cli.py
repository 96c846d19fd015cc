"""``d2g plan``: the peak memory per GPU of a distillation run, before the run."""
from __future__ import annotations

import argparse

HELP = "predict the peak memory per GPU of d2g distill (what fits, the largest batch)"
DESCRIPTION = HELP + (". The trainer's networks are built from the teacher's configs on fake "
                      "tensors (no weights read, no memory used) and its step is simulated "
                      "allocation by allocation; see README 'Fitting a large teacher'. Exit "
                      "status 0 when the run fits, 1 when it does not.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from d2g_fast.bench.archs import ARCHS

    src = p.add_mutually_exclusive_group()
    src.add_argument("--teacher", default=None, help="local diffusers folder of the teacher, "
                     "any family (SD, SDXL, SD3, FLUX; only its config files and tokenizers "
                     "are read)")
    src.add_argument("--arch", default=None, choices=ARCHS, help="a built-in architecture")
    p.add_argument("--resolution", type=int, default=None, help="with --teacher: the image "
                   "side in pixels of the pairs (d2g collect --resolution; default: the "
                   "family's own)")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per GPU "
                   "(d2g distill --batch-size)")
    p.add_argument("--gpus", default="1", help="processes / GPUs of the run; several "
                   "comma-separated counts (1,8) give one plan each from one simulation")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU, GB (1e9 B)")
    p.add_argument("--fsdp", action="store_true", help="shard G, D and AdamW over the GPUs")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute G's and D's activations in the backward")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="d2g distill --precision")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="a LoRA student of this rank (d2g distill --lora-rank; default "
                   "targets)")
    p.add_argument("--light-d", action="store_true",
                   help="the light D (d2g distill --light-d): D's backbone frozen, shared "
                   "with a LoRA G's base")
    p.add_argument("--calibrate", action="store_true",
                   help="instead: measure the calibration and validation cases on this CPU "
                   "(real runs of small models) and print measured vs predicted (minutes)")


def gpu_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in str(text).split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"gpus (--gpus): positive integers separated by commas, got {text!r}")
    return counts


def request_from_args(args, gpus: int = 1):
    from d2g_fast.plan.planner import PlanRequest

    source = args.teacher or args.arch
    if source is None:
        raise ValueError("teacher (--teacher DIR or --arch NAME): say which teacher to plan for")
    if args.resolution is not None and args.teacher is None:
        raise ValueError("resolution (--resolution): only with --teacher (an --arch has its "
                         "native resolution)")
    if args.teacher is not None:
        from d2g_fast.teacher.families import check_teacher_folder

        check_teacher_folder(args.teacher, args.resolution)
    options = {}
    if args.lora_rank is not None:
        options["lora_rank"] = args.lora_rank
    if args.light_d:
        options["light_d"] = True
    return PlanRequest(source, batch_size=args.batch_size, gpus=gpus,
                       gpu_memory_gb=args.gpu_memory, fsdp=args.fsdp,
                       gradient_checkpointing=args.gradient_checkpointing,
                       precision=args.precision, options=options,
                       resolution=args.resolution).check()


def run(args: argparse.Namespace) -> int:
    if args.calibrate:
        return calibrate()
    from d2g_fast.plan.planner import plan, simulate
    from d2g_fast.teacher.collect_cmd import quiet_model_loading

    requests = [request_from_args(args, n) for n in gpu_counts(args.gpus)]
    quiet_model_loading()
    simulated = simulate(requests[0])
    fits = True
    for k, request in enumerate(requests):
        result = plan(request, timeline=simulated[0], state=simulated[1], counts=simulated[2])
        print(("\n" if k else "") + result.format())
        fits = fits and result.fits
    return 0 if fits else 1


def calibrate() -> int:
    from d2g_fast.plan import calibrate as cal
    from d2g_fast.plan.planner import ACTIVATION_FIT

    fitted = [cal.compare(c) for c in cal.CALIBRATION_CASES]
    print("calibration cases (fitted on):")
    print(cal.table(fitted))
    factors = cal.fit_by_checkpointing(cal.CALIBRATION_CASES, fitted)
    print("least-squares activation factors by gradient checkpointing: "
          + ", ".join(f"{k}: {v:.4f}" for k, v in factors.items())
          + f" (in use: {ACTIVATION_FIT})")
    checked = [cal.compare(c) for c in cal.VALIDATION_CASES]
    print("validation cases:")
    print(cal.table(checked))
    worst = max(abs(r["error"]) for r in checked)
    print(f"largest validation error of the total: {100 * worst:.1f} %")
    return 0
