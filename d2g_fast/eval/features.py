"""Feature extractors for evaluation, all fed uint8 images [N, H, W, 3] (what the protocol
quantises to) and returning float64 numpy arrays.

- ``InceptionFeatures``: clean-fid's "clean" Inception features (PIL bicubic float resize to
  299x299, then the TorchScript Inception of StyleGAN2-ADA / clean-fid) from a LOCAL weights file.
- ``ClipScorer``: CLIP score (cosine of image and caption embeddings) with a local transformers
  CLIP folder (e.g. openai/clip-vit-base-patch32 saved with ``save_pretrained``).
- ``HFImageFeatures``: an optional second feature space from a local transformers vision model
  folder (e.g. DINOv2): its pooled output (or CLS token).
- ``extract_features``: any torch module on image tensors (toy classifiers, tests).

Nothing here downloads: every loader takes a local path and fails with an error naming the
argument when it is missing.
"""
from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import torch

from d2g_fast.data.store import sha256_file

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 + INCEPTION_FILE)
INCEPTION_RESIZE = "clean-fid 'clean': PIL bicubic resize of each channel in float32 to 299x299"


def folder_sha256(folder: str) -> str:
    """One sha256 for a folder's files: sha256 of the sorted "relative/path sha256" lines."""
    lines = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            lines.append(f"{os.path.relpath(path, folder)} {sha256_file(path)}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def _require_folder(path: str, what: str, where_from: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: no such folder {path!r}; {where_from}")
    return path


@torch.no_grad()
def extract_features(images, extractor: torch.nn.Module, batch_size: int = 64,
                     device: torch.device | str | None = None) -> np.ndarray:
    """Run any torch module over images in batches and flatten its outputs.

    Args:
        images: [N, ...] torch tensor or numpy array (whatever ``extractor`` takes; cast to
            float32 when not floating point).
        extractor: a module mapping a batch [B, ...] to features [B, ...].
        batch_size: images per forward call.
        device: where to run (default: the extractor's parameters' device, else the CPU).
    Returns:
        [N, D] float64 numpy array.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    images = torch.as_tensor(images)
    if not images.is_floating_point():
        images = images.float()
    if device is None:
        param = next(iter(extractor.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    if len(images) == 0:
        raise ValueError("images: empty")
    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size].to(device)
        out.append(extractor(batch).reshape(len(batch), -1).double().cpu())
    return torch.cat(out).numpy()


class InceptionFeatures:
    """clean-fid's Inception features (2048-D for the real network) from a local TorchScript file.

    The computation is clean-fid's ``InceptionV3W.forward`` without ``resize_inside`` on images
    resized by ``build_resizer("clean")``: (x - 128) / 128 through the network's ``layers``.
    (clean-fid's own loader always expects the file name inception-2015-12-05.pt in a folder and
    would download it when missing; this one takes any local file and never downloads.)
    TorchScript runs only TorchScript code, not arbitrary pickled Python.
    """

    def __init__(self, weights_file: str, device: torch.device | str = "cpu",
                 what: str = "--inception-weights"):
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(
                f"{what}: no such file {weights_file!r}; it is the TorchScript Inception used by "
                f"clean-fid and StyleGAN2-ADA ({INCEPTION_FILE}, from {INCEPTION_URL}); "
                f"download it once where there is network access and pass its path")
        from cleanfid.resize import build_resizer

        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated; it is this file's format
                warnings.simplefilter("ignore", FutureWarning)
                self.base = torch.jit.load(weights_file, map_location=self.device).eval()
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{what}: {weights_file!r} is not a TorchScript file: {exc}") from exc
        self.resize = build_resizer("clean")
        self.sha256 = sha256_file(weights_file)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> [N, D] float64."""
        resized = np.stack([self.resize(np.ascontiguousarray(im)) for im in images])
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
        feats = self.base.layers.forward((x - 128) / 128)
        return feats.reshape(len(images), -1).double().cpu().numpy()


def _pooled(output) -> torch.Tensor:
    """Embeddings from a transformers output: a tensor (older get_*_features) or an output object
    whose pooler_output holds them (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """CLIP score: cosine similarity of the image embedding and the embedding of
    ``prefix + caption`` (GigaGAN's rule: prefix "A photo depicts ", no x100, no clamp at 0),
    with the folder's own CLIP preprocessing and tokeniser (captions truncated to its length)."""

    def __init__(self, folder: str, prefix: str, device: torch.device | str = "cpu",
                 what: str = "--clip"):
        from transformers import CLIPModel, CLIPProcessor

        _require_folder(folder, what, "pass a local CLIP folder (e.g. openai/clip-vit-base-patch32 "
                        "saved with save_pretrained: config, weights, tokenizer, preprocessor)")
        self.device = torch.device(device)
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(self.device)
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{what}: cannot load a CLIP model and processor from {folder!r}: "
                             f"{exc}") from exc
        self.model.eval()
        self.prefix = prefix
        self.sha256 = folder_sha256(folder)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        """uint8 [N, H, W, 3] and N captions -> [N] float64 scores."""
        inputs = self.processor(text=[self.prefix + c for c in captions], images=list(images),
                                return_tensors="pt", padding=True, truncation=True)
        img = _pooled(self.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.device))).double()
        txt = _pooled(self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device))).double()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1).cpu().numpy()


class HFImageFeatures:
    """A second feature space: a local transformers vision model (e.g. DINOv2), its pooled output
    (the CLS token when the model has no pooler), on images prepared by its own processor."""

    def __init__(self, folder: str, device: torch.device | str = "cpu",
                 what: str = "--extra-features"):
        from transformers import AutoImageProcessor, AutoModel

        _require_folder(folder, what, "pass a local vision model folder (e.g. facebook/dinov2-base "
                        "saved with save_pretrained, including its preprocessor config)")
        self.device = torch.device(device)
        try:
            self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device)
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{what}: cannot load a vision model and image processor from "
                             f"{folder!r}: {exc}") from exc
        self.model.eval()
        self.name = type(self.model).__name__
        self.sha256 = folder_sha256(folder)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> [N, D] float64."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        out = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        pooled = getattr(out, "pooler_output", None)
        feats = pooled if pooled is not None else out.last_hidden_state[:, 0]
        return feats.reshape(len(images), -1).double().cpu().numpy()
