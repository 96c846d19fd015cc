"""``d2g export``: a trained run as a one-step diffusers pipeline folder."""
from __future__ import annotations

import argparse
import os

HELP = "export a distillation run as a diffusers pipeline folder that samples in one step"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder of d2g distill (--out)")
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step to export (default: the newest)")
    p.add_argument("--no-ema", action="store_true",
                   help="export G's raw weights instead of their EMA")
    p.add_argument("--lora", action="store_true",
                   help="a LoRA run (d2g distill --lora-rank): also write OUT/lora/, the "
                        "adapters as a diffusers LoRA file that pipe.load_lora_weights(OUT/lora) "
                        "loads onto the teacher's own pipeline, with the one-step scheduler")


def run(args: argparse.Namespace) -> int:
    from d2g_fast.teacher.collect_cmd import quiet_model_loading
    from d2g_fast.train.export import export_pipeline

    quiet_model_loading()
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    from d2g_fast.data.store import ensure_writable
    from d2g_fast.runtime.diskspace import writing
    from d2g_fast.runtime.lock import FolderLock

    from d2g_fast.train.checkpoint import verify_checkpoint
    from d2g_fast.train.export import find_checkpoint

    path = find_checkpoint(args.run_dir, args.step)
    problems = verify_checkpoint(path)
    if problems:  # never export damaged weights
        raise ValueError(f"run_dir: checkpoint {path} is damaged ({'; '.join(problems[:3])}); "
                         f"nothing was exported. d2g verify {args.run_dir} lists every "
                         f"checkpoint; pass --step N of an intact one")
    fresh = not os.path.isdir(args.out) or not os.listdir(args.out)
    target = ensure_writable(args.out)  # refused before the pipeline is loaded
    with FolderLock(target, "d2g export").acquire(print):
        # A full disk half-way: a folder this export created is removed again, nothing partial.
        with writing(target, cleanup=[target] if fresh else []):
            out = export_pipeline(args.run_dir, args.out, step=args.step,
                                  use_ema=not args.no_ema, lora_file=args.lora)
    from d2g_fast.train.export import read_student_info

    info = read_student_info(out)
    print(f"d2g export: wrote {out}: {info['usage']}")
    if "lora" in info:
        print(f"d2g export: LoRA file in {os.path.join(out, info['lora']['folder'])}: "
              f"{info['lora']['usage']}")
    return 0
