"""``d2g eval``: FID (clean-fid), CLIP score and an optional second Fréchet distance of a local
diffusers pipeline under a pinned protocol, resumable and torchrun-aware.

The real protocol (GigaGAN / DMD2: 30k COCO2014-val captions, 256 px, LANCZOS, clean-fid vs
val2014, CLIP ViT-B/32), with weight files fetched once where there is network access:
  inception-2015-12-05.pt   https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/
                            metrics/inception-2015-12-05.pt
  clip-vit-base-patch32/    CLIPModel + CLIPProcessor of openai/clip-vit-base-patch32 (below)
  captions.txt              the 30k COCO2014-val captions, one per line, in the protocol's order
  val2014/ or val2014.npz   the reference images (or statistics saved by an earlier run)

  torchrun --nproc-per-node 8 -m d2g_fast.cli eval --model sd15/ --steps 50 --guidance 7.5 \\
      --captions captions.txt --reference val2014/ --inception-weights inception-2015-12-05.pt \\
      --clip clip-vit-base-patch32/ --out eval-teacher/
  (--num-images / --resolution / --seed change the protocol's choices; the report then calls it
  "custom", and d2g compare refuses to set it beside coco30k-gigagan numbers.)
  d2g eval --model student/ --steps 1 --guidance 0 ... \\
      --reference eval-teacher/reference-stats.npz --out eval-student/
  d2g compare eval-teacher/ eval-student/

Beside FID and CLIP score, every report holds two measures of the sample distribution in the
same Inception space (d2g_fast.eval.manifold and .diversity):
  precision / recall   Kynkäänniemi et al. 2019's k-NN manifold estimate (--pr-k, default 3) of
                       all generated images against the reference images' features (which
                       reference-stats.npz keeps beside mu and sigma, float32; statistics without
                       them, e.g. clean-fid's own, give no precision / recall)
  diversity            mean Inception distance between images of the same caption under
                       different noise: --diversity-seeds extra images (default 4) of each of the
                       first --diversity-prompts captions (default 200, 0 skips it), generated
                       in their own resumable shards (diversity/ in --out)

Making the weight folders once (on a machine with network access):
  name, folder = "openai/clip-vit-base-patch32", "clip-vit-base-patch32"
  CLIPModel.from_pretrained(name).save_pretrained(folder)
  CLIPProcessor.from_pretrained(name).save_pretrained(folder)
A reference folder is prepared like the generated images (centre crop, resize with the
protocol's filter, uint8) and its statistics are saved as reference-stats.npz in --out; pass that
file as --reference in later runs (the protocol records the sha256 of the statistics, which is
the same for the folder and for the .npz saved from it).

The tests run the same command on tiny stand-ins (a tiny pipeline, a tiny TorchScript network in
place of Inception, a tiny CLIP folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import time

HELP = "evaluate a pipeline: FID, CLIP score (pinned protocol, offline, resumable)"
REFERENCE_STATS = "reference-stats.npz"
STATS = "stats.npz"
DIVERSITY = "diversity"  # the diversity images' own evaluation folder inside --out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from d2g_fast.eval.protocol import DIVERSITY_PROMPTS, DIVERSITY_SEEDS, PR_K, PROTOCOLS

    p.add_argument("--model", required=True, help="local diffusers pipeline folder (a teacher, "
                   "or a one-step student exported by d2g export)")
    p.add_argument("--captions", required=True, help="caption file: one per line, or .json/.jsonl "
                   "(image i uses caption i)")
    p.add_argument("--reference", required=True, help="reference statistics (.npz with mu, "
                   "sigma) or a folder of reference images")
    p.add_argument("--out", required=True, help="evaluation folder (shards, report); rerun the "
                   "same command to resume")
    p.add_argument("--inception-weights", required=True,
                   help="local TorchScript Inception file (clean-fid's inception-2015-12-05.pt)")
    p.add_argument("--clip", default=None, help="local transformers CLIP folder for the CLIP "
                   "score (omit to skip it)")
    p.add_argument("--extra-features", default=None, help="local transformers vision model folder "
                   "(e.g. DINOv2) for a second Fréchet distance (optional)")
    p.add_argument("--protocol", default="coco30k-gigagan", choices=list(PROTOCOLS),
                   help="named protocol; --num-images/--resolution/--seed changes make it 'custom'")
    # --num alone is ambiguous on a torchrun command line (its --numa-binding): use --num-images.
    p.add_argument("--num-images", "--num", dest="num", type=int, default=None,
                   help="images (default: the protocol's); under torchrun spell it --num-images")
    p.add_argument("--resolution", type=int, default=None,
                   help="evaluation resolution after centre crop + resize (default: protocol's)")
    p.add_argument("--seed", type=int, default=None, help="base seed (default: protocol's)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (1 for a student)")
    p.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance scale (0 or 1: none, as for a student)")
    p.add_argument("--gen-resolution", type=int, default=None,
                   help="generation size in pixels (default: the pipeline's native size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the pipeline's dtype")
    p.add_argument("--label", default=None, help="name in reports (default: the model folder)")
    p.add_argument("--pr-k", type=int, default=PR_K, help="neighbourhood size k of precision / "
                   "recall (Kynkäänniemi et al. 2019's k-NN manifold estimate)")
    p.add_argument("--diversity-prompts", type=int, default=None, help=(
        f"captions whose diversity is measured (the first ones; default {DIVERSITY_PROMPTS} or "
        "--num-images when fewer; 0: no diversity)"))
    p.add_argument("--diversity-seeds", type=int, default=DIVERSITY_SEEDS,
                   help="extra images (noises) per diversity caption, >= 2")


def _sample_metric_choices(args, protocol):
    """The protocol with the precision / recall and diversity choices of the flags (checked)."""
    from d2g_fast.eval.protocol import DIVERSITY_PROMPTS

    prompts = args.diversity_prompts
    if prompts is None:
        prompts = min(DIVERSITY_PROMPTS, protocol.num_images)
    if not 0 <= prompts <= protocol.num_images:
        raise ValueError(f"--diversity-prompts: must be in [0, --num-images "
                         f"{protocol.num_images}], got {prompts}")
    if prompts and args.diversity_seeds < 2:
        raise ValueError(f"--diversity-seeds: need >= 2 images per caption to compare, got "
                         f"{args.diversity_seeds}")
    if not 1 <= args.pr_k < protocol.num_images:
        raise ValueError(f"--pr-k: must be in [1, --num-images - 1 = {protocol.num_images - 1}]"
                         f", got {args.pr_k}")
    return dataclasses.replace(protocol, pr_k=args.pr_k, diversity_prompts=prompts,
                               diversity_seeds=args.diversity_seeds if prompts else 0)


def _check_arguments(args) -> None:
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--shard-size", args.shard_size)):
        if value < 1:
            raise ValueError(f"{flag}: must be >= 1, got {value}")
    if args.gen_resolution is not None and args.gen_resolution < 8:
        raise ValueError(f"--gen-resolution: must be >= 8, got {args.gen_resolution}")
    if not os.path.exists(args.reference):
        raise FileNotFoundError(f"--reference: no such file or folder {args.reference!r}")
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model: no such folder {args.model!r}")
    _check_student_guidance(args)


def _check_student_guidance(args) -> None:
    """An exported one-step student (d2g_student.json) evaluated in one step takes only the
    guidance it was trained for: any scale of a guidance-conditioned student's set, the one
    scale of a fixed-guidance student (refused otherwise, naming --guidance)."""
    from d2g_fast.train.export import read_student_info
    from d2g_fast.train.sample_cmd import check_student_guidance

    info = read_student_info(args.model)
    if info is not None and args.steps == 1:
        check_student_guidance(info, args.guidance)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "transformers", "clean-fid", "numpy", "scipy", "pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _reference_file(args, extra) -> dict | None:
    """The reference statistics when --reference is an .npz file (checked before any image is
    generated), else None."""
    from d2g_fast.eval.frechet import load_statistics

    if not os.path.isfile(args.reference):
        return None
    stats = load_statistics(args.reference, "--reference")
    if extra is not None and "extra_mu" not in stats:
        raise ValueError(f"--reference: {args.reference!r} has no extra_mu/extra_sigma for "
                         f"--extra-features; pass the reference image folder instead")
    _check_reference_features(stats, args.pr_k)
    return stats


def _check_reference_features(stats: dict, k: int) -> None:
    """Precision / recall needs more than k reference features (errors name --pr-k)."""
    from d2g_fast.eval.frechet import FEATURES

    if FEATURES in stats and len(stats[FEATURES]) <= k:
        raise ValueError(f"--pr-k: {k} needs more than {k} reference images; the reference "
                         f"holds {len(stats[FEATURES])}")


def _reference_folder(args, protocol, inception, extra, out: str) -> dict:
    """Statistics of a folder of reference images, prepared by the protocol (centre crop,
    resize, uint8) and featurised like the generated ones; saved as reference-stats.npz."""
    import numpy as np

    from d2g_fast.eval.frechet import feature_statistics, save_statistics
    from d2g_fast.eval.generate import load_image_folder

    images = load_image_folder(args.reference, protocol, "--reference")
    chunks = range(0, len(images), args.batch_size)
    feats = np.concatenate([inception(images[i:i + args.batch_size]) for i in chunks])
    stats = dict(zip(("mu", "sigma"), feature_statistics(feats)))
    stats["features"] = feats  # saved in float32, for precision / recall
    if extra is not None:
        extra_feats = np.concatenate([extra(images[i:i + args.batch_size]) for i in chunks])
        stats.update(zip(("extra_mu", "extra_sigma"), feature_statistics(extra_feats)))
    stats["num_images"] = np.array(len(images))
    save_statistics(os.path.join(out, REFERENCE_STATS), **stats)
    _check_reference_features(stats, args.pr_k)
    stats["features"] = stats["features"].astype(np.float32)  # exactly as saved and reloaded
    return stats


def _statistics_sha256(stats: dict, extra) -> str:
    """The reference's identity: sha256 of the statistics used (float64 bytes), the same whether
    they came from an image folder or from the reference-stats.npz saved from it."""
    keys = ("mu", "sigma") + (("extra_mu", "extra_sigma") if extra is not None else ())
    return hashlib.sha256(b"".join(stats[k].astype("<f8").tobytes() for k in keys)).hexdigest()


def _features_sha256(stats: dict) -> str | None:
    """sha256 of the reference features (float32 bytes) used by precision / recall, or None."""
    from d2g_fast.eval.frechet import FEATURES

    if FEATURES not in stats:
        return None
    return hashlib.sha256(stats[FEATURES].astype("<f4").tobytes()).hexdigest()


def _metrics(arrays: dict, ref: dict, out: str) -> dict:
    from d2g_fast.eval.frechet import (feature_statistics, frechet_distance_from_stats,
                                       save_statistics)

    mu, sigma = feature_statistics(arrays["inception"])
    if ref["mu"].shape != mu.shape:
        raise ValueError(f"--reference: statistics of dimension {ref['mu'].shape[0]}, but "
                         f"--inception-weights gives {mu.shape[0]}-D features")
    metrics = {"fid": frechet_distance_from_stats(mu, sigma, ref["mu"], ref["sigma"]),
               "clip_score": None, "fd_extra": None, "num_images": int(len(arrays["index"]))}
    stats = {"mu": mu, "sigma": sigma}
    if "clip_score" in arrays:
        metrics["clip_score"] = float(arrays["clip_score"].mean())
    if "extra" in arrays:
        emu, esigma = feature_statistics(arrays["extra"])
        metrics["fd_extra"] = frechet_distance_from_stats(emu, esigma, ref["extra_mu"],
                                                          ref["extra_sigma"])
        stats.update(extra_mu=emu, extra_sigma=esigma)
    save_statistics(os.path.join(out, STATS), **stats)
    return metrics


def _sample_metrics(arrays: dict, diversity: dict | None, ref: dict, protocol,
                    device: str) -> dict:
    """Precision / recall against the reference features and per-caption diversity, in the
    Inception space (None where not measured)."""
    from d2g_fast.eval.diversity import per_prompt_diversity
    from d2g_fast.eval.frechet import FEATURES
    from d2g_fast.eval.manifold import precision_recall

    metrics = dict.fromkeys(("precision", "recall", "pr_num_real", "pr_num_fake", "diversity",
                             "diversity_std", "diversity_pairs"))
    if FEATURES in ref:
        pr = precision_recall(ref[FEATURES], arrays["inception"], protocol.pr_k, device=device)
        metrics.update(precision=pr["precision"], recall=pr["recall"],
                       pr_num_real=pr["num_real"], pr_num_fake=pr["num_fake"])
    if diversity is not None:
        captions = (diversity["index"] // protocol.diversity_seeds).tolist()
        div = per_prompt_diversity(diversity["inception"], captions)
        metrics.update(diversity=div["mean"], diversity_std=div["std"],
                       diversity_pairs=div["pairs"])
    return metrics


def _diversity_config(out: str, config: dict, protocol) -> tuple[dict | None, str | None]:
    """The diversity set's configuration and hash, checked against out/diversity/ before any
    image is generated (another diversity sampling in the same --out is refused, like any other
    change of what the shards hold). (None, None) when no diversity is measured."""
    from d2g_fast.eval import generate as gen

    if not protocol.diversity_prompts:
        return None, None
    div_config = {**config, "diversity": {"prompts": protocol.diversity_prompts,
                                          "seeds": protocol.diversity_seeds,
                                          "rule": protocol.diversity_rule}}
    return div_config, gen.check_config(os.path.join(out, DIVERSITY), div_config)


def _diversity_shards(out: str, div_config: dict | None, div_hash: str | None, protocol,
                      captions: list[str], args, dist, log, **shard_kwargs) -> list:
    """Generate (or find done) this rank's shards of the diversity set: diversity_seeds images
    of each of the first diversity_prompts captions, in out/diversity/ (same shard layout and
    resume rules as the main set, its own configuration). Returns the shard plan."""
    from d2g_fast.data.store import plan_shards, remove_stale_temporaries
    from d2g_fast.eval import generate as gen

    if div_config is None:
        return []
    seeds = protocol.diversity_seeds
    folder = os.path.join(out, DIVERSITY)
    div_protocol = dataclasses.replace(protocol, seed=protocol.diversity_seed())
    if dist.rank == 0:
        os.makedirs(os.path.join(folder, gen.SHARDS), exist_ok=True)
        remove_stale_temporaries(os.path.join(folder, gen.SHARDS))
        gen.write_config(folder, div_config, div_hash)
    dist.barrier()
    plan = plan_shards(protocol.diversity_prompts * seeds, args.shard_size)
    repeated = [captions[p] for p in range(protocol.diversity_prompts) for _ in range(seeds)]
    made, reused = gen.run_shards(
        folder, plan, rank=dist.rank, world=dist.world, config_hash=div_hash,
        log=lambda text: log(f"diversity {text}"), captions=repeated, protocol=div_protocol,
        steps=args.steps, guidance=args.guidance, batch_size=args.batch_size, **shard_kwargs)
    made, reused = _sum_over_ranks([made, reused], dist.world)
    log(f"diversity shards: {made} made, {reused} already done (of {len(plan)})")
    return plan


def _sum_over_ranks(values: list[int], world: int) -> list[int]:
    import torch

    if world <= 1:
        return values
    t = torch.tensor(values, dtype=torch.int64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def run(args) -> int:
    import torch

    from d2g_fast.data.store import ensure_writable
    from d2g_fast.eval.protocol import load_captions, resolve_protocol
    from d2g_fast.teacher.collect import init_distributed

    # 1. Protocol, captions and cheap argument checks, before any model is loaded.
    t0 = time.perf_counter()
    protocol = resolve_protocol(args.protocol, num_images=args.num, resolution=args.resolution,
                                seed=args.seed)
    protocol = _sample_metric_choices(args, protocol)
    captions = load_captions(args.captions, protocol.num_images)
    _check_arguments(args)
    out = ensure_writable(args.out)
    dist, device = init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from d2g_fast.runtime import signals
    from d2g_fast.runtime.lock import lock_for_job

    lock = None
    try:
        lock = lock_for_job(out, "d2g eval", dist.rank)  # one writer; before any model loads
        with signals.watch("d2g eval"):
            return _evaluate(args, protocol, captions, out, dist, device, t0)
    finally:
        if lock is not None:
            lock.release()
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _evaluate(args, protocol, captions: list[str], out: str, dist, device: str,
              t0: float) -> int:
    """Steps 2-5 of ``run`` in every process (rank 0 alone computes the metrics)."""
    import torch

    from d2g_fast.bench.machine import device_name
    from d2g_fast.data.store import plan_shards, remove_stale_temporaries
    from d2g_fast.eval import generate as gen
    from d2g_fast.eval.features import (INCEPTION_RESIZE, ClipScorer, HFImageFeatures,
                                        InceptionFeatures, folder_sha256)
    from d2g_fast.eval.protocol import captions_sha256
    from d2g_fast.eval.report import FORMAT, VERSION, write_report

    log = print if dist.rank == 0 else (lambda *a, **k: None)

    # 2. Feature extractors and the identities of every file the numbers depend on.
    inception = InceptionFeatures(args.inception_weights, device)
    clip = ClipScorer(args.clip, protocol.clip_prefix, device) if args.clip else None
    extra = HFImageFeatures(args.extra_features, device) if args.extra_features else None
    ref = _reference_file(args, extra)
    protocol = dataclasses.replace(
        protocol, captions_sha256=captions_sha256(captions),
        fid_library=f"clean-fid {_versions()['clean-fid']}", fid_resize=INCEPTION_RESIZE,
        inception_sha256=inception.sha256,
        clip_sha256=clip.sha256 if clip else None,
        extra_features_sha256=extra.sha256 if extra else None)

    # 3. The model and the folder's configuration (what the shards' contents depend on).
    pipe = gen.load_pipeline(args.model, torch.device(device), getattr(torch, args.dtype))
    size = args.gen_resolution or gen.native_resolution(pipe)
    model = {"path": os.path.abspath(args.model), "sha256": folder_sha256(args.model),
             "steps": args.steps, "guidance": args.guidance, "generation_resolution": size,
             "dtype": args.dtype}
    shard_protocol = protocol.shard_dict()  # the reference's identity is filled in at step 5
    config = {"protocol": shard_protocol, "model": model, "batch_size": args.batch_size,
              "shard_size": args.shard_size}
    config_hash = gen.check_config(out, config)
    div_config, div_hash = _diversity_config(out, config, protocol)
    if dist.rank == 0:
        os.makedirs(os.path.join(out, gen.SHARDS), exist_ok=True)
        remove_stale_temporaries(os.path.join(out, gen.SHARDS))  # left by a killed run
        gen.write_config(out, config, config_hash)
    dist.barrier()

    # 4. This rank's missing shards.
    plan = plan_shards(protocol.num_images, args.shard_size)
    made, reused = gen.run_shards(
        out, plan, rank=dist.rank, world=dist.world, config_hash=config_hash, log=log,
        pipe=pipe, captions=captions, protocol=protocol, steps=args.steps,
        guidance=args.guidance, size=size, batch_size=args.batch_size, inception=inception,
        clip=clip, extra=extra)
    div_plan = _diversity_shards(out, div_config, div_hash, protocol, captions, args, dist, log,
                                 pipe=pipe, size=size, inception=inception)
    made, reused = _sum_over_ranks([made, reused], dist.world)
    log(f"shards: {made} made, {reused} already done (of {len(plan)})")
    from d2g_fast.runtime.signals import Preempted, requested_on_any_rank, resume_line

    if requested_on_any_rank():  # the finished shards are kept; the rerun makes the rest
        raise Preempted(resume_line("d2g eval", f"the finished shards are in {out}")
                        if dist.rank == 0 else "")
    dist.barrier()
    if dist.rank != 0:
        return 0

    # 5. Metrics against the reference, and the report.
    if ref is None:
        ref = _reference_folder(args, protocol, inception, extra, out)
    protocol = dataclasses.replace(protocol, reference_sha256=_statistics_sha256(ref, extra),
                                   reference_features_sha256=_features_sha256(ref))
    arrays = gen.read_shards(out, plan, config_hash)
    metrics = _metrics(arrays, ref, out)
    diversity = (gen.read_shards(os.path.join(out, DIVERSITY), div_plan, div_hash)
                 if div_plan else None)
    metrics.update(_sample_metrics(arrays, diversity, ref, protocol, device))
    report = {
        "format": FORMAT, "version": VERSION,
        "label": args.label or os.path.basename(os.path.normpath(args.model)),
        "protocol": protocol.to_dict(), "model": model, "metrics": metrics,
        "reference": {"path": os.path.abspath(args.reference),
                      "kind": "statistics" if os.path.isfile(args.reference) else "images",
                      "num_images": int(ref["num_images"]) if "num_images" in ref else None},
        "run": {"device": device_name(device), "world_size": dist.world,
                "batch_size": args.batch_size, "shard_size": args.shard_size,
                "shards": len(plan), "shards_made": made, "shards_reused": reused,
                "diversity_shards": len(div_plan),
                "seconds": round(time.perf_counter() - t0, 2)},
        "environment": _versions()}
    _, md_path = write_report(out, report)
    clip_text = "" if metrics["clip_score"] is None else f", CLIP score {metrics['clip_score']:.4f}"
    pr_text = ("" if metrics["precision"] is None else
               f", precision {metrics['precision']:.4f}, recall {metrics['recall']:.4f}")
    div_text = "" if metrics["diversity"] is None else f", diversity {metrics['diversity']:.4f}"
    log(f"FID {metrics['fid']:.4f}{clip_text}{pr_text}{div_text} over {metrics['num_images']} "
        f"images; report: {md_path}")
    if metrics["precision"] is None:
        log("precision / recall: not measured (--reference holds statistics without the "
            "reference images' features; pass the image folder, or a reference-stats.npz "
            "written by this version)")
    return 0
