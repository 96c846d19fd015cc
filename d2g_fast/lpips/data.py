"""Data for LatentLPIPS training: latent files, image folders encoded by a diffusers VAE (latents
cached), the BAPPS 2AFC layout and latent-triplet files.

Latents are always MODEL-SPACE latents, the space the generator works in:
``latent = (vae.encode(image * 2 - 1).latent_dist.mean - shift) * scale`` with ``scale`` the
VAE config's ``scaling_factor`` and ``shift`` its ``shift_factor`` (0 when absent); the
distribution's mean, not a sample, so that the encoding is deterministic.

Layouts:
  - latent file (``.safetensors`` or ``.pt``): tensors ``latents`` (N, C, H, W) and ``labels`` (N,);
  - latent folder: ``ROOT/<class>/*.npy``, one (C, H, W) array per file, classes sorted by name;
  - image folder: ``ROOT/<class>/*.{png,jpg,jpeg,webp,bmp}`` (classes sorted by name);
  - BAPPS 2AFC: ``ROOT/{ref,p0,p1}/NNNNNN.png`` and ``ROOT/judge/NNNNNN.npy`` (the fraction of
    humans who judged p1 closer to ref), matched by file stem;
  - triplet file (``.safetensors`` or ``.pt``): tensors ``ref``, ``p0``, ``p1`` (N, C, H, W) and
    ``judge`` (N,).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from d2g_fast.lpips.calibrate import Triplets

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BAPPS_IMAGE_DIRS = ("ref", "p0", "p1")
BAPPS_JUDGE_DIR = "judge"
CACHE_FORMAT = "d2g_fast.lpips.latent_cache"


# ---------------------------------------------------------------------- tensor files
def _read_tensor_file(path: Path, keys: tuple[str, ...], argument: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: file not found: {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415
        data = load_file(str(path))
    else:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or any(k not in data for k in keys):
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{argument}: {str(path)!r} must hold tensors {list(keys)}, it holds {have}")
    return {k: data[k] for k in keys}


def load_latent_file(path: str | os.PathLike, argument: str = "--data") -> tuple[torch.Tensor, torch.Tensor]:
    """(latents float32 (N, C, H, W), labels int64 (N,)) from a latent file."""
    d = _read_tensor_file(Path(path), ("latents", "labels"), argument)
    return d["latents"].float(), d["labels"].long()


def load_triplet_file(path: str | os.PathLike, argument: str = "--data") -> Triplets:
    """:class:`Triplets` from a triplet file."""
    d = _read_tensor_file(Path(path), ("ref", "p0", "p1", "judge"), argument)
    return Triplets(d["ref"].float(), d["p0"].float(), d["p1"].float(), d["judge"].float())


def save_triplet_file(triplets: Triplets, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415
    save_file({k: getattr(triplets, k).contiguous() for k in ("ref", "p0", "p1", "judge")}, str(path))


# ---------------------------------------------------------------------- class folders
def class_folders(root: str | os.PathLike, extensions: tuple[str, ...],
                  argument: str = "--data") -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of ``ROOT/<class>/*<ext>``, classes and files sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{argument}: folder not found: {str(root)!r}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{argument}: {str(root)!r} must hold one subfolder per class (at least 2), "
                         f"found {len(classes)}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in extensions)
        if not found:
            raise ValueError(f"{argument}: class folder {str(root / name)!r} holds no "
                             f"{'/'.join(extensions)} files")
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def load_latent_folder(root: str | os.PathLike, argument: str = "--data") -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, labels) of ``ROOT/<class>/*.npy``."""
    files, labels, _ = class_folders(root, (".npy",), argument)
    arrays = [np.load(f, allow_pickle=False) for f in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"{argument}: every .npy file must hold one (C, H, W) latent of the same "
                         f"shape, found shapes {sorted(shapes)[:4]}")
    return torch.from_numpy(np.stack(arrays)).float(), torch.tensor(labels, dtype=torch.long)


def is_image_folder(root: str | os.PathLike) -> bool:
    """Whether ``ROOT/<class>/`` subfolders hold images (rather than .npy latents)."""
    for sub in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for f in sub.iterdir():
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                return True
            if f.suffix == ".npy":
                return False
    return False


# ---------------------------------------------------------------------- images and the VAE
def read_images(paths, image_size: int | None = None, argument: str = "--data") -> torch.Tensor:
    """RGB images in [0, 1] as (N, 3, H, W) float32. With ``image_size``, each is resized (shorter
    side) and centre-cropped to a square; without it all must have the same size."""
    from PIL import Image  # noqa: PLC0415

    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if image_size is not None:
                w, h = im.size
                k = image_size / min(w, h)
                im = im.resize((max(image_size, round(w * k)), max(image_size, round(h * k))),
                               Image.BICUBIC)
                left, top = (im.size[0] - image_size) // 2, (im.size[1] - image_size) // 2
                im = im.crop((left, top, left + image_size, top + image_size))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
    sizes = {tuple(t.shape) for t in out}
    if len(sizes) > 1:
        raise ValueError(f"{argument}: images differ in size ({sorted(sizes)[:4]}); pass "
                         "--image-size to resize and centre-crop them")
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0


class VaeEncoder:
    """A local diffusers AutoencoderKL folder (``save_pretrained`` layout) as a latent encoder."""

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu",
                 argument: str = "--vae"):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            sub = self.folder / "vae"
            if (sub / "config.json").is_file():
                self.folder = sub  # a whole pipeline folder: its vae/ subfolder
            else:
                raise FileNotFoundError(f"{argument}: {str(folder)!r} is not a diffusers VAE folder "
                                        "(no config.json, nor vae/config.json)")
        from diffusers import AutoencoderKL  # noqa: PLC0415

        self.vae = AutoencoderKL.from_pretrained(str(self.folder)).to(device).eval()
        self.device = torch.device(device)
        cfg = self.vae.config
        self.normalization = (float(getattr(cfg, "shift_factor", None) or 0.0),
                              float(getattr(cfg, "scaling_factor", 1.0)))
        self.latent_channels = int(cfg.latent_channels)

    def fingerprint(self) -> str:
        """Changes when the VAE's config or weight files change."""
        h = hashlib.sha256((self.folder / "config.json").read_bytes())
        for f in sorted(self.folder.iterdir()):
            if f.suffix in (".safetensors", ".bin"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Model-space latents (N, C, H/f, W/f) of images (N, 3, H, W) in [0, 1]."""
        shift, scale = self.normalization
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(self.device) * 2 - 1
            mean = self.vae.encode(x).latent_dist.mean
            out.append(((mean - shift) * scale).float().cpu())
        return torch.cat(out)


def _files_fingerprint(paths, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def encode_images_cached(paths, encoder: VaeEncoder, cache: str | os.PathLike | None,
                         image_size: int | None = None, batch_size: int = 16,
                         argument: str = "--data") -> torch.Tensor:
    """Latents of the image files ``paths``, read from / written to the safetensors ``cache``.

    The cache is re-used only when its fingerprint (file paths, sizes and modification times,
    the VAE's files, ``image_size``) matches; otherwise the images are encoded again.
    """
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    paths = list(paths)
    key = _files_fingerprint(paths, json.dumps([encoder.fingerprint(), image_size]))
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.is_file():
        with safe_open(str(cache), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") == CACHE_FORMAT and meta.get("fingerprint") == key:
                return f.get_tensor("latents")
    latents = encoder.encode(read_images(paths, image_size, argument), batch_size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        save_file({"latents": latents.contiguous()}, str(tmp),
                  metadata={"format": CACHE_FORMAT, "fingerprint": key, "count": str(len(paths))})
        os.replace(tmp, cache)
    return latents


def load_image_folder(root: str | os.PathLike, encoder: VaeEncoder, cache: str | os.PathLike | None,
                      image_size: int | None = None, argument: str = "--data"):
    """(latents, labels, class names) of an image class folder, encoded by ``encoder``."""
    files, labels, classes = class_folders(root, IMAGE_EXTENSIONS, argument)
    latents = encode_images_cached(files, encoder, cache, image_size, argument=argument)
    return latents, torch.tensor(labels, dtype=torch.long), classes


# ---------------------------------------------------------------------- BAPPS 2AFC
def _stems(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in extensions}


def bapps_files(root: str | os.PathLike, argument: str = "--data") -> tuple[list[str], dict[str, list[Path]]]:
    """(sorted stems, {"ref"|"p0"|"p1"|"judge": files in stem order}) of a BAPPS 2AFC folder;
    ValueError / FileNotFoundError naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{argument}: folder not found: {str(root)!r}")
    wanted = BAPPS_IMAGE_DIRS + (BAPPS_JUDGE_DIR,)
    missing = [d for d in wanted if not (root / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"{argument}: {str(root)!r} is not a BAPPS 2AFC folder: missing "
                                f"subfolder(s) {', '.join(missing)} (expected {', '.join(wanted)})")
    stems = {d: _stems(root / d, IMAGE_EXTENSIONS) for d in BAPPS_IMAGE_DIRS}
    stems[BAPPS_JUDGE_DIR] = _stems(root / BAPPS_JUDGE_DIR, (".npy",))
    if not stems["ref"]:
        raise ValueError(f"{argument}: {str(root / 'ref')!r} holds no images")
    ref = set(stems["ref"])
    for d in wanted[1:]:
        have = set(stems[d])
        if have != ref:
            kind = ".npy" if d == BAPPS_JUDGE_DIR else "image"
            lack, extra = sorted(ref - have), sorted(have - ref)
            detail = "; ".join(filter(None, [
                f"missing {len(lack)} (e.g. {', '.join(lack[:3])})" if lack else "",
                f"{len(extra)} without a ref image (e.g. {', '.join(extra[:3])})" if extra else ""]))
            raise ValueError(f"{argument}: {str(root / d)!r} has {len(have)} {kind} files, ref/ has "
                             f"{len(ref)}: {detail}")
    order = sorted(ref)
    return order, {d: [stems[d][s] for s in order] for d in wanted}


def read_judgements(files, argument: str = "--data") -> torch.Tensor:
    """(N,) float32 judgements from BAPPS ``judge/*.npy`` files (one value each, in [0, 1])."""
    values = []
    for f in files:
        a = np.load(f, allow_pickle=False)
        if a.size != 1 or not 0.0 <= float(a.reshape(-1)[0]) <= 1.0:
            raise ValueError(f"{argument}: {str(f)!r} must hold one value in [0, 1] (the fraction "
                             f"of humans preferring p1), got shape {a.shape}")
        values.append(float(a.reshape(-1)[0]))
    return torch.tensor(values, dtype=torch.float32)


def load_bapps_2afc(root: str | os.PathLike, encoder: VaeEncoder, cache_dir: str | os.PathLike | None = None,
                    image_size: int | None = None, argument: str = "--data") -> Triplets:
    """:class:`Triplets` of a BAPPS 2AFC folder, images encoded by ``encoder``; latents cached as
    ``cache_dir/<name>.{ref,p0,p1}.latents.safetensors`` when ``cache_dir`` is given."""
    _, files = bapps_files(root, argument)
    judge = read_judgements(files[BAPPS_JUDGE_DIR], argument)
    tag = Path(root).resolve().name
    lat = {d: encode_images_cached(files[d], encoder,
                                   Path(cache_dir) / f"{tag}.{d}.latents.safetensors" if cache_dir else None,
                                   image_size, argument=argument)
           for d in BAPPS_IMAGE_DIRS}
    return Triplets(lat["ref"], lat["p0"], lat["p1"], judge)


def load_triplets(path: str | os.PathLike, vae: str | os.PathLike | None, cache_dir=None,
                  image_size: int | None = None, device="cpu", argument: str = "--data") -> Triplets:
    """Triplets from a triplet file, or from a BAPPS 2AFC folder (needs ``vae``)."""
    path = Path(path)
    if path.is_file():
        return load_triplet_file(path, argument)
    if vae is None:
        raise ValueError(f"{argument}: {str(path)!r} is not a triplet file; a BAPPS 2AFC folder needs "
                         "--vae (a local diffusers AutoencoderKL folder) to encode its images")
    bapps_files(path, argument)  # layout errors before loading the VAE
    return load_bapps_2afc(path, VaeEncoder(vae, device), cache_dir, image_size, argument)
