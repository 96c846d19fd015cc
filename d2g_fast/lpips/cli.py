"""``d2g lpips``: train your own LatentLPIPS (train-trunk, calibrate, eval).

    d2g lpips train-trunk --data LATENTS_OR_IMAGES --encoder my-vae --output trunk.safetensors
    d2g lpips calibrate --trunk trunk.safetensors --data BAPPS_2AFC_TRAIN --vae VAE --output my-vae.safetensors
    d2g lpips eval --weights my-vae.safetensors --data BAPPS_2AFC_VAL --vae VAE

Multi-process training: ``torchrun --nproc_per_node N -m d2g_fast.cli lpips train-trunk ...``
(gloo on the CPU, nccl with ``--device cuda``). See :mod:`d2g_fast.lpips` for the Python API
and :mod:`d2g_fast.lpips.data` for the data layouts.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "train your own LatentLPIPS: train-trunk, calibrate, eval"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_data_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", required=True, help=what)
    p.add_argument("--vae", default=None,
                   help="local diffusers AutoencoderKL folder (or a pipeline folder with vae/) that "
                        "encodes images: latent = (encode(img*2-1).latent_dist.mean - shift_factor) "
                        "* scaling_factor")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="resize (shorter side) and centre-crop images to this size before encoding")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lpips_command", metavar="STEP")
    sub.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = sub.add_parser("train-trunk", formatter_class=fmt,
                       help="train the latent VGG16-BN trunk as a classifier on latents")
    _add_data_arguments(t, "a latent file (.safetensors/.pt with 'latents' and 'labels'), a folder "
                           "ROOT/<class>/*.npy of latents, or an image folder ROOT/<class>/*.png "
                           "(needs --vae; latents cached in --cache)")
    t.add_argument("--output", required=True, help="trunk file to write (.safetensors)")
    t.add_argument("--encoder", required=True, help="name of the latent space, e.g. my-vae")
    t.add_argument("--shift", type=float, default=None,
                   help="VAE latent shift recorded for normalize=True (default: --vae's "
                        "shift_factor, or the official value of a known --encoder)")
    t.add_argument("--scale", type=float, default=None, help="VAE latent scale (see --shift)")
    t.add_argument("--cache", default=None,
                   help="latent cache of an image folder (default: <output>.latents.safetensors)")
    t.add_argument("--width-div", type=int, choices=(1, 2, 4, 8), default=1,
                   help="divide every conv width (1: the official trunk, ~15 M parameters)")
    t.add_argument("--steps", type=_positive_int, default=1000)
    t.add_argument("--batch-size", type=_positive_int, default=64, help="global batch size")
    t.add_argument("--lr", type=_positive_float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    t.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast compute, fp32 weights")
    t.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="share of the samples held out for the top-1 accuracy")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    t.add_argument("--checkpoint", default=None,
                   help="checkpoint file, resumed when it exists (default: <output>.ckpt)")
    t.add_argument("--checkpoint-every", type=int, default=100, help="steps (0: only at the end)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("calibrate", formatter_class=fmt,
                       help="fit the non-negative linear heads on 2AFC triplets")
    c.add_argument("--trunk", required=True, help="trunk file from 'd2g lpips train-trunk'")
    _add_data_arguments(c, "a BAPPS 2AFC folder ({ref,p0,p1}/*.png, judge/*.npy; needs --vae) or a "
                           "triplet file (.safetensors/.pt with ref, p0, p1, judge)")
    c.add_argument("--val-data", default=None,
                   help="held-out 2AFC data (same kinds as --data); default: --val-fraction of --data")
    c.add_argument("--val-fraction", type=_fraction, default=0.1)
    c.add_argument("--output", required=True, help="module file to write (trunk + heads, .safetensors)")
    c.add_argument("--epochs", type=_positive_int, default=10,
                   help="as LPIPS: constant lr for the first half, linear decay after")
    c.add_argument("--lr", type=_positive_float, default=1e-4, help="Adam, beta1 0.5 (LPIPS)")
    c.add_argument("--batch-size", type=_positive_int, default=50)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--cache-dir", default=None,
                   help="where encoded BAPPS latents are cached (default: the --output folder)")

    e = sub.add_parser("eval", formatter_class=fmt,
                       help="2AFC score of any weights ELatentLPIPS loads")
    e.add_argument("--weights", default=None,
                   help="our module file (.safetensors), or an official *_tuned.pth with --encoder; "
                        "default: --encoder's files in D2G_ELATENTLPIPS_DIR")
    e.add_argument("--encoder", default=None, help="encoder name (official files)")
    _add_data_arguments(e, "a BAPPS 2AFC folder (needs --vae) or a triplet file")
    e.add_argument("--batch-size", type=_positive_int, default=64)
    e.add_argument("--cache-dir", default=None, help="cache encoded BAPPS latents here")


# ---------------------------------------------------------------------- steps
def _training_data(args):
    from d2g_fast.lpips import data  # noqa: PLC0415

    path = Path(args.data)
    if path.is_file():
        return data.load_latent_file(path), None
    if not path.is_dir():
        raise FileNotFoundError(f"--data: not found: {str(path)!r}")
    if not data.is_image_folder(path):
        return data.load_latent_folder(path), None
    if args.vae is None:
        raise ValueError(f"--data: {str(path)!r} holds images; pass --vae (a local diffusers "
                         "AutoencoderKL folder) to encode them")
    encoder = data.VaeEncoder(args.vae, args.device)
    cache = args.cache or str(Path(args.output).with_name(Path(args.output).name + ".latents.safetensors"))
    latents, labels, classes = data.load_image_folder(path, encoder, cache, args.image_size)
    print(f"{len(labels)} images of {len(classes)} classes -> latents {tuple(latents.shape[1:])} "
          f"(cache {cache})")
    return (latents, labels), encoder.normalization


def _normalization(args, from_vae):
    from d2g_fast.nn.elatentlpips import ENCODER_NORMALIZATION  # noqa: PLC0415

    if (args.shift is None) != (args.scale is None):
        raise ValueError("--shift and --scale go together")
    if args.shift is not None:
        if not args.scale > 0:
            raise ValueError(f"--scale must be > 0, got {args.scale}")
        return (args.shift, args.scale)
    if from_vae is not None:
        return from_vae
    if args.vae is not None:
        from d2g_fast.lpips.data import VaeEncoder  # noqa: PLC0415
        return VaeEncoder(args.vae, "cpu").normalization
    if args.encoder in ENCODER_NORMALIZATION:
        return ENCODER_NORMALIZATION[args.encoder]
    raise ValueError(f"--encoder {args.encoder!r} is not an official one: pass --shift/--scale "
                     "(the VAE's shift_factor and scaling_factor) or --vae")


def _run_train_trunk(args) -> int:
    """One writer per output folder (lock), refused before loading anything when --output's
    folder is read-only; SIGTERM/SIGUSR1 save a checkpoint and exit with the requeue status."""
    from d2g_fast.data.store import ensure_writable  # noqa: PLC0415
    from d2g_fast.runtime import signals  # noqa: PLC0415

    folder = os.path.dirname(os.path.abspath(args.output))
    try:
        ensure_writable(folder)  # refused before any data or model is loaded
    except PermissionError as exc:
        raise PermissionError(str(exc).replace("out (--out)", "--output")) from None
    from d2g_fast.runtime.lock import lock_for_job  # noqa: PLC0415

    group = _join_torchrun(args.device)
    lock = None
    try:
        # Rank 0 takes the folder's lock for the job; every rank is refused when it is held.
        lock = lock_for_job(folder, "d2g lpips train-trunk", int(os.environ.get("RANK", "0")),
                            log=print)
        with signals.watch("d2g lpips train-trunk"):
            return _train_trunk_locked(args)
    finally:
        if lock is not None:
            lock.release()
        if group:
            import torch.distributed as dist  # noqa: PLC0415
            dist.destroy_process_group()


def _join_torchrun(device: str) -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group now, so that the ranks share the
    lock's outcome (train_trunk then uses this group). Returns whether this call created it."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def _train_trunk_locked(args) -> int:
    from d2g_fast.lpips.trunk import train_trunk, trunk_info  # noqa: PLC0415

    (latents, labels), from_vae = _training_data(args)
    out = train_trunk(
        latents, labels, args.output, encoder=args.encoder,
        normalization=_normalization(args, from_vae), checkpoint=args.checkpoint,
        device=args.device, progress=not args.no_progress, width_div=args.width_div,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        optimizer=args.optimizer, precision=args.precision, val_fraction=args.val_fraction,
        seed=args.seed, flip=not args.no_flip, checkpoint_every=max(0, args.checkpoint_every))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        print(f"wrote {out} | held-out top-1: {float(trunk_info(out)['top1']):.2f} %")
    return 0


def _run_calibrate(args) -> int:
    from d2g_fast.lpips import data  # noqa: PLC0415
    from d2g_fast.lpips.calibrate import calibrate_heads  # noqa: PLC0415
    from d2g_fast.lpips.trunk import trunk_info  # noqa: PLC0415

    if not Path(args.trunk).is_file():
        raise FileNotFoundError(f"--trunk: file not found: {args.trunk!r}")
    cache_dir = args.cache_dir or str(Path(args.output).resolve().parent)
    train = data.load_triplets(args.data, args.vae, cache_dir, args.image_size, args.device, "--data")
    val = (data.load_triplets(args.val_data, args.vae, cache_dir, args.image_size, args.device,
                              "--val-data") if args.val_data else None)
    out = calibrate_heads(args.trunk, train, args.output, val_triplets=val,
                          val_fraction=args.val_fraction, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, seed=args.seed, device=args.device)
    meta = trunk_info(out)
    scores = " | ".join(f"2AFC {k[len('two_afc_'):]}: {100 * float(meta[k]):.2f} %"
                        for k in ("two_afc_train", "two_afc_val") if k in meta)
    print(f"wrote {out} | {scores}")
    return 0


def _load_weights(args):
    from d2g_fast.nn.elatentlpips import ELatentLPIPS  # noqa: PLC0415

    common = dict(augment=None, verbose=False)
    if args.weights is not None and Path(args.weights).suffix == ".safetensors":
        if not Path(args.weights).is_file():
            raise FileNotFoundError(f"--weights: file not found: {args.weights!r}")
        return ELatentLPIPS.from_safetensors(args.weights, **common)
    if args.encoder is None:
        raise ValueError("--encoder is needed with an official --weights file or without --weights")
    if args.weights is not None and not Path(args.weights).is_file():
        raise FileNotFoundError(f"--weights: file not found: {args.weights!r}")
    return ELatentLPIPS(encoder=args.encoder, heads_path=args.weights, **common)


def _run_eval(args) -> int:
    from d2g_fast.lpips import data  # noqa: PLC0415
    from d2g_fast.lpips.calibrate import two_afc_of_module  # noqa: PLC0415

    model = _load_weights(args).to(args.device).eval()
    triplets = data.load_triplets(args.data, args.vae, args.cache_dir, args.image_size, args.device)
    if triplets.ref.shape[1] != model.latent_channels:
        raise ValueError(f"--data: latents have {triplets.ref.shape[1]} channels, the weights take "
                         f"{model.latent_channels}")
    score = two_afc_of_module(model, triplets, args.batch_size, args.device)
    print(f"2AFC: {100 * score:.2f} % on {len(triplets)} triplets (encoder {model.encoder!r})")
    return 0


STEPS = {"train-trunk": _run_train_trunk, "calibrate": _run_calibrate, "eval": _run_eval}


def run(args: argparse.Namespace) -> int:
    return STEPS[args.lpips_command](args)
