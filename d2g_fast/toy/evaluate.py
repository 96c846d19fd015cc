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


@torch.no_grad()
def pipeline_latents(pipe, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float,
                     batch: int = 72) -> torch.Tensor:
    """Model-space latents (N, 4, 8, 8) of ``pipe`` with DDIM ``steps`` from ``noise``."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
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


def teacher_check(folder: str | os.PathLike, n: int = 144, steps: int = 25,
                  guidance: float = 4.0, progress: bool = False) -> dict:
    """The quality bar of a trained toy world (used by ``d2g toy train``): accuracy and FD of
    the teacher at ``steps`` guided DDIM steps and at 1 step, on ``n`` held-out prompts/noise."""
    folder = Path(folder)
    pipe = load_pipeline(folder / "teacher")
    clf = load_classifier(folder / "classifier.safetensors")
    prompts, noise = heldout(n)
    real = real_features(clf, max(n, 512))
    out = {}
    for name, k in ((f"teacher_{steps}step", steps), ("teacher_1step", 1)):
        lat = pipeline_latents(pipe, prompts, noise, k, guidance)
        m = image_metrics(clf, decode(pipe.vae, lat), prompts, real)
        out[f"{name}_accuracy"] = m["accuracy"]
        out[f"{name}_fd"] = m["fd"]
    return out
