"""Checkpoint files of :class:`d2g_fast.nn.elatentlpips.ELatentLPIPS`: where they are, how they
are read (never a full unpickle) and our safetensors format.

Official files (pickles, read with ``torch.load(..., weights_only=True)``):
  - ``{encoder}_latent_vgg16.pth.tar``: the ImageNet-classifier trunk (``state_dict`` with
    ``[module.]model.features.*`` keys, ``best_acc1``);
  - ``{encoder}_latest_vgg16_tuned.pth``: the whole module (trunk ``net.*`` + heads ``lin<k>.*``).

Our safetensors files carry metadata (all values strings):
  ``format`` = "d2g_fast.elatentlpips", ``version``, ``kind`` ("module": trunk + calibrated heads,
  "trunk": a trained trunk with its classifier head, no calibrated heads), ``encoder``,
  ``latent_channels``, ``width_div`` (conv widths divided by it, see
  :mod:`d2g_fast.nn.latent_vgg`), ``shift`` and ``scale`` (the VAE normalisation
  x_model = (x_raw - shift) * scale used by ``normalize=True``), ``net``, ``elatentlpips`` and,
  for trunks, ``top1`` (held-out accuracy in %) and ``num_classes``. Files written before
  ``kind`` / ``width_div`` / ``shift`` existed read as "module", 1 and the encoder's known values.
  Module files hold ``net.slice*`` and ``lin<k>.model.<i>.weight``; trunk files ``net.slice*``
  and ``classifier.weight`` / ``classifier.bias``.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from d2g_fast.nn.latent_vgg import trunk_state_dict_from_classifier

CHECKPOINT_DIR_ENV = "D2G_ELATENTLPIPS_DIR"
CHECKPOINT_SOURCE = ("the authors of E-LatentLPIPS publish them at "
                     "https://huggingface.co/Mingguksky/elatentlpips (folder elatentlpips_ckpt/)")
SAFETENSORS_FORMAT = "d2g_fast.elatentlpips"
SAFETENSORS_VERSION = "1"
KIND_MODULE = "module"
KIND_TRUNK = "trunk"
TRUNK_PREFIX = "net."
CLASSIFIER_PREFIX = "classifier."


def trunk_filename(encoder: str, net: str = "vgg16") -> str:
    """File name of the official ImageNet-trained latent trunk for ``encoder``."""
    return f"{encoder}_latent_{net}.pth.tar"


def heads_filename(encoder: str, net: str = "vgg16") -> str:
    """File name of the official tuned module (trunk + calibrated heads) for ``encoder``."""
    return f"{encoder}_latest_{net}_tuned.pth"


def load_torch_file(path: Path) -> dict:
    # weights_only=True: a checkpoint is data, never code to run.
    return torch.load(str(path), map_location="cpu", weights_only=True)


def strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sd.items())


# ---------------------------------------------------------------------- locations
def env_checkpoint_path(filename: str) -> Path | None:
    """``filename`` in the ``D2G_ELATENTLPIPS_DIR`` folder (its ``.safetensors`` twin when that
    exists), or None when the variable is unset."""
    folder = os.environ.get(CHECKPOINT_DIR_ENV, "").strip()
    if not folder:
        return None
    base = Path(folder) / filename
    safetensors_twin = base.with_suffix(".safetensors") if base.suffix == ".pth" else None
    if safetensors_twin is not None and safetensors_twin.is_file():
        return safetensors_twin
    return base


def checkpoint_path(encoder: str, filename: str, argument: str, what: str) -> Path:
    """Where the file ``filename`` is looked for when no path was passed (see
    :func:`env_checkpoint_path`); FileNotFoundError naming ``argument`` when nowhere."""
    path = env_checkpoint_path(filename)
    if path is None:
        raise FileNotFoundError(
            f"ELatentLPIPS(encoder={encoder!r}): the {what} file {filename!r} is needed "
            f"and no location was given: pass {argument}=<path> or set {CHECKPOINT_DIR_ENV} "
            f"to a folder holding it ({CHECKPOINT_SOURCE}; d2g_fast never downloads). For "
            f"random weights use pretrained=False, pnet_rand=True.")
    return path


def check_file(encoder: str, path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ELatentLPIPS(encoder={encoder!r}): {what} file not found: {str(path)!r}. "
            f"Expected {heads_filename(encoder)!r} (tuned module) or "
            f"{trunk_filename(encoder)!r} (trunk); {CHECKPOINT_SOURCE}. "
            f"d2g_fast never downloads.")
    return path


# ---------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class LatentSpec:
    """What a weights file says about its latent space (None: not recorded)."""

    encoder: str | None = None
    latent_channels: int | None = None
    width_div: int | None = None
    normalization: tuple[float, float] | None = None


def read_safetensors_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a safetensors file (only the header is read)."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def spec_from_metadata(meta: Mapping[str, str]) -> LatentSpec:
    channels = meta.get("latent_channels")
    width_div = meta.get("width_div")
    normalization = None
    if meta.get("shift") is not None and meta.get("scale") is not None:
        normalization = (float(meta["shift"]), float(meta["scale"]))
    return LatentSpec(encoder=meta.get("encoder"),
                      latent_channels=int(channels) if channels is not None else None,
                      width_div=int(width_div) if width_div is not None else None,
                      normalization=normalization)


def spec_of_file(path: str | os.PathLike | None) -> LatentSpec:
    """The :class:`LatentSpec` recorded in ``path`` when it is one of our safetensors files,
    else an empty spec (official pickles record nothing; a missing file is reported later by
    the loader, with the full message)."""
    if path is None or Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return LatentSpec()
    meta = read_safetensors_metadata(path)
    if meta.get("format") != SAFETENSORS_FORMAT:
        return LatentSpec()
    return spec_from_metadata(meta)


def module_metadata(module, kind: str = KIND_MODULE, **extra) -> dict[str, str]:
    """The metadata our safetensors files carry for ``module`` (an ELatentLPIPS)."""
    meta = {"format": SAFETENSORS_FORMAT, "version": SAFETENSORS_VERSION, "kind": kind,
            "encoder": module.encoder, "latent_channels": str(module.latent_channels),
            "width_div": str(module.width_div), "net": module.pnet_type,
            "elatentlpips": str(int(bool(module.elatentlpips)))}
    if module.normalization is not None:
        meta["shift"], meta["scale"] = (repr(float(v)) for v in module.normalization)
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def _read_ours(module, path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of our safetensors file, checked against ``module``."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise ValueError(f"{str(path)!r} is not a d2g_fast E-LatentLPIPS safetensors file "
                         f"(metadata format={meta.get('format')!r})")
    spec = spec_from_metadata(meta)
    if spec.latent_channels is not None and spec.latent_channels != module.latent_channels:
        raise ValueError(f"{str(path)!r} holds an E-LatentLPIPS for encoder {spec.encoder!r} "
                         f"({spec.latent_channels} latent channels), this module is for "
                         f"{module.encoder!r} ({module.latent_channels} channels)")
    if (spec.width_div or 1) != module.width_div:
        raise ValueError(f"{str(path)!r} holds a trunk with width_div={spec.width_div or 1}, this "
                         f"module has width_div={module.width_div}")
    return meta, sd


# ---------------------------------------------------------------------- module files
def save_module_safetensors(module, path: str | os.PathLike, **extra_metadata) -> None:
    """Save trunk and heads of ``module`` as safetensors (shared ``lins.*`` duplicates left out)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors = {k: v.detach().contiguous().cpu() for k, v in module.official_state_dict().items()
               if not k.startswith("lins.")}
    save_file(tensors, str(path), metadata=module_metadata(module, KIND_MODULE, **extra_metadata))


def load_module_safetensors(module, path: str | os.PathLike, strict: bool = True):
    """Load a module file written by :func:`save_module_safetensors` into ``module``."""
    path = check_file(module.encoder, path, "safetensors")
    meta, sd = _read_ours(module, path)
    if meta.get("kind", KIND_MODULE) == KIND_TRUNK:
        raise ValueError(f"{str(path)!r} holds a trained trunk without calibrated heads: pass it "
                         "as trunk_path= (with pretrained=False), or calibrate heads for it "
                         "(d2g lpips calibrate)")
    return module.load_official_state_dict(sd, strict=strict)


def load_checkpoint(module, path: str | os.PathLike) -> None:
    """Load a whole-module checkpoint: the official ``*_tuned.pth`` or our safetensors."""
    path = check_file(module.encoder, path, "checkpoint")
    if path.suffix == ".safetensors":
        load_module_safetensors(module, path)
        return
    sd = load_torch_file(path)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    module.load_official_state_dict(sd)
    if module.verbose:
        print(f"Loaded E-LatentLPIPS trunk and heads from {path}")


# ---------------------------------------------------------------------- trunk files
def trunk_part(sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The ``net.*`` entries of a state dict, without the prefix (a LatentVGG16BN state dict)."""
    return OrderedDict((k[len(TRUNK_PREFIX):], v) for k, v in sd.items() if k.startswith(TRUNK_PREFIX))


def save_trunk_safetensors(trunk: torch.nn.Module, classifier: torch.nn.Module | None,
                           path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """Save a trained trunk (``net.*``) and its classifier head (``classifier.*``) with
    ``metadata`` (see the module docstring; ``format``/``version``/``kind`` are filled in)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors = {TRUNK_PREFIX + k: v.detach().contiguous().cpu() for k, v in trunk.state_dict().items()}
    if classifier is not None:
        tensors.update({CLASSIFIER_PREFIX + k: v.detach().contiguous().cpu()
                        for k, v in classifier.state_dict().items()})
    meta = {"format": SAFETENSORS_FORMAT, "version": SAFETENSORS_VERSION, "kind": KIND_TRUNK}
    meta.update({k: str(v) for k, v in metadata.items()})
    save_file(tensors, str(path), metadata=meta)


def load_trunk_checkpoint(module, path: str | os.PathLike) -> None:
    """Load a trunk into ``module.net``, strictly: the official ImageNet-classifier checkpoint
    (``*_latent_vgg16.pth.tar``, its classifier head dropped) or our safetensors (a trunk file,
    or the trunk part of a module file)."""
    path = check_file(module.encoder, path, "trunk checkpoint")
    if path.suffix == ".safetensors":
        meta, sd = _read_ours(module, path)
        module.net.load_state_dict(trunk_part(sd), strict=True)
        acc = meta.get("top1")
    else:
        ckpt = load_torch_file(path)
        sd = ckpt["state_dict"] if isinstance(ckpt, Mapping) and "state_dict" in ckpt else ckpt
        module.net.load_state_dict(trunk_state_dict_from_classifier(sd), strict=True)
        acc = ckpt.get("best_acc1") if isinstance(ckpt, Mapping) else None
    if module.verbose:
        print(f"Loaded latent VGG16-BN trunk from {path}"
              + (f" | top-1 acc.: {float(acc):.2f}" if acc is not None else ""))

