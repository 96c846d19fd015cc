"""What a run writes for people: metrics.csv (+ TensorBoard when installed), a progress bar, and
PNG grids of samples. Only rank 0 calls these."""
from __future__ import annotations

import csv
import io
import math
import os

import torch

from d2g_fast.data.store import atomic_write_bytes
from d2g_fast.runtime.diskspace import writing

METRICS = "metrics.csv"
COLUMNS = ("step", "e_latentlpips", "g_gan", "d_loss", "d_gan", "r1", "d_real", "d_fake",
           "grad_norm_g", "grad_norm_d", "val_e_latentlpips", "nonfinite_skipped",
           "samples_per_s", "device_hours")
# Columns that measure time: they differ between otherwise identical runs.
TIMING_COLUMNS = ("samples_per_s", "device_hours")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


class MetricsLog:
    """``RUN_DIR/metrics.csv``, one row per logged step. On resume from step k the rows after k
    (written by the interrupted run after its last checkpoint) are dropped, so the file ends up
    as an uninterrupted run's."""

    def __init__(self, run_dir: str, resumed_step: int | None, tensorboard: bool = True):
        self.path = os.path.join(run_dir, METRICS)
        rows = self.read(self.path) if os.path.isfile(self.path) else []
        if resumed_step is None:
            rows = []
        else:
            rows = [r for r in rows if int(r["step"]) <= resumed_step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, text.getvalue().encode("utf-8"))  # old rows kept if full
        self.writer = self._tensorboard(run_dir) if tensorboard else None

    @staticmethod
    def _tensorboard(run_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return None
        return SummaryWriter(os.path.join(run_dir, "tensorboard"))

    @staticmethod
    def read(path: str) -> list[dict]:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def append(self, row: dict) -> None:
        size = os.path.getsize(self.path)
        try:
            with writing(self.path), open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=COLUMNS).writerow(
                    {k: _cell(row.get(k)) for k in COLUMNS})
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with open(self.path, "r+b") as f:  # no half row left behind (a full disk)
                f.truncate(size)
            raise
        if self.writer is not None:
            for k in COLUMNS[1:]:
                v = row.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not enabled, desc="distill")


def bar_postfix(metrics: dict) -> dict:
    keys = (("e_latentlpips", "lpips"), ("g_gan", "g_gan"), ("d_loss", "d"))
    return {short: f"{metrics[k]:.4f}" for k, short in keys if metrics.get(k) is not None}


# ------------------------------------------------------------------------------ sample grids
def image_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> one [3, rows*H, columns*W] image."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.ones(c, rows * h, columns * w, dtype=images.dtype)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = images[i]
    return grid


def save_png(image: torch.Tensor, path: str) -> None:
    """A [3, H, W] image in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = io.BytesIO()
    Image.fromarray(array).save(data, format="PNG")
    atomic_write_bytes(path, data.getvalue())  # a full disk leaves no partial PNG


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Teacher-space latents [N, C, h, w] -> images [N, 3, H, W] in [0, 1] through the VAE,
    undoing its scaling (and shift, when the VAE has one) as the diffusers pipelines do."""
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        x = vae.decode((latents / scale + shift).to(next(vae.parameters()).dtype)).sample
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()
