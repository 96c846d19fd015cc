"""``d2g collect``: teacher ODE pairs into a resumable, checksummed store folder."""
from __future__ import annotations

import argparse

HELP = "collect teacher ODE pairs (noise, prompt, latent) into a store folder"
DESCRIPTION = HELP + (". Rerun the same command to resume; start it with torchrun "
                      "--nproc-per-node N to split the shards between N processes.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="local diffusers folder of the teacher")
    p.add_argument("--prompts", default="bundled",
                   help="prompt file: .txt (one per line), .json / .jsonl (COCO captions layout "
                        "included), or 'bundled' for the small bundled list")
    p.add_argument("--num-pairs", type=int, required=True,
                   help="pairs to collect (may grow between runs on the same --out)")
    p.add_argument("--out", required=True, help="store folder (created; resumed when it exists)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--guidance", type=parse_guidance, default=None,
                   help="classifier-free guidance scale (<= 1: no guidance; default 8); FLUX-dev: "
                        "the embedded guidance (the pipeline's guidance_scale, default 3.5). A comma "
                        "list (2,4.5,8) collects over several scales: pair i's scale is drawn "
                        "from the list by (seed, i) and stored with the pair")
    p.add_argument("--guidance-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="collect over guidance scales drawn uniformly from [LOW, HIGH] by "
                        "(seed, i), stored per pair (instead of --guidance)")
    p.add_argument("--negative-prompt", default=None,
                   help="negative prompt (default: the empty prompt; zeros for SDXL; FLUX "
                        "takes none)")
    p.add_argument("--scheduler", default=None,
                   help="UNet teachers: ddim (default), euler, dpm++, unipc, pndm, ... or a "
                        "diffusers class name; SD3/FLUX: their own FlowMatchEulerDiscreteScheduler "
                        "(the only choice)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per network batch")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per shard file")
    p.add_argument("--seed", type=int, default=0,
                   help="pair i's noise and prompt depend only on (seed, i)")
    p.add_argument("--dtype", default="auto",
                   help="float32, float16, bfloat16; auto: float16 on GPUs, float32 on CPUs")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ...; auto: cuda if present")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (None: the pipeline's default size)")
    p.add_argument("--store-embeddings", action="store_true",
                   help="also store the prompt embeddings (and SDXL pooled embeddings)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the UNet forward as a CUDA graph (GPU)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="keep the UNet in contiguous layout on GPUs")
    p.add_argument("--no-fuse-qkv", action="store_true",
                   help="keep separate Q/K/V projections on GPUs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_guidance(text: str):
    """``--guidance``: one scale ("7.5") or a comma list of scales ("2,4.5,8")."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers, got "
                                         f"{text!r}") from None
    return values[0] if len(values) == 1 else values


def quiet_model_loading() -> None:
    """Hide the per-file loading bars and advice of diffusers/transformers on the console."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device (--device): {device!r} requested but no CUDA GPU is visible")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, dtype


def run(args: argparse.Namespace) -> int:
    import torch

    from d2g_fast.data import store
    from d2g_fast.data.prompts import load_prompts
    from d2g_fast.teacher.adapter import Teacher, parse_dtype
    from d2g_fast.teacher.collect import collect, init_distributed
    from d2g_fast.teacher.families import check_teacher_folder

    quiet_model_loading()
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    parse_dtype(dtype)
    from d2g_fast.data.seeding import guidance_set

    prompts = load_prompts(args.prompts)
    if args.guidance is not None and args.guidance_range is not None:
        raise ValueError("guidance_range (--guidance-range): give either --guidance or "
                         "--guidance-range, not both")
    # A folder, resolution or option the teacher cannot take is refused before --out exists.
    family = check_teacher_folder(args.teacher, args.resolution)
    family.check_sample_options(args.negative_prompt, args.scheduler)
    guidance = family.default_guidance if args.guidance is None else args.guidance
    guidance_set(guidance, args.guidance_range)  # bad scales are refused before --out exists
    store.ensure_writable(args.out)  # fail before loading a large teacher
    group, device = init_distributed(device)
    from contextlib import ExitStack

    from d2g_fast.runtime import signals
    from d2g_fast.runtime.lock import lock_for_job

    held = ExitStack()
    try:
        # One writer per store (refused before the teacher is loaded); signals save and stop.
        lock = lock_for_job(args.out, "d2g collect", group.rank)
        if lock is not None:
            held.callback(lock.release)
        held.enter_context(signals.watch("d2g collect"))
        teacher = Teacher.from_pretrained(args.teacher, dtype=dtype, device=device,
                                          resolution=args.resolution)
        gpu = torch.device(device).type == "cuda"
        teacher.optimize(channels_last=gpu and not args.no_channels_last,
                         fuse_qkv=gpu and not args.no_fuse_qkv, compile=args.compile,
                         cuda_graphs=gpu and args.cuda_graphs)
        collect(teacher, prompts, args.out, args.num_pairs, steps=args.steps,
                guidance=guidance, guidance_range=args.guidance_range,
                scheduler=args.scheduler,
                negative_prompt=args.negative_prompt, batch_size=args.batch_size,
                shard_size=args.shard_size, seed=args.seed,
                store_embeddings=args.store_embeddings, prompt_source=args.prompts,
                group=group, progress=not args.no_progress)
    finally:
        held.close()
        if group.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
