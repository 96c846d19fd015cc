"""The embedded toy text-to-image world: a real (trained) tiny Stable-Diffusion-shaped teacher
that ships with the package, so the whole method runs and is judged offline on a laptop CPU.

World: 32x32 images of one coloured shape, captions naming four attributes
("a red circle in the top left on a black background": 3 shapes x 3 colours x 4 positions x
2 backgrounds = 72 captions), drawn by :mod:`d2g_fast.toy.data` from a seed (no downloads).

Shipped in ``shipped_dir()`` (made by ``d2g toy train --out d2g_fast/toy/weights --seed 0
--threads 1``; the command, settings, software versions, metrics and runtime are in its
provenance.json):
  teacher/                   StableDiffusionPipeline folder: tiny AutoencoderKL (latents 4x8x8),
                             CLIP text encoder + tokenizer over the caption words, UNet trained
                             for epsilon prediction with 10 % caption dropout, SD's DDIM config
  elatentlpips.safetensors   E-LatentLPIPS for the toy VAE (latent VGG trained as a classifier
                             on toy latents, heads calibrated on 2AFC triplets)
  classifier.safetensors     the attribute classifier on pixels, for evaluation only

Python API:
    shipped_dir() -> Path                        the folder above
    teacher_dir() -> Path                        shipped_dir() / "teacher"
    load_teacher(folder=None) -> StableDiffusionPipeline   (DDIM, CPU, float32, quiet)
    load_elatentlpips(folder=None) -> d2g_fast.ELatentLPIPS    (eval mode; augment "bg")
    load_classifier(folder=None) -> AttributeClassifier
    train_prompts() -> list[str]                 all 72 captions (the training prompts)
    heldout(n=144, seed=HELDOUT_SEED) -> (prompts, noise (n, 4, 8, 8))
    evaluate(students, out, ...) -> metrics       see d2g_fast.toy.evaluate.evaluate
(``d2g_fast.toy.evaluate`` names the function; import the module's other helpers with
``from d2g_fast.toy.evaluate import ...``.)
    train_all(out, seed, settings) -> provenance  what ``d2g toy train`` runs

Example (a one-step student given as a callable in the teacher's latent space)::

    from d2g_fast import toy
    metrics = toy.evaluate({"student_1step": lambda noise, prompts: G(noise, prompts)},
                           out="runs/demo")
"""
from __future__ import annotations

from pathlib import Path

from d2g_fast.toy.data import all_captions as train_prompts
from d2g_fast.toy.evaluate import HELDOUT_SEED, evaluate, heldout

__all__ = ["HELDOUT_SEED", "evaluate", "heldout", "load_classifier", "load_elatentlpips",
           "load_teacher", "shipped_dir", "teacher_dir", "train_all", "train_prompts"]


def shipped_dir() -> Path:
    """The folder of the shipped toy world (teacher/, *.safetensors, provenance.json)."""
    return Path(__file__).resolve().parent / "weights"


def teacher_dir() -> Path:
    """The shipped teacher's StableDiffusionPipeline folder."""
    return shipped_dir() / "teacher"


def _folder(folder) -> Path:
    folder = Path(folder) if folder is not None else shipped_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"toy world folder not found: {str(folder)!r} (make one with "
                                "'d2g toy train --out DIR')")
    return folder


def load_teacher(folder=None):
    """The toy teacher pipeline (DDIM scheduler, CPU, float32) from ``folder`` (a toy world
    folder; default the shipped one)."""
    from d2g_fast.toy.evaluate import load_pipeline, use_ddim

    return use_ddim(load_pipeline(_folder(folder) / "teacher"))


def load_elatentlpips(folder=None):
    """The toy VAE's E-LatentLPIPS (``d2g_fast.ELatentLPIPS``, eval mode, augmentation "bg")."""
    from d2g_fast.toy.evaluate import load_elatentlpips as load

    return load(_folder(folder) / "elatentlpips.safetensors")


def load_classifier(folder=None):
    """The evaluation classifier (eval mode, frozen)."""
    from d2g_fast.toy.evaluate import load_classifier as load

    return load(_folder(folder) / "classifier.safetensors")


def train_all(*args, **kwargs):
    """See :func:`d2g_fast.toy.train.train_all`."""
    from d2g_fast.toy.train import train_all as _train_all

    return _train_all(*args, **kwargs)
