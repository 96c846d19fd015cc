"""Train the latent VGG16-BN trunk of a LatentLPIPS as a classifier on VAE latents.

The paper trained the trunk as an ImageNet classifier on VAE latents (paper notes, section 2);
this module does the same on any labelled latents: :class:`LatentVGGClassifier` is the
:class:`d2g_fast.nn.LatentVGG16BN` layout (any latent channel count, any ``width_div``) plus a
global-average-pool + linear classifier head, trained in train mode (BatchNorm batch
statistics, running statistics updated) with cross-entropy.

The output is our safetensors trunk file (see :mod:`d2g_fast.nn.elatentlpips_io`): the trunk
under ``net.*`` (it loads strictly into ``LatentVGG16BN`` / ``ELatentLPIPS(trunk_path=...)``),
the classifier under ``classifier.*``, and the encoder name, latent channels, width, VAE
normalisation and held-out top-1 in the metadata.

Training is a fixed number of optimizer steps. Batches are drawn from a per-epoch permutation
seeded by (seed, epoch) and the learning rate is a function of the step, so a run resumed from a
checkpoint (model, optimizer, step) continues exactly as the uninterrupted run would (CPU fp32,
same thread count). Under ``torchrun`` (WORLD_SIZE > 1) it runs DistributedDataParallel (gloo on
the CPU, nccl on CUDA): each rank takes its share of every global batch; rank 0 writes files.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2g_fast.nn import elatentlpips_io as io
from d2g_fast.nn.latent_vgg import LatentVGG16BN, check_width_div

PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "sgd")
# Share of the steps spent warming the learning rate up linearly (then cosine decay to 0).
WARMUP_FRACTION = 0.05
LOSS_REPORT_EVERY = 10
# A checkpoint records these settings; resuming with different ones is refused.
RESUME_KEYS = ("latent_shape", "num_classes", "num_samples", "width_div", "batch_size", "steps",
               "lr", "weight_decay", "optimizer", "momentum", "precision", "val_fraction", "seed",
               "flip", "world_size")


class LatentVGGClassifier(nn.Module):
    """The latent VGG16-BN trunk plus a classifier head (global average pool, linear)."""

    def __init__(self, latent_channels: int, num_classes: int, width_div: int = 1):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"LatentVGGClassifier: num_classes must be >= 2, got {num_classes}")
        self.net = LatentVGG16BN(latent_channels, requires_grad=True, width_div=width_div)
        self.classifier = nn.Linear(self.net.tap_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) of latents (N, C, H, W)."""
        h = x
        for block in self.net.slices:
            h = block(h)
        return self.classifier(h.mean(dim=(2, 3)))


@dataclass
class TrunkSettings:
    """Hyper-parameters of :func:`train_trunk` (see its docstring)."""

    width_div: int = 1
    batch_size: int = 64
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    precision: str = "fp32"
    val_fraction: float = 0.1
    seed: int = 0
    flip: bool = True
    channels_last: bool | None = None
    checkpoint_every: int = 0

    def check(self) -> None:
        for name in ("batch_size", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train_trunk: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"train_trunk: checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not self.lr > 0:
            raise ValueError(f"train_trunk: lr must be > 0, got {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"train_trunk: val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train_trunk: precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_width_div(self.width_div, "train_trunk")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train_trunk: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


def learning_rate(step: int, steps: int, base_lr: float) -> float:
    """Linear warm-up over the first WARMUP_FRACTION of the steps, then cosine decay to 0."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_indices(num_samples: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) sample indices: a seeded permutation, the first share held out."""
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(num_samples * val_fraction))
    if val_fraction > 0 and num_samples > 1:
        n_val = min(max(n_val, 1), num_samples - 1)
    return perm[n_val:], perm[:n_val]


def epoch_order(train_idx: torch.Tensor, epoch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training order of ``epoch`` and its horizontal-flip draws, both from (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    order = train_idx[torch.randperm(len(train_idx), generator=g)]
    flips = torch.rand(len(train_idx), generator=g) < 0.5
    return order, flips


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this call created the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on the CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist  # noqa: PLC0415

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), owns)


def _barrier(d: _Dist) -> None:
    if d.world_size > 1:
        import torch.distributed as dist  # noqa: PLC0415
        dist.barrier()


def _finish_distributed(d: _Dist) -> None:
    _barrier(d)
    if d.owns_group:
        import torch.distributed as dist  # noqa: PLC0415
        dist.destroy_process_group()


def make_optimizer(model: nn.Module, s: TrunkSettings, plain: bool = False) -> torch.optim.Optimizer:
    """The optimizer of ``s``: fused (one kernel for all parameters) in our path, the
    per-parameter loop with ``plain``."""
    kw = {"foreach": False} if plain else {"fused": True}
    if s.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                               weight_decay=s.weight_decay, **kw)
    return torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, **kw)


def memory_format_for(s: TrunkSettings, device: torch.device) -> torch.memory_format:
    """channels_last on CUDA and with bf16 (cuDNN / oneDNN NHWC kernels), unless set."""
    channels_last = s.channels_last
    if channels_last is None:
        channels_last = device.type == "cuda" or s.precision == "bf16"
    return torch.channels_last if channels_last else torch.contiguous_format


def training_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  precision: str) -> torch.Tensor:
    """One optimizer step of cross-entropy on (x, y); returns the loss (a 0-d tensor)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _save_atomic(obj, path: Path) -> None:
    """Write, record the sha256 and size beside it (``<ckpt>.sha256.json``), rename. A kill
    during the write leaves the previous checkpoint intact; a full disk leaves no partial file."""
    from d2g_fast.runtime.checksums import write_file_record  # noqa: PLC0415
    from d2g_fast.runtime.diskspace import writing  # noqa: PLC0415

    tmp = path.with_name(path.name + ".tmp")
    with writing(str(tmp), cleanup=[str(tmp)]):
        torch.save(obj, str(tmp))
        write_file_record(str(tmp), str(path))
    os.replace(tmp, path)


def _resume_settings(s: TrunkSettings, latents: torch.Tensor, num_classes: int, world: int) -> dict:
    d = asdict(s)
    d.update(latent_shape=list(latents.shape[1:]), num_classes=num_classes,
             num_samples=len(latents), world_size=world)
    return {k: d[k] for k in RESUME_KEYS}


def _load_resume(path: Path, expected: dict, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    from d2g_fast.runtime.checksums import verify_file  # noqa: PLC0415

    problems = verify_file(str(path))
    if problems:  # never train on from damaged weights
        raise ValueError(f"train_trunk: checkpoint {str(path)!r} is damaged ({'; '.join(problems)})"
                         f"; nothing was loaded. Delete it (and its .sha256.json) to start afresh")
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    saved = ckpt.get("settings", {})
    diff = [f"{k}: {saved.get(k)!r} vs {v!r}" for k, v in expected.items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"train_trunk: checkpoint {str(path)!r} was made with other settings "
                         f"({'; '.join(diff)}); delete it, or pass another checkpoint path, to "
                         "start afresh")
    model.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["optimizer"])
    return int(ckpt["step"])


def _preempted() -> bool:
    from d2g_fast.runtime.signals import requested_on_any_rank  # noqa: PLC0415

    return requested_on_any_rank()


@torch.no_grad()
def top1_accuracy(model: nn.Module, latents: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 256, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in % of ``model`` (eval mode: BatchNorm running statistics)."""
    if len(latents) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(latents), batch_size):
        x = latents[i:i + batch_size].to(device)
        correct += int((model(x).argmax(dim=1).cpu() == labels[i:i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(latents)


def check_training_data(latents: torch.Tensor, labels: torch.Tensor) -> int:
    """Validate (latents (N, C, H, W) float, labels (N,) int in [0, K)); returns K."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or not latents.is_floating_point():
        raise ValueError("train_trunk: latents must be a float tensor (N, C, H, W), got "
                         f"{getattr(latents, 'shape', type(latents))}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or len(labels) != len(latents):
        raise ValueError(f"train_trunk: labels must be a 1-D tensor of {len(latents)} class indices, "
                         f"got {getattr(labels, 'shape', type(labels))}")
    if labels.is_floating_point() or (len(labels) and int(labels.min()) < 0):
        raise ValueError("train_trunk: labels must be non-negative integer class indices")
    from d2g_fast.nn.elatentlpips import MIN_SPATIAL  # noqa: PLC0415

    if latents.shape[2] < MIN_SPATIAL or latents.shape[3] < MIN_SPATIAL:
        raise ValueError(f"train_trunk: latents must be at least {MIN_SPATIAL}x{MIN_SPATIAL} "
                         f"(the trunk's two max-pools), got {tuple(latents.shape[2:])}")
    if not torch.isfinite(latents).all():
        raise ValueError("train_trunk: latents contain NaN or Inf values")
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    if num_classes < 2:
        raise ValueError(f"train_trunk: need at least 2 classes, got {num_classes}")
    return num_classes


def train_trunk(latents: torch.Tensor, labels: torch.Tensor, output: str | os.PathLike, *,
                encoder: str, normalization: tuple[float, float] | None = None,
                settings: TrunkSettings | None = None, checkpoint: str | os.PathLike | None = None,
                device: str | torch.device = "cpu", progress: bool = True,
                on_checkpoint: Callable[[int], None] | None = None, **overrides) -> Path:
    """Train a latent VGG16-BN classifier and write the trunk file ``output`` (safetensors).

    Args:
        latents: (N, C, H, W) float latents in model space (already scaled as the generator's
            latents are; H, W >= 4). Any C.
        labels: (N,) int64 class indices 0..K-1.
        output: path of the trunk file to write.
        encoder: name recorded for the latent space (e.g. "my-vae"; the five official names too).
        normalization: (shift, scale) of the VAE (x_model = (x_raw - shift) * scale), recorded
            for ``normalize=True``; default: the official values of a known encoder name, else
            required.
        settings: :class:`TrunkSettings`; keyword ``overrides`` replace its fields
            (``steps=200, width_div=8, ...``).
        checkpoint: resume/checkpoint file (default ``<output>.ckpt``); an existing one is
            resumed (refused when its settings differ). Written every ``checkpoint_every``
            steps (0: only at the end).
        device: "cpu" or "cuda[:i]" (under torchrun, the local rank's GPU).
        progress: show a tqdm bar (rank 0).
        on_checkpoint: called with the step after each checkpoint is written.

    Returns:
        The path of the trunk file (metadata ``top1``: held-out top-1 in %, "nan" without a
        held-out split).
    """
    from d2g_fast.nn.elatentlpips import ENCODER_NORMALIZATION  # noqa: PLC0415

    s = asdict(settings or TrunkSettings())
    unknown = sorted(set(overrides) - set(s))
    if unknown:
        raise ValueError(f"train_trunk: unknown setting(s) {unknown}; TrunkSettings has {sorted(s)}")
    s = TrunkSettings(**{**s, **overrides})
    s.check()
    num_classes = check_training_data(latents, labels)
    if normalization is None:
        normalization = ENCODER_NORMALIZATION.get(encoder)
        if normalization is None:
            raise ValueError(f"train_trunk: encoder {encoder!r} is not an official one: pass "
                             "normalization=(shift, scale) of its VAE (--shift/--scale, or --vae)")
    output = Path(output)
    checkpoint = Path(checkpoint) if checkpoint is not None else output.with_name(output.name + ".ckpt")
    device = torch.device(device)
    dist = _init_distributed(device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    memory_format = memory_format_for(s, device)

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(s.seed)
        model = LatentVGGClassifier(latents.shape[1], num_classes, s.width_div)
    model = model.to(device, memory_format=memory_format).train()
    opt = make_optimizer(model, s)
    resume_settings = _resume_settings(s, latents, num_classes, dist.world_size)
    start = _load_resume(checkpoint, resume_settings, model, opt) if checkpoint.is_file() else 0
    ddp = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    train_idx, val_idx = split_indices(len(latents), s.val_fraction, s.seed)
    batch = min(s.batch_size, len(train_idx))
    if batch < dist.world_size:
        raise ValueError(f"train_trunk: batch_size {batch} is smaller than the {dist.world_size} ranks")
    per_epoch = len(train_idx) // batch
    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = tqdm(total=s.steps, initial=start, disable=not (progress and dist.main),
               desc="train-trunk", unit="step")
    order_epoch, order, flips = -1, None, None
    loss_value = float("nan")
    for step in range(start, s.steps):
        epoch, pos = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, flips = epoch_order(train_idx, epoch, s.seed)
            order_epoch = epoch
        sl = slice(pos * batch, (pos + 1) * batch)
        # This rank's share of the global batch.
        idx, flip = order[sl][dist.rank::dist.world_size], flips[sl][dist.rank::dist.world_size]
        x = latents[idx]
        if s.flip:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = labels[idx].to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, s.steps, s.lr)
        loss = training_step(ddp, opt, x, y, s.precision)
        done = step + 1
        bar.update(1)
        if done % LOSS_REPORT_EVERY == 0 or done == s.steps:  # .item() waits for the device
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if (s.checkpoint_every and done % s.checkpoint_every == 0) or done == s.steps:
            if dist.main:
                _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "step": done, "settings": resume_settings}, checkpoint)
            _barrier(dist)
            if on_checkpoint is not None:
                on_checkpoint(done)
        elif done < s.steps and _preempted():  # collective: every rank asks after each step
            if dist.main:
                _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "step": done, "settings": resume_settings}, checkpoint)
            bar.close()
            from d2g_fast.runtime.signals import Preempted, resume_line  # noqa: PLC0415
            raise Preempted(resume_line("d2g lpips train-trunk", f"checkpoint {checkpoint} (step "
                                        f"{done} of {s.steps}) written") if dist.main else "")
    bar.close()

    if dist.main:
        top1 = top1_accuracy(model, latents[val_idx], labels[val_idx], device=device)
        io.save_trunk_safetensors(model.net, model.classifier, output, {
            "encoder": encoder, "latent_channels": latents.shape[1], "width_div": s.width_div,
            "shift": repr(float(normalization[0])), "scale": repr(float(normalization[1])),
            "net": "vgg16", "top1": f"{top1:.4f}", "num_classes": num_classes,
            "steps": s.steps, "final_loss": f"{loss_value:.6g}"})
    _finish_distributed(dist)
    return output


def trunk_info(path: str | os.PathLike) -> dict:
    """The metadata of a trunk (or module) safetensors file, as strings."""
    return io.read_safetensors_metadata(path)
