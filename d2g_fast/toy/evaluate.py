"""Evaluation of one-step students against the toy teacher, on the SAME held-out prompts and
noise for every sampler.

Samplers: the teacher with ``steps`` guided DDIM steps ("teacher_multistep"), the teacher with
1, 2 and 4 guided DDIM steps, and each student (a diffusers pipeline folder run with one step and
guidance 1, as ``d2g export`` writes it, or a callable ``G(noise, prompts) -> latents``).

Metrics per sampler (keys of metrics.json):
  fd              Fréchet distance between the samples' and real toy images' features in the
                  evaluation classifier's penultimate layer (d2g_fast.eval.frechet_distance);
                  lower is better, real-vs-real of the same size is the floor ("real_floor_fd").
  accuracy        fraction of samples whose four attributes, as the evaluation classifier reads
                  them, all match the prompt (in [0, 1]); "attribute_accuracy" per attribute.
  e_latentlpips   mean distance (the toy E-LatentLPIPS weights, augmentation off so the number is
                  deterministic) from each sample's latent to the multi-step teacher's latent for
                  the same prompt and noise; 0 for the multi-step teacher itself.
  images_per_s    samples per second including VAE decoding, on this machine, batch ``batch``.
  nfe             UNet evaluations per image (a guided step costs two).
  diversity_features       per-prompt diversity: mean distance, in the classifier's feature
                  space, between samples of the same prompt under different noise (the held-out
                  set holds n / 72 samples of each caption), averaged over prompts; 0: the
                  sampler ignores its noise. "real_diversity_features": the same for fresh real
                  images of the held-out captions (the target).
  diversity_e_latentlpips  the same with E-LatentLPIPS (augmentation off) between the latents
                  ("real_diversity_e_latentlpips": between the real images' VAE latents).
  precision, recall        Kynkäänniemi et al. 2019's k-NN manifold estimate (k = PR_K = 3) in
                  the classifier's feature space against the first n real features (equal set
                  sizes): the share of samples inside the real manifold, and of real images
                  inside the samples' manifold. "real_floor_precision" / "real_floor_recall":
                  a second real set of n images scored the same way (what sampling alone costs).
  (The diversity values are None when n < 144: no caption has two samples.)

For one sampler's samples (e.g. per row of ``d2g toy ablate``)::

    distribution_metrics(clf, images (N, 3, 32, 32), latents (N, 4, 8, 8), prompts (N),
                         real_feats (M >= N, D), *, lpips=None, k=PR_K)
        -> {"diversity_features", "diversity_e_latentlpips", "precision", "recall"}
    real_distribution_metrics(clf, prompts, real_feats, *, k=PR_K, floor_feats=None, vae=None,
                              lpips=None)
        -> {"real_diversity_features", "real_diversity_e_latentlpips", "real_floor_precision",
            "real_floor_recall"}
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, Union

import torch

from d2g_fast.toy import data, models

HELDOUT_SEED = 20_240_917
REAL_SEED = 31_415
TEACHER_FEW_STEPS = (1, 2, 4)
PR_K = 3  # neighbourhood size of precision / recall (Kynkäänniemi et al. 2019's default)
REAL_DIVERSITY_SEED = REAL_SEED + 2  # fresh real images of the held-out captions
GRID_COLUMNS = 8
Student = Union[str, os.PathLike, Callable[[torch.Tensor, list], torch.Tensor]]


def heldout(n: int = 144, seed: int = HELDOUT_SEED) -> tuple[list[str], torch.Tensor]:
    """Held-out prompts (cycling through all 72 captions) and initial noise (n, 4, 8, 8).

    The captions are the world's captions (the world is closed); the noise, and the real images
    the samples are compared with, are drawn from seeds no training stage uses."""
    if n < 1:
        raise ValueError(f"heldout: n must be >= 1, got {n}")
    prompts = data.captions(data.heldout_labels(n))
    noise = torch.randn(n, models.LATENT_CHANNELS, models.LATENT_SIZE, models.LATENT_SIZE,
                        generator=torch.Generator().manual_seed(seed))
    return prompts, noise


def quiet_diffusers() -> None:
    """Silence messages that are expected here and read like faults to a newcomer (no safety
    checker on purpose, optional accelerate missing, progress bars of inner loops)."""
    import logging

    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*accelerate.*")
    warnings.filterwarnings("ignore", message=".*safety checker.*")


def load_pipeline(folder: str | os.PathLike):
    """A StableDiffusionPipeline from a local folder (offline, float32, CPU, quiet)."""
    from diffusers import StableDiffusionPipeline

    quiet_diffusers()
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"pipeline folder not found: {str(folder)!r}")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                   requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_classifier(path: str | os.PathLike) -> models.AttributeClassifier:
    """The evaluation classifier from its safetensors file (eval mode, frozen)."""
    from safetensors.torch import load_file

    clf = models.AttributeClassifier()
    clf.load_state_dict(load_file(str(path)))
    return clf.eval().requires_grad_(False)


def use_ddim(pipe):
    """Switch ``pipe`` to DDIM with its scheduler's own configuration (the teacher's sampler)."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


@torch.no_grad()
def pipeline_latents(pipe, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float,
                     batch: int = 72) -> torch.Tensor:
    """Model-space latents (N, 4, 8, 8) of ``pipe`` (its own scheduler) run for ``steps`` steps
    at ``guidance`` from ``noise`` (N, 4, 8, 8)."""
    out = []
    for i in range(0, len(prompts), batch):
        out.append(pipe(prompt=prompts[i:i + batch], latents=noise[i:i + batch].clone(),
                        num_inference_steps=steps, guidance_scale=guidance,
                        output_type="latent", return_dict=True).images)
    return torch.cat(out)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] from model-space latents."""
    return torch.cat([vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
                      for z in latents.split(batch)])


class _Features(torch.nn.Module):
    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return self.clf.features(x)


def real_features(clf, n: int, seed: int = REAL_SEED):
    """Classifier features (n, D) float64 numpy of n fresh real images."""
    from d2g_fast.eval import extract_features

    images, _, _ = data.sample(n, seed)
    return extract_features(images, _Features(clf), batch_size=256)


def image_metrics(clf, images: torch.Tensor, prompts: list[str], real_feats) -> dict:
    """fd, accuracy and per-attribute accuracy of images (N, 3, 32, 32) for their prompts."""
    from d2g_fast.eval import extract_features, frechet_distance

    labels = torch.stack([data.parse_caption(p) for p in prompts])
    with torch.no_grad():
        pred = torch.cat([clf.predict(x) for x in images.split(256)])
    hits = pred == labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fd = frechet_distance(extract_features(images, _Features(clf), batch_size=256), real_feats)
    return {"fd": float(fd), "accuracy": hits.all(1).float().mean().item(),
            "attribute_accuracy": {name: hits[:, k].float().mean().item()
                                   for k, name in enumerate(data.ATTRIBUTES)}}


def _classifier_features(clf, images: torch.Tensor):
    from d2g_fast.eval import extract_features

    return extract_features(images, _Features(clf), batch_size=256)


def _diversity_or_none(samples, prompts: list[str], distance=None) -> float | None:
    """per_prompt_diversity's mean, or None when no prompt has two samples (n < 144)."""
    from d2g_fast.eval import per_prompt_diversity

    if len(set(prompts)) == len(prompts):
        return None
    return per_prompt_diversity(samples, prompts, distance=distance)["mean"]


def _precision_recall(real_feats, feats, k: int) -> dict:
    """Precision / recall against as many real features as samples (equal set sizes); None
    for sets of k samples or fewer (no k-th neighbour)."""
    from d2g_fast.eval import precision_recall

    if len(feats) <= k:
        return {"precision": None, "recall": None}
    if len(real_feats) < len(feats):
        raise ValueError(f"real_feats: {len(real_feats)} real features for {len(feats)} "
                         f"samples; precision / recall compares sets of equal size")
    pr = precision_recall(real_feats[:len(feats)], feats, k)
    return {"precision": pr["precision"], "recall": pr["recall"]}


def distribution_metrics(clf, images: torch.Tensor, latents: torch.Tensor, prompts: list[str],
                         real_feats, *, lpips=None, k: int = PR_K) -> dict:
    """Diversity and precision / recall of one sampler's samples (see the module docstring).

    Args:
        clf: the evaluation classifier (its penultimate layer is the feature space of FD).
        images: (N, 3, 32, 32) in [-1, 1]; latents: (N, 4, 8, 8) the samples' model-space
            latents (what E-LatentLPIPS compares); prompts: N captions (equal captions with
            different noise are the pairs of the diversity).
        real_feats: (M, D) features of real images (``real_features``), M >= N; the first N
            are the real set of precision / recall.
        lpips: the toy E-LatentLPIPS (``load_elatentlpips``); None leaves
            "diversity_e_latentlpips" None.
        k: neighbourhood size of precision / recall.
    Returns:
        {"diversity_features": float | None, "diversity_e_latentlpips": float | None,
         "precision": float | None, "recall": float | None}; the diversities are None when no
        prompt has two samples, precision / recall when N <= k.
    """
    if not len(images) == len(latents) == len(prompts):
        raise ValueError(f"distribution_metrics: {len(images)} images, {len(latents)} latents "
                         f"and {len(prompts)} prompts (one of each per sample)")
    feats = _classifier_features(clf, images)
    out = {"diversity_features": _diversity_or_none(feats, prompts),
           "diversity_e_latentlpips": None}
    if lpips is not None:
        def lpips_distance(a, b):
            return lpips(a.float(), b.float(), ensembling=False, add_l1_loss=False)

        out["diversity_e_latentlpips"] = _diversity_or_none(latents, prompts, lpips_distance)
    out.update(_precision_recall(real_feats, feats, k))
    return out


def real_distribution_metrics(clf, prompts: list[str], real_feats, *, k: int = PR_K,
                              floor_feats=None, vae=None, lpips=None) -> dict:
    """What real images score on the same measures: the diversity of fresh real images of
    ``prompts`` (the target of a sampler's diversity; in E-LatentLPIPS between their VAE
    latents when ``vae`` and ``lpips`` are given), and the precision / recall of a second real
    set of len(prompts) images (``floor_feats``, default ``real_features(clf, n,
    REAL_SEED + 1)``) against ``real_feats``: the values sampling alone gives.

    Returns:
        {"real_diversity_features": float | None, "real_diversity_e_latentlpips": float | None,
         "real_floor_precision": float | None, "real_floor_recall": float | None}
    """
    n = len(prompts)
    labels = torch.stack([data.parse_caption(p) for p in prompts])
    images = data.draw(labels, torch.Generator().manual_seed(REAL_DIVERSITY_SEED))
    if floor_feats is None:
        floor_feats = real_features(clf, n, REAL_SEED + 1)
    floor = _precision_recall(real_feats, floor_feats, k)
    latent_diversity = None
    if vae is not None and lpips is not None:
        with torch.no_grad():  # model-space latents: the VAE posterior's mean, scaled
            latents = torch.cat([vae.encode(x).latent_dist.mean for x in images.split(256)])
        latent_diversity = _diversity_or_none(
            latents * vae.config.scaling_factor, prompts,
            lambda a, b: lpips(a.float(), b.float(), ensembling=False, add_l1_loss=False))
    return {"real_diversity_features": _diversity_or_none(_classifier_features(clf, images),
                                                          prompts),
            "real_diversity_e_latentlpips": latent_diversity,
            "real_floor_precision": floor["precision"], "real_floor_recall": floor["recall"]}


def teacher_check(folder: str | os.PathLike, n: int = 144, steps: int = 25,
                  guidance: float = 4.0, progress: bool = False) -> dict:
    """The quality bar of a trained toy world (used by ``d2g toy train``): accuracy and FD of
    the teacher at ``steps`` guided DDIM steps and at 1 step, on ``n`` held-out prompts/noise."""
    folder = Path(folder)
    pipe = use_ddim(load_pipeline(folder / "teacher"))
    clf = load_classifier(folder / "classifier.safetensors")
    prompts, noise = heldout(n)
    real = real_features(clf, max(n, 512))
    out = {}
    for name, k in ((f"teacher_{steps}step", steps), ("teacher_1step", 1)):
        lat = pipeline_latents(pipe, prompts, noise, k, guidance)
        m = image_metrics(clf, decode(pipe.vae, lat), prompts, real)
        out[f"{name}_accuracy"] = m["accuracy"]
        out[f"{name}_fd"] = m["fd"]
        for attr, acc in m["attribute_accuracy"].items():
            out[f"{name}_{attr}_accuracy"] = acc
    return out


# ---------------------------------------------------------------------------------- evaluate()
def _check_student(name: str, student: Student) -> None:
    if callable(student):
        return
    if not isinstance(student, (str, os.PathLike)):
        raise ValueError(f"evaluate: student {name!r} must be a pipeline folder or a callable "
                         f"G(noise, prompts) -> latents, got {type(student).__name__}")
    if not os.path.isfile(os.path.join(student, "model_index.json")):
        raise FileNotFoundError(f"evaluate: student {name!r}: no diffusers pipeline folder at "
                                f"{str(student)!r} (model_index.json missing)")


def _generator_of(student: Student):
    """A function (prompts, noise) -> latents for a student given as a folder or a callable."""
    if callable(student):
        return lambda prompts, noise: student(noise.clone(), list(prompts))
    pipe = load_pipeline(student)
    return lambda prompts, noise: pipeline_latents(pipe, prompts, noise, 1, 1.0)


def _timed(fn, vae, prompts, noise):
    """(latents, images, images per second) of one generator on the held-out set."""
    start = time.perf_counter()
    with torch.no_grad():
        latents = fn(prompts, noise).float()
        images = decode(vae, latents)
    elapsed = time.perf_counter() - start
    if latents.shape != noise.shape:
        raise ValueError(f"evaluate: a generator returned latents of shape {tuple(latents.shape)}"
                         f" for noise of shape {tuple(noise.shape)}")
    return latents, images, len(prompts) / elapsed


def load_elatentlpips(path: str | os.PathLike):
    """The toy E-LatentLPIPS module (eval mode) from its safetensors file."""
    from d2g_fast.nn.elatentlpips import ELatentLPIPS

    return ELatentLPIPS.from_safetensors(str(path), augment="bg").eval()


@torch.no_grad()
def mean_latent_distance(loss_fn, a: torch.Tensor, b: torch.Tensor, batch: int = 256) -> float:
    """Mean perceptual distance between latent batches (deterministic: no augmentation, no L1
    term)."""
    total = sum(loss_fn(x, y, ensembling=False, add_l1_loss=False).sum().item()
                for x, y in zip(a.split(batch), b.split(batch)))
    return total / len(a)


def save_grid(images: torch.Tensor, path: str | os.PathLike, columns: int = GRID_COLUMNS,
              scale: int = 3) -> None:
    """Write images (N, 3, H, W) in [-1, 1] as one PNG grid (nearest-neighbour upscaled)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.ones(3, rows * (h + 2), columns * (w + 2))
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = \
            (img.clamp(-1, 1) + 1) / 2
    array = (canvas.permute(1, 2, 0) * 255).round().byte().numpy()
    picture = Image.fromarray(array)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def save_chart(metrics: Mapping[str, dict], path: str | os.PathLike) -> None:
    """Fréchet distance against network evaluations per image (log x), one point per sampler."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    teacher = sorted((m["nfe"], m["fd"]) for k, m in metrics.items() if k.startswith("teacher_"))
    ax.plot([x for x, _ in teacher], [y for _, y in teacher], "o-", color="tab:blue",
            label="teacher, DDIM + guidance")
    for name, m in metrics.items():
        if not name.startswith("teacher_"):
            ax.plot([m["nfe"]], [m["fd"]], "*", markersize=14, label=name)
    if "real_floor_fd" in next(iter(metrics.values()), {}):
        ax.axhline(next(iter(metrics.values()))["real_floor_fd"], color="gray", linestyle=":",
                   label="real vs real (floor)")
    ax.set_xscale("log")
    ax.set_xlabel("UNet evaluations per image (a guided step = 2)")
    ax.set_ylabel("Fréchet distance (classifier features)")
    ax.set_title("toy world: quality against sampling cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(students: Mapping[str, Student] | None = None, out: str | os.PathLike = "toy_eval",
             *, toy_dir: str | os.PathLike | None = None, n: int = 144,
             seed: int = HELDOUT_SEED, teacher_steps: int = 25, guidance: float = 4.0,
             few_steps: tuple[int, ...] = TEACHER_FEW_STEPS, grid: int = 32,
             progress: bool = True) -> dict:
    """Evaluate the toy teacher and one-step students on the same held-out prompts and noise.

    Args:
        students: name -> a diffusers pipeline folder (run with 1 step, guidance 1) or a
            callable ``G(noise (N, 4, 8, 8), prompts list[str]) -> latents (N, 4, 8, 8)`` in the
            teacher's model space. E.g. {"student_1step": "runs/demo/student",
            "regression_only_1step": G}. None: the teacher alone.
        out: folder for metrics.json, grid_<name>.png, grid_real.png, fd_vs_nfe.png, report.md.
        toy_dir: the toy world (teacher/, classifier, E-LatentLPIPS); default the shipped one.
        n: held-out samples (prompts cycle through all 72 captions); grid: how many go in grids.
        seed: held-out noise seed; teacher_steps, guidance: the multi-step teacher;
        few_steps: the teacher's few-step DDIM samplers (same guidance).
        progress: one tqdm bar over the samplers.

    Returns:
        metrics: {sampler: {"fd", "accuracy", "attribute_accuracy", "e_latentlpips",
        "images_per_s", "nfe", "steps", "real_floor_fd", "diversity_features",
        "diversity_e_latentlpips", "precision", "recall", "real_diversity_features",
        "real_diversity_e_latentlpips", "real_floor_precision", "real_floor_recall"}}, also
        written to out/metrics.json.
    """
    from tqdm.auto import tqdm

    from d2g_fast.eval import frechet_distance
    from d2g_fast.toy import shipped_dir

    toy_dir = Path(toy_dir) if toy_dir is not None else shipped_dir()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    students = dict(students or {})
    for name, student in students.items():
        _check_student(name, student)
    pipe = use_ddim(load_pipeline(toy_dir / "teacher"))
    clf = load_classifier(toy_dir / "classifier.safetensors")
    lpips = load_elatentlpips(toy_dir / "elatentlpips.safetensors")
    prompts, noise = heldout(n, seed)
    real_feats = real_features(clf, max(n, 512))
    floor_feats = real_features(clf, n, REAL_SEED + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        floor = float(frechet_distance(floor_feats, real_feats))
    real_side = real_distribution_metrics(clf, prompts, real_feats, floor_feats=floor_feats,
                                          vae=pipe.vae, lpips=lpips)

    samplers = {"teacher_multistep": (teacher_steps, 2 * teacher_steps,
                                      lambda p, z: pipeline_latents(pipe, p, z, teacher_steps,
                                                                    guidance))}
    for k in few_steps:
        samplers[f"teacher_{k}step"] = (k, 2 * k, lambda p, z, k=k: pipeline_latents(
            pipe, p, z, k, guidance))
    for name, student in students.items():
        samplers[name] = (1, 1, _generator_of(student))

    metrics, reference = {}, None
    real_images, _, _ = data.sample(grid, REAL_SEED)
    save_grid(real_images, out / "grid_real.png")
    for name, (steps, nfe, fn) in tqdm(samplers.items(), desc="toy evaluation",
                                       disable=not progress, dynamic_ncols=True):
        latents, images, speed = _timed(fn, pipe.vae, prompts, noise)
        if reference is None:
            reference = latents  # the multi-step teacher comes first
        m = image_metrics(clf, images, prompts, real_feats)
        m.update(e_latentlpips=mean_latent_distance(lpips, latents, reference),
                 images_per_s=speed, nfe=nfe, steps=steps, real_floor_fd=floor)
        m.update(distribution_metrics(clf, images, latents, prompts, real_feats, lpips=lpips))
        m.update(real_side)
        metrics[name] = m
        save_grid(images[:grid], out / f"grid_{name}.png")
    with open(out / "metrics.json", "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    save_chart(metrics, out / "fd_vs_nfe.png")
    (out / "report.md").write_text(
        report_markdown(metrics, prompts[:grid], n=n, teacher_steps=teacher_steps,
                        guidance=guidance), encoding="utf-8")
    return metrics


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def distribution_table(metrics: Mapping[str, dict]) -> list[str]:
    """Markdown lines: diversity and precision / recall per sampler, and real images' values."""
    lines = ["Diversity and precision / recall (classifier features unless named):", "",
             "| sampler | diversity | diversity (E-LatentLPIPS) | precision | recall |",
             "|---|---:|---:|---:|---:|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | {_number(m.get('diversity_features'))} | "
                     f"{_number(m.get('diversity_e_latentlpips'), 4)} | "
                     f"{_number(m.get('precision'))} | {_number(m.get('recall'))} |")
    first = next(iter(metrics.values()), {})
    if "real_floor_precision" in first:
        lines.append(f"| real images | {_number(first.get('real_diversity_features'))} | "
                     f"{_number(first.get('real_diversity_e_latentlpips'), 4)} | "
                     f"{_number(first['real_floor_precision'])} | "
                     f"{_number(first['real_floor_recall'])} |")
    return lines


def report_markdown(metrics: Mapping[str, dict], grid_prompts: list[str], *, n: int,
                    teacher_steps: int, guidance: float) -> str:
    """report.md: the table, what each number means, the grids, the real-SD equivalent."""
    lines = [
        "# Toy evaluation: one-step student vs the teacher's own sampling",
        "",
        "**The teacher is a toy**: a 1 M-parameter latent diffusion model trained in minutes on a "
        "CPU on procedurally drawn coloured shapes (32x32 pixels, 4x8x8 latents, 72 captions "
        "such as \"a red circle in the top left on a black background\"). It shows the method "
        "working in small; it says nothing about Stable Diffusion's image quality.",
        "",
        f"All samplers use the same {n} held-out prompts (every caption equally often) and the "
        f"same initial noise. Teacher: DDIM with classifier-free guidance {guidance:g}; the "
        f"multi-step teacher uses {teacher_steps} steps.",
        "",
        "| sampler | steps | UNet evals / image | FD (lower is better) | accuracy | "
        "E-LatentLPIPS to multi-step teacher | images/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m['steps']} | {m['nfe']} | {m['fd']:.2f} | "
                     f"{100 * m['accuracy']:.1f} % | {m['e_latentlpips']:.4f} | "
                     f"{m['images_per_s']:.1f} |")
    floor = next(iter(metrics.values()))["real_floor_fd"]
    lines += [
        "",
        "Per-attribute accuracy:",
        "",
        "| sampler | " + " | ".join(data.ATTRIBUTES) + " |",
        "|---|" + "---:|" * len(data.ATTRIBUTES),
    ]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * m['attribute_accuracy'][a]:.1f} %" for a in data.ATTRIBUTES) + " |")
    lines += ["", *distribution_table(metrics)]
    lines += [
        "",
        "## What the numbers mean",
        "",
        "- **FD**: Fréchet distance between the samples and real toy images in the penultimate "
        "layer (64 features) of a small attribute classifier trained on real images only "
        f"(the toy stand-in for FID). Two sets of {n} real images are {floor:.2f} apart: the "
        "floor at this sample size.",
        "- **accuracy**: fraction of samples in which the classifier reads all four attributes "
        "of the prompt (shape, colour, position, background); real images score about 100 %.",
        "- **E-LatentLPIPS**: mean latent perceptual distance (the toy VAE's E-LatentLPIPS "
        "weights, without augmentation) from each sample to the multi-step teacher's sample for "
        "the same prompt and noise: how well a sampler reproduces the teacher's ODE solution.",
        "- **images/s**: samples per second including VAE decoding, on this machine's CPU.",
        "- **diversity**: per-prompt diversity, the mean distance between samples of the same "
        "prompt under different noise (each held-out caption appears n / 72 times), averaged "
        "over prompts, in the classifier's feature space and in E-LatentLPIPS between latents; "
        "0 is a sampler that ignores its noise. Real images of the same captions (their VAE "
        "latents for E-LatentLPIPS) give the target: a sampler far above it varies what the prompt fixes (e.g. "
        "the position it ignores), far below it has collapsed.",
        f"- **precision / recall**: the k-nearest-neighbour manifold estimate (k = {PR_K}) of "
        "Kynkäänniemi et al. 2019 in the classifier's feature space, samples against the same "
        f"number of real images: precision is the share of samples inside the real images' "
        "manifold (fidelity), recall the share of real images inside the samples' manifold "
        "(coverage). A second real set scores the 'real' row: what sampling alone costs.",
        "",
        "## Pictures (same prompts and noise in every grid, row by row)",
        "",
        "![FD against network evaluations](fd_vs_nfe.png)",
        "",
        "Real images (other draws of the same captions): ![real](grid_real.png)",
        "",
    ]
    for name in metrics:
        lines += [f"{name}: ![{name}](grid_{name}.png)", ""]
    lines += ["Prompts of the grid cells, in order:", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(grid_prompts)]
    lines += [
        "",
        "## The same on a real Stable Diffusion folder, on a GPU",
        "",
        "```bash",
        "d2g collect --model path/to/stable-diffusion-v1-5 --prompts prompts.txt --out pairs "
        "--steps 25 --guidance 7.5",
        "d2g distill --model path/to/stable-diffusion-v1-5 --pairs pairs --out run",
        "d2g export --run run --out student",
        "d2g eval --model student --steps 1 --guidance 1 --captions coco30k.txt "
        "--reference val2014_stats.npz --out eval_student",
        "d2g eval --model path/to/stable-diffusion-v1-5 --steps 25 --guidance 7.5 "
        "--captions coco30k.txt --reference val2014_stats.npz --out eval_teacher",
        "d2g compare eval_teacher eval_student",
        "```",
        "",
        "(see each command's --help for the exact flags.)",
        "",
    ]
    return "\n".join(lines)
