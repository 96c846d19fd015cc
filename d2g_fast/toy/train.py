"""``d2g toy train``: make the whole toy world from nothing but a seed.

Stages (each seeded from ``seed``; a tqdm bar each):
  1. VAE (AutoencoderKL) on real toy images: L1 + MSE reconstruction (the shape's pixels weighted
     up), the posterior mean decoded, a small KL term; then the
     latent scaling_factor = 1 / std of the latents (what SD's 0.18215 is for its VAE).
  2. Latent pool: real images encoded once (posterior means, scaled). The VAE is trained on
     its posterior means (the KL term only keeps them bounded), so its variance is untrained
     and never sampled.
  3. Text encoder + UNet trained together as a latent diffusion model (epsilon prediction on SD's
     DDIM noise schedule), the caption dropped to "" 10 % of the time (classifier-free
     guidance), an exponential moving average of the weights is what ships. Two changes to the
     plain epsilon loss make the teacher follow the position words (issue 25; without them it
     placed the shape in a quadrant chosen by the noise): a quarter of each batch is trained on
     pure-noise inputs at the first sampling timesteps (SD1.5's schedule leaks 7 % of the clean
     latent at t = 999, which the UNet read the quadrant from), and the epsilon MSE is weighted
     by clamp(1 / SNR, 1, 10), an x0 loss at high noise (see pure_noise_inputs,
     high_noise_weight).
  4. The evaluation classifier on real images (pixels).
  5. E-LatentLPIPS for the toy VAE, as the paper made it (d2g_fast.lpips): a narrow latent
     VGG16-BN trained to classify the toy latents by caption, then its heads calibrated on 2AFC
     triplets (a reference and two distortions of one kind at two strengths: the weaker one is
     the closer, a known order).
  6. Metrics (teacher at 25 guided DDIM steps and at 1 step) written with the provenance.

Output folder layout (also the layout of the shipped d2g_fast/toy/weights/):
  teacher/                    a StableDiffusionPipeline folder (safetensors)
  classifier.safetensors      AttributeClassifier
  elatentlpips.safetensors    trunk + heads, loads with ELatentLPIPS.from_safetensors
  provenance.json             command, seed, settings, data, software versions, metrics, runtimes
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from d2g_fast.toy import data, models

TEACHER_DIR = "teacher"
CLASSIFIER_FILE = "classifier.safetensors"
ELATENTLPIPS_FILE = "elatentlpips.safetensors"
PROVENANCE_FILE = "provenance.json"
ENCODER_NAME = "d2g-toy"
WORK_DIR = "_work"
CFG_DROPOUT = 0.1


@dataclasses.dataclass
class ToySettings:
    """Step counts and sizes of ``d2g toy train`` (``quick()`` for tests)."""

    vae_steps: int = 1000
    vae_batch: int = 8
    vae_lr: float = 3e-3
    kl_weight: float = 1e-6
    scaling_images: int = 1024
    latent_pool: int = 4096
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    ema_decay: float = 0.995
    # Teacher loss (issue 25): see high_noise_weight and pure_noise_inputs. 1.0 and 0.0 is the
    # plain epsilon loss of the earlier teacher, which ignored the position words (21.5 %).
    x0_weight_cap: float = 10.0
    pure_noise_fraction: float = 0.25
    classifier_steps: int = 300
    classifier_batch: int = 64
    trunk_steps: int = 300
    trunk_width_div: int = 8
    triplets: int = 1536
    calibrate_epochs: int = 10
    eval_samples: int = 144
    eval_steps: int = 25
    guidance: float = 4.0

    @classmethod
    def quick(cls) -> "ToySettings":
        """A few steps of every stage: the plumbing end to end in well under a minute."""
        return cls(vae_steps=4, vae_batch=8, scaling_images=64, latent_pool=96, unet_steps=4,
                   unet_batch=8, classifier_steps=4, classifier_batch=8, trunk_steps=4, triplets=48,
                   calibrate_epochs=1, eval_samples=8, eval_steps=2)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not progress, leave=True, dynamic_ncols=True)


def _cosine_lr(step: int, steps: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _batch_seed(seed: int, stage: int, step: int) -> int:
    """A distinct data seed per (run seed, stage, step)."""
    return (seed * 1_000 + stage) * 1_000_000 + step


# ---------------------------------------------------------------------------------- stages
FOREGROUND_WEIGHT = 10.0


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L1 + MSE with the shape's pixels weighted FOREGROUND_WEIGHT times: the shape covers about
    a tenth of the image, and without the weight the VAE spends hundreds of steps drawing grey
    blobs on a correct background before it learns colours and outlines."""
    # The per-image median colour is the background (it covers most pixels).
    background = images.flatten(2).median(dim=2).values[:, :, None, None]
    foreground = ((images - background).abs().amax(1, keepdim=True) > 0.2).float()
    weight = 1.0 + (FOREGROUND_WEIGHT - 1.0) * foreground
    err = recon - images
    return (weight * (err.abs() + err.square())).mean()


def train_vae(s: ToySettings, seed: int, progress: bool):
    """Stage 1. Returns the trained AutoencoderKL (eval mode) with scaling_factor set."""
    vae = models.build_vae(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    vae.train()
    with _bar(s.vae_steps, "toy 1/5 VAE", progress) as bar:
        for step in range(s.vae_steps):
            images, _, _ = data.sample(s.vae_batch, _batch_seed(seed, 1, step))
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.mode()).sample
            loss = reconstruction_loss(recon, images) + s.kl_weight * posterior.kl().mean()
            _set_lr(opt, _cosine_lr(step, s.vae_steps, s.vae_lr))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
    vae.eval().requires_grad_(False)
    images, _, _ = data.sample(s.scaling_images, _batch_seed(seed, 1, 10**5))
    with torch.no_grad():
        raw = vae.encode(images).latent_dist.mode()
        mse = F.mse_loss(vae.decode(raw).sample, images).item()
    vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    return vae, {"vae_reconstruction_mse": mse, "scaling_factor": vae.config.scaling_factor}


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Model-space latents (posterior means x scaling_factor) of images (N, 3, 32, 32) in
    [-1, 1] -> (N, 4, 8, 8)."""
    return torch.cat([vae.encode(chunk).latent_dist.mode() * vae.config.scaling_factor
                      for chunk in images.split(batch)])


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, 32, 32) from model-space latents (N, 4, 8, 8)."""
    return torch.cat([vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
                      for z in latents.split(batch)])


def latent_pool(vae, s: ToySettings, seed: int):
    """Stage 2. Returns (latents (P, 4, 8, 8), labels (P, 4), captions)."""
    images, labels, caps = data.sample(s.latent_pool, _batch_seed(seed, 2, 0))
    latents = encode(vae, images)
    return latents, labels, caps


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


# Pure-noise inputs are drawn at t in [PURE_NOISE_MIN_T, 999]: the first DDIM timestep of every
# schedule of 10 or more steps (10 steps: 901, 25: 961, 50: 981).
PURE_NOISE_MIN_T = 900


def high_noise_weight(alphas_t: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-sample weight of the epsilon MSE: clamp(1 / SNR(t), 1, cap).

    The epsilon MSE is SNR(t) x the x0 MSE, so plain epsilon prediction gives the high-noise
    steps almost no weight in x0 terms; yet they are the only steps where the caption alone must
    place the shape (lower down the noisy latent already shows where it is). Weighting by
    1 / SNR makes those steps an x0 loss (clipped at ``cap``); steps with SNR >= 1 keep the plain
    epsilon loss. cap = 1 is the plain epsilon loss."""
    return ((1 - alphas_t) / alphas_t).clamp(1.0, max(1.0, cap))


def pure_noise_inputs(z0, eps, t, alphas, fraction: float, gen: torch.Generator):
    """Noisy inputs and epsilon targets of one batch, the first ``fraction`` of it on pure noise.

    SD1.5's schedule leaks signal: at t = 999 a training input still holds sqrt(0.0047) = 7 % of
    the clean latent, enough for the UNet to read the quadrant of the shape from it
    (benchmarks/probe_toy_leak.py) instead of from the words; at sampling the first input is
    pure noise, so the quadrant then comes from the noise. For the pure-noise samples the input
    is eps itself at a high t and the target is the epsilon that input implies for the real
    latent, (z_t - sqrt(a) z0) / sqrt(1 - a): the x0 it encodes is the caption's latent, as at
    the first sampling step. Returns (z_t, t, target)."""
    n_pure = round(fraction * len(z0))
    t = t.clone()
    t[:n_pure] = torch.randint(PURE_NOISE_MIN_T, len(alphas), (n_pure,), generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    zt[:n_pure] = eps[:n_pure]
    target = (zt - a.sqrt() * z0) / (1 - a).sqrt()
    return zt, t, target


def train_denoiser(pool, tokenizer, s: ToySettings, seed: int, progress: bool):
    """Stage 3. Returns the EMA (text_encoder, unet), eval mode."""
    latents, _, caps = pool
    text_encoder = models.build_text_encoder(tokenizer, seed + 3)
    unet = models.build_unet(seed + 4)
    scheduler = models.build_scheduler()
    ids_all = tokenizer(caps + [""], padding="max_length", max_length=models.MAX_TOKENS,
                        truncation=True, return_tensors="pt").input_ids
    empty_ids = ids_all[-1]
    ids_all = ids_all[:-1]
    alphas = scheduler.alphas_cumprod
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.0)
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    gen = torch.Generator().manual_seed(seed + 3)
    text_encoder.train()
    unet.train()
    with _bar(s.unet_steps, "toy 2/5 teacher UNet + text encoder", progress) as bar:
        for step in range(s.unet_steps):
            idx = torch.randint(len(latents), (s.unet_batch,), generator=gen)
            z0 = latents[idx]
            ids = ids_all[idx].clone()
            drop = torch.rand(s.unet_batch, generator=gen) < CFG_DROPOUT
            ids[drop] = empty_ids
            t = torch.randint(scheduler.config.num_train_timesteps, (s.unet_batch,), generator=gen)
            eps = torch.randn(z0.shape, generator=gen)
            zt, t, target = pure_noise_inputs(z0, eps, t, alphas, s.pure_noise_fraction, gen)
            pred = unet(zt, t, text_encoder(ids).last_hidden_state).sample
            weight = high_noise_weight(alphas[t], s.x0_weight_cap)
            loss = (weight * (pred - target).square().mean((1, 2, 3))).sum() / weight.sum()
            _set_lr(opt, _cosine_lr(step, s.unet_steps, s.unet_lr, warmup=50))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(s.ema_decay, (1 + step) / (10 + step))
            _ema_update(ema_text, text_encoder, decay)
            _ema_update(ema_unet, unet, decay)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
    return ema_text.requires_grad_(False), ema_unet.requires_grad_(False)


def _classifier_augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur half of the batch (random strength): the classifier judges what a picture shows,
    and every sampler's pictures pass through the same slightly soft VAE decoder; without this
    the classifier would call soft shapes wrong instead of leaving softness to the FD."""
    chosen = torch.rand(len(images), generator=gen) < 0.5
    if chosen.any():
        images = images.clone()
        images[chosen] = _blur(images[chosen], 0.6 * torch.rand(int(chosen.sum()), generator=gen),
                               gen)
    return images


def train_classifier(s: ToySettings, seed: int, progress: bool):
    """Stage 4. Returns (classifier in eval mode, {"classifier_accuracy": per-caption exact
    accuracy on 1024 fresh real images})."""
    torch.manual_seed(seed + 5)
    clf = models.AttributeClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    clf.train()
    with _bar(s.classifier_steps, "toy 3/5 evaluation classifier", progress) as bar:
        for step in range(s.classifier_steps):
            images, labels, _ = data.sample(s.classifier_batch, _batch_seed(seed, 4, step))
            images = _classifier_augment(images, torch.Generator().manual_seed(
                _batch_seed(seed, 6, step)))
            loss = models.classifier_loss(clf(images), labels)
            _set_lr(opt, _cosine_lr(step, s.classifier_steps, 2e-3))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
    clf.eval().requires_grad_(False)
    images, labels, _ = data.sample(1024, _batch_seed(seed, 4, 10**5))
    accuracy = (clf.predict(images) == labels).all(1).float().mean().item()
    return clf, {"classifier_accuracy": accuracy}


# Pixel-space distortions of the 2AFC triplets: name -> f(images, strength in [0, 1], generator).
def _noise(x, s, g):
    return x + 0.5 * s.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)


def _blur(x, s, g):
    out = torch.empty_like(x)
    for i, si in enumerate(s.tolist()):
        sigma = 0.1 + 2.0 * si
        r = torch.arange(-4, 5, dtype=x.dtype)
        k = torch.exp(-0.5 * (r / sigma) ** 2)
        k = k / k.sum()
        xi = F.conv2d(F.pad(x[i:i + 1], (4, 4, 0, 0), mode="replicate"),
                      k.view(1, 1, 1, 9).expand(3, 1, 1, 9), groups=3)
        out[i:i + 1] = F.conv2d(F.pad(xi, (0, 0, 4, 4), mode="replicate"),
                                k.view(1, 1, 9, 1).expand(3, 1, 9, 1), groups=3)
    return out


def _shift(x, s, g):
    shifts = (s * 6).round().long().tolist()
    return torch.stack([torch.roll(xi, (k, k), dims=(1, 2)) for xi, k in zip(x, shifts)])


def _colour(x, s, g):
    direction = torch.randn(x.shape[0], 3, 1, 1, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True)
    return x + 0.8 * s.view(-1, 1, 1, 1) * direction


DISTORTIONS = {"noise": _noise, "blur": _blur, "shift": _shift, "colour": _colour}


def make_triplets(vae, n: int, seed: int):
    """2AFC triplets on toy latents: per reference image one distortion kind at two different
    strengths; the judgement (fraction preferring p1) is 1 when p1's strength is the smaller.
    Returns d2g_fast.lpips.Triplets (latents in model space)."""
    from d2g_fast.lpips import Triplets

    gen = torch.Generator().manual_seed(_batch_seed(seed, 5, 0))
    images, _, _ = data.sample(n, _batch_seed(seed, 5, 1))
    kinds = torch.randint(len(DISTORTIONS), (n,), generator=gen)
    s0 = torch.rand(n, generator=gen)
    s1 = torch.rand(n, generator=gen)
    p0, p1 = torch.empty_like(images), torch.empty_like(images)
    for k, fn in enumerate(DISTORTIONS.values()):
        sel = kinds == k
        if sel.any():
            p0[sel] = fn(images[sel], s0[sel], gen).clamp(-1, 1)
            p1[sel] = fn(images[sel], s1[sel], gen).clamp(-1, 1)
    judge = (s1 < s0).float()
    return Triplets(encode(vae, images), encode(vae, p0), encode(vae, p1), judge)


def train_elatentlpips(vae, pool, s: ToySettings, seed: int, out: Path, progress: bool) -> dict:
    """Stage 5. Writes ``out/elatentlpips.safetensors``; returns its top-1 / 2AFC scores."""
    from d2g_fast.lpips import calibrate_heads, train_trunk
    from d2g_fast.nn import elatentlpips_io as io

    latents, labels, _ = pool
    combo = ((labels[:, 0] * data.NUM_CLASSES[1] + labels[:, 1]) * data.NUM_CLASSES[2]
             + labels[:, 2]) * data.NUM_CLASSES[3] + labels[:, 3]
    trunk_path = out / "elatentlpips_trunk.safetensors"
    train_trunk(latents, combo, trunk_path, encoder=ENCODER_NAME,
                normalization=(0.0, float(vae.config.scaling_factor)),
                steps=s.trunk_steps, width_div=s.trunk_width_div, seed=seed, flip=False,
                progress=progress)
    if progress:
        print("toy 5/5 E-LatentLPIPS heads: 2AFC calibration", file=sys.stderr)
    final = out / ELATENTLPIPS_FILE
    calibrate_heads(trunk_path, make_triplets(vae, s.triplets, seed), final,
                    epochs=s.calibrate_epochs, seed=seed)
    trunk_path.unlink()
    for ckpt in out.glob("elatentlpips_trunk.safetensors*"):
        ckpt.unlink()
    meta = io.read_safetensors_metadata(final)
    return {k: float(meta[k]) for k in ("top1", "two_afc_train", "two_afc_val") if k in meta}


# ---------------------------------------------------------------------------------- assembly
class _Work:
    """Finished stages of an interrupted run (out/_work/): a rerun with the same seed and
    settings resumes after the last finished stage; other settings are refused."""

    def __init__(self, path: Path, s: ToySettings, seed: int):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        key = {"seed": seed, "settings": dataclasses.asdict(s)}
        key_file = path / "run.json"
        if key_file.is_file() and json.loads(key_file.read_text()) != key:
            raise ValueError(f"--out {path.parent} holds an unfinished run with another --seed or "
                             f"settings ({key_file}); delete it or choose another --out")
        key_file.write_text(json.dumps(key))

    def done(self, stage: str) -> bool:
        return (self.path / f"{stage}.json").is_file()

    def mark(self, stage: str, metrics: dict) -> None:
        (self.path / f"{stage}.json").write_text(json.dumps(metrics))

    def metrics(self, stage: str) -> dict:
        return json.loads((self.path / f"{stage}.json").read_text())

    def save_vae(self, vae, metrics: dict) -> None:
        vae.save_pretrained(self.path / "vae", safe_serialization=True)
        self.mark("vae", metrics)

    def load_vae(self):
        if not self.done("vae"):
            return None
        from diffusers import AutoencoderKL
        return AutoencoderKL.from_pretrained(self.path / "vae").eval().requires_grad_(False)


def save_teacher(folder: Path, vae, text_encoder, unet, tokenizer) -> None:
    """Write the StableDiffusionPipeline folder (safetensors, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=models.build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def software_versions() -> dict:
    import diffusers
    import numpy
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "platform": platform.platform()}


def train_all(out: str | os.PathLike, seed: int = 0, settings: ToySettings | None = None,
              progress: bool = True, command: str | None = None) -> dict:
    """Make the toy world into folder ``out`` (see the module docstring for the layout).

    Args:
        out: output folder (created; existing files of the same names are replaced). A run
            that was killed resumes after its last finished stage (kept in out/_work/).
        seed: the one seed of everything (data, initialisation, noise).
        settings: step counts and sizes; default ``ToySettings()`` (the shipped weights).
        progress: tqdm bars on stderr.
        command: the command line recorded in provenance.json.

    Returns:
        The provenance dict (also written to ``out/provenance.json``).
    """
    from safetensors.torch import save_file

    from d2g_fast.toy.evaluate import teacher_check

    s = settings or ToySettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings, metrics = {}, {}
    t0 = time.perf_counter()

    def lap(name):
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 1)
        t0 = now

    work = _Work(out / WORK_DIR, s, seed)
    tokenizer = models.build_tokenizer(str(work.path / "tokenizer"))
    vae = work.load_vae()
    if vae is None:
        vae, m = train_vae(s, seed, progress)
        work.save_vae(vae, m)
    metrics.update(work.metrics("vae"))
    lap("vae_s")
    pool = latent_pool(vae, s, seed)
    lap("latent_pool_s")
    if not work.done("teacher"):
        text_encoder, unet = train_denoiser(pool, tokenizer, s, seed, progress)
        save_teacher(out / TEACHER_DIR, vae, text_encoder, unet, tokenizer)
        work.mark("teacher", {})
    lap("teacher_s")
    if not work.done("classifier"):
        clf, m = train_classifier(s, seed, progress)
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()},
                  str(out / CLASSIFIER_FILE))
        work.mark("classifier", m)
    metrics.update(work.metrics("classifier"))
    lap("classifier_s")
    if not work.done("elatentlpips"):
        work.mark("elatentlpips", train_elatentlpips(vae, pool, s, seed, out, progress))
    metrics.update(work.metrics("elatentlpips"))
    lap("elatentlpips_s")
    metrics.update(teacher_check(out, n=s.eval_samples, steps=s.eval_steps,
                                          guidance=s.guidance, progress=progress))
    lap("metrics_s")
    shutil.rmtree(work.path)
    provenance = {
        "command": command or f"d2g toy train --out {out} --seed {seed}",
        "seed": seed,
        "settings": dataclasses.asdict(s),
        "data": {"generator": "d2g_fast.toy.data (procedural, drawn from the seed)",
                 "resolution": data.RESOLUTION,
                 "attributes": {k: list(v) for k, v in data.ATTRIBUTES.items()},
                 "caption": data.CAPTION, "cfg_dropout": CFG_DROPOUT},
        "software": software_versions(),
        "threads": torch.get_num_threads(),
        "metrics": metrics,
        "runtime_s": timings,
        "runtime_total_s": round(sum(timings.values()), 1),
    }
    with open(out / PROVENANCE_FILE, "w", encoding="utf-8") as f:
        json.dump(provenance, f, indent=2)
    return provenance
