"""Batched generation and feature extraction, written in shards so that a killed evaluation
resumes where it stopped.

Layout of an evaluation folder (--out):
  eval-config.json            everything that determines the shards' contents, and its hash
  shards/shard-00000.safetensors   images [n, R, R, 3] uint8, index [n] int64, inception [n, D],
                              clip_score [n] and extra [n, E] (float64) of images [start, start+n)
  shards/shard-00000.json     the shard's receipt; a shard counts as done only when it exists
Shard k always holds images [k * shard_size, (k + 1) * shard_size); under torchrun, rank r makes
the shards k with k % world == r, so the shards (and the numbers) do not depend on the number of
processes. Every file is written atomically (d2g_fast.data.store).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from d2g_fast.data import store as st
from d2g_fast.eval.protocol import Protocol, image_seed

SHARDS = "shards"
CONFIG = "eval-config.json"
_FILTERS = {"lanczos": "LANCZOS", "bicubic": "BICUBIC", "bilinear": "BILINEAR", "box": "BOX"}


def load_pipeline(folder: str, device: torch.device, dtype: torch.dtype):
    """A diffusers pipeline from a local folder, with its safety checker disabled (the protocol
    scores what the model generates, not a filtered version). Errors name --model."""
    from diffusers import DiffusionPipeline

    index_file = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"--model: {folder!r} is not a diffusers pipeline folder "
                                f"(no model_index.json)")
    with open(index_file, encoding="utf-8") as f:
        components = json.load(f)
    kwargs = {"local_files_only": True}
    if "safety_checker" in components:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if dtype != torch.float32:  # at load, so that diffusers keeps its float32-only modules
        kwargs["torch_dtype"] = dtype
    pipe = DiffusionPipeline.from_pretrained(folder, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family(pipe):
    from d2g_fast.teacher.families import family_for_pipeline

    return family_for_pipeline(pipe)


def native_resolution(pipe) -> int:
    """The pipeline's default image size in pixels (its teacher family's rule: UNet sample size
    x VAE scale factor; SD3/FLUX the pipeline's default_sample_size x VAE scale factor)."""
    return _family(pipe).pipeline_default_size(pipe)


def image_latents(pipe, seed: int, indices, size: int) -> torch.Tensor:
    """Initial latents of images ``indices``: [n, C, size/f, size/f] float32 on the CPU (FLUX:
    unpacked), image i from its own generator (so any subset reproduces, in any batch)."""
    shape = _family(pipe).pipeline_latent_shape(pipe, size, size)
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i)))
        for i in indices])


def generate_images(pipe, captions: list[str], indices, *, seed: int, steps: int,
                    guidance: float, size: int) -> np.ndarray:
    """Generate images ``indices`` (image i from caption i) and quantise them.

    Returns:
        uint8 [n, size, size, 3].
    """
    family = _family(pipe)
    latents = family.pipeline_latents(image_latents(pipe, seed, indices, size))
    param = next(getattr(pipe, family.denoiser_name).parameters())
    out = pipe(prompt=[captions[i] for i in indices], num_inference_steps=steps,
               guidance_scale=guidance, height=size, width=size,
               latents=latents.to(param.device, param.dtype), output_type="np")
    return quantise(np.asarray(out.images))


def quantise(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, as diffusers' numpy_to_pil does (round(x * 255))."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def center_crop_resize(image: np.ndarray, resolution: int, resize_filter: str) -> np.ndarray:
    """Centre square crop, then resize to resolution x resolution with PIL's ``resize_filter``.

    Args:
        image: uint8 [H, W, 3].
    Returns:
        uint8 [resolution, resolution, 3].
    """
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side]))
    if side != resolution:
        crop = crop.resize((resolution, resolution),
                           resample=getattr(Image.Resampling, _FILTERS[resize_filter]))
    return np.asarray(crop, dtype=np.uint8)


def prepare_images(images: np.ndarray, protocol: Protocol) -> np.ndarray:
    """The protocol's crop + resize on a batch: uint8 [n, H, W, 3] -> [n, R, R, 3]."""
    return np.stack([center_crop_resize(im, protocol.resolution, protocol.resize_filter)
                     for im in images])


def load_image_folder(folder: str, protocol: Protocol, what: str = "--reference") -> np.ndarray:
    """Every image file of ``folder`` (sorted by name) as RGB, cropped and resized by the
    protocol: uint8 [n, R, R, 3]."""
    from PIL import Image, UnidentifiedImageError

    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    images = []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with Image.open(path) as im:
                images.append(center_crop_resize(np.asarray(im.convert("RGB")),
                                                 protocol.resolution, protocol.resize_filter))
        except UnidentifiedImageError:
            continue  # captions files, licences and the like beside the images
    if len(images) < 2:
        raise ValueError(f"{what}: {folder!r} holds {len(images)} readable images; need >= 2")
    return np.stack(images)


def check_config(out: str, config: dict) -> str:
    """Write (or check) the folder's configuration; returns its hash. A folder made with another
    configuration is refused (resuming would mix two evaluations)."""
    config_hash = st.sha256_bytes(st.canonical_json(config))
    path = os.path.join(out, CONFIG)
    if os.path.exists(path):
        old = st.read_json(path)
        if old.get("config_hash") != config_hash:
            diff = st.describe_mismatch(old.get("config", {}), config)
            raise ValueError(f"--out: {out!r} holds an evaluation with another configuration "
                             f"({diff}); use a new --out folder")
    return config_hash


def write_config(out: str, config: dict, config_hash: str) -> None:
    st.atomic_write_json(os.path.join(out, CONFIG), {"config": config, "config_hash": config_hash})


def make_shard(start: int, count: int, *, pipe, captions, protocol: Protocol, steps: int,
               guidance: float, size: int, batch_size: int, inception, clip=None,
               extra=None) -> dict[str, torch.Tensor]:
    """Generate, prepare and featurise images [start, start + count) in batches."""
    parts: dict[str, list] = {"images": [], "inception": [], "clip_score": [], "extra": []}
    for b in range(start, start + count, batch_size):
        indices = list(range(b, min(b + batch_size, start + count)))
        raw = generate_images(pipe, captions, indices, seed=protocol.seed, steps=steps,
                              guidance=guidance, size=size)
        images = prepare_images(raw, protocol)
        parts["images"].append(images)
        parts["inception"].append(inception(images))
        if clip is not None:
            parts["clip_score"].append(clip(images, [captions[i] for i in indices]))
        if extra is not None:
            parts["extra"].append(extra(images))
    tensors = {name: torch.from_numpy(np.concatenate(arrays)) for name, arrays in parts.items()
               if arrays}
    tensors["index"] = torch.arange(start, start + count, dtype=torch.int64)
    return tensors


def write_shard(shards_dir: str, k: int, start: int, count: int, tensors: dict,
                config_hash: str, seconds: float) -> None:
    """The shard file, then its receipt (the shard counts as done once the receipt exists)."""
    from safetensors.torch import save

    data = save({n: t.contiguous() for n, t in tensors.items()})
    st.atomic_write_bytes(os.path.join(shards_dir, st.shard_file(k)), data)
    st.atomic_write_json(os.path.join(shards_dir, st.receipt_file(k)), {
        "file": st.shard_file(k), "bytes": len(data), "sha256": st.sha256_bytes(data),
        "start": start, "count": count, "config_hash": config_hash, "seconds": seconds})


def run_shards(out: str, plan, *, rank: int, world: int, config_hash: str, log=print,
               **shard_kwargs) -> tuple[int, int]:
    """Make this rank's missing shards. Returns (shards made, shards found done)."""
    shards_dir = os.path.join(out, SHARDS)
    made = reused = 0
    from d2g_fast.runtime.signals import requested

    for k, start, count in plan:
        if k % world != rank:
            continue
        if requested():  # preempted: stop between shards (the caller saves nothing more)
            break
        if st.read_receipt(shards_dir, k, start, count, config_hash) is not None:
            reused += 1
            continue
        t0 = time.perf_counter()
        tensors = make_shard(start, count, **shard_kwargs)
        write_shard(shards_dir, k, start, count, tensors, config_hash, time.perf_counter() - t0)
        made += 1
        log(f"shard {k + 1}/{len(plan)}: images {start}..{start + count - 1}")
    return made, reused


def read_shards(out: str, plan, config_hash: str) -> dict[str, np.ndarray]:
    """All shards' arrays concatenated in image order (images left out). Checks every shard's
    receipt and sha256."""
    from safetensors.torch import load

    shards_dir = os.path.join(out, SHARDS)
    parts: dict[str, list] = {}
    for k, start, count in plan:
        receipt = st.read_receipt(shards_dir, k, start, count, config_hash)
        if receipt is None:
            raise st.StoreError(f"{out}: shard {k} is missing or incomplete")
        with open(os.path.join(shards_dir, receipt["file"]), "rb") as f:
            data = f.read()
        if st.sha256_bytes(data) != receipt["sha256"]:
            raise st.StoreError(f"{out}: shard {k} does not match its receipt's sha256")
        for name, tensor in load(data).items():
            if name != "images":
                parts.setdefault(name, []).append(tensor.numpy())
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}
