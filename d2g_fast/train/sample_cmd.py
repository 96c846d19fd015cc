"""``d2g sample``: PNGs from a one-step student pipeline folder (written by ``d2g export``)."""
from __future__ import annotations

import argparse
import os

HELP = "write PNG samples of a one-step student (a folder written by d2g export)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="pipeline folder written by d2g export")
    p.add_argument("--prompts", required=True,
                   help="a prompt file (.txt one per line, .json, .jsonl) or a prompt text")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--seed", type=int, default=0, help="image i uses the seed SEED + i")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cuda, cpu; auto: cuda when available")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale for a guidance-conditioned student (collected over "
                        "several scales; any scale within its trained set); default: the one in "
                        "d2g_student.json. A fixed-guidance student refuses any other value")


def read_prompts(source: str) -> list[str]:
    from d2g_fast.data.prompts import load_prompts

    return load_prompts(source) if os.path.isfile(source) else [source]


def check_student_guidance(info: dict | None, guidance: float) -> float:
    """``guidance`` (a --guidance flag) if the student takes it: a guidance-conditioned student
    any scale within its trained set (``guidance_set`` in d2g_student.json, from its lowest to
    its highest scale), a fixed-guidance student only its own ``guidance_scale``."""
    info = info or {}
    guidance = float(guidance)
    trained = info.get("guidance_set")
    if trained:
        low, high = trained["range"] if "range" in trained else \
            (min(trained["values"]), max(trained["values"]))
        if not low <= guidance <= high:
            raise ValueError(f"guidance (--guidance): the student was trained for guidance "
                             f"scales in [{low:g}, {high:g}] ({trained}); got {guidance:g}")
        return guidance
    own = info.get("guidance_scale", 1.0)
    if own is None:  # no guidance input at all (FLUX-schnell): any value is ignored
        return guidance
    own = float(own)
    if own == 1.0 and guidance <= 1.0:  # no classifier-free guidance either way
        return guidance
    if guidance != own:
        raise ValueError(f"guidance (--guidance): this student was distilled at one fixed "
                         f"guidance and takes guidance_scale={own:g} only, got {guidance:g}; a "
                         f"student that takes the guidance as input is distilled from pairs "
                         f"collected over several scales (d2g collect --guidance 2,4.5,8)")
    return guidance


def student_call_arguments(info: dict | None, guidance: float | None = None) -> dict:
    """The pipeline arguments d2g_student.json asks for: its guidance_scale (1.0 when absent;
    a FLUX-dev student's is its training guidance; ``guidance`` when given and the student
    takes it, see ``check_student_guidance``) and its training resolution."""
    info = info or {}
    if guidance is not None:
        guidance = check_student_guidance(info, guidance)
    else:
        guidance = info.get("guidance_scale", 1.0)
    call = {"guidance_scale": 1.0 if guidance is None else float(guidance)}
    if info.get("resolution"):
        call.update(height=int(info["resolution"][0]), width=int(info["resolution"][1]))
    return call


def run(args: argparse.Namespace) -> int:
    import torch
    from diffusers import DiffusionPipeline

    from d2g_fast.data.store import atomic_write_json, ensure_writable
    from d2g_fast.teacher.collect_cmd import quiet_model_loading
    from d2g_fast.train.export import read_student_info

    if args.num < 1 or args.batch_size < 1:
        raise ValueError("num (--num) and batch_size (--batch-size): must be >= 1")
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise FileNotFoundError(f"model (--model): {args.model!r} is not a pipeline folder; "
                                f"export a run first with d2g export RUN_DIR --out DIR")
    info = read_student_info(args.model)
    if info is None:
        print(f"d2g sample: note: {args.model} has no d2g_student.json; sampling it in one step "
              f"anyway")
    call = student_call_arguments(info, args.guidance)
    quiet_model_loading()
    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # the per-component loading bar
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in read_prompts(args.prompts) for _ in range(args.num)]
    out = ensure_writable(args.out)
    names = {}
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(args.seed + start + k)
                for k in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=1, generator=gens, **call).images
        for k, image in enumerate(images):
            name = f"{start + k:05d}.png"
            image.save(os.path.join(out, name))
            names[name] = chunk[k]
    atomic_write_json(os.path.join(out, "prompts.json"), names)
    print(f"d2g sample: {len(names)} images in {out}")
    return 0
