"""The trainer's full distillation step on synthetic batches: one call = one optimiser step.

A step is :func:`d2g_fast.train.train_step`: G forward + backward (E-LatentLPIPS + GAN loss),
D forward + backward, AdamW on both, the EMA; lazy R1 on every ``r1_interval``-th step. The
teacher is the architecture built from its configs with random weights; E-LatentLPIPS is random
(``lpips_random``): speed does not depend on weights. Kernels: "fused" lets every op pick its
fastest backend; "ref" sets ``D2G_IMPL=ref`` while the run is built and timed (the dispatch reads
it at every call), so every op runs its pure-PyTorch reference.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass

import torch

KERNELS = ("fused", "ref")


class Unavailable(Exception):
    """The trainer cannot run here; the reason is the message."""


@dataclass
class StepTiming:
    plain_s: float            # median seconds of a step without R1
    r1_s: float | None        # seconds of one R1 step (None: R1 off)
    r1_interval: int
    peak_mem_gb: float | None  # CUDA peak allocated over the timed steps (weights included)
    batch: int

    @property
    def amortized_s(self) -> float:
        """Seconds per step averaged over an R1 interval (one R1 step in ``r1_interval``)."""
        if self.r1_s is None:
            return self.plain_s
        return self.plain_s + (self.r1_s - self.plain_s) / self.r1_interval

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.amortized_s


@contextlib.contextmanager
def kernels(choice: str):
    """``D2G_IMPL=ref`` inside for "ref"; the environment as it was for "fused"."""
    if choice not in KERNELS:
        raise ValueError(f"kernels: one of {KERNELS}, got {choice!r}")
    saved = os.environ.get("D2G_IMPL")
    if choice == "ref":
        os.environ["D2G_IMPL"] = "ref"
    elif saved is not None:
        os.environ.pop("D2G_IMPL")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("D2G_IMPL", None)
        else:
            os.environ["D2G_IMPL"] = saved


def trainer_api():
    """(TrainConfig, build_run, train_step) of :mod:`d2g_fast.train`; Unavailable if missing."""
    try:
        from d2g_fast.train import TrainConfig, build_run, train_step
    except ImportError as exc:
        raise Unavailable(f"the trainer (d2g_fast.train) is not importable: {exc}") from None
    return TrainConfig, build_run, train_step


def synthetic_batch(arch: str, batch: int, seed: int = 0) -> dict:
    """A batch of the trainer's shape: noise, teacher latent [batch, C, h, w], prompts."""
    from d2g_fast.bench import archs
    from d2g_fast.data.prompts import load_prompts

    shape = archs.latent_shape(arch)
    gen = torch.Generator().manual_seed(seed)
    return {"noise": torch.randn(batch, *shape, generator=gen),
            "latent": torch.randn(batch, *shape, generator=gen),
            "prompt": (load_prompts(None) * batch)[:batch]}


def build_step(arch: str, *, device: str, batch: int, precision: str,
               gradient_checkpointing: bool = False, seed: int = 0):
    """Build a run of ``arch`` and return (step_fn(step) -> metrics, run).

    Args:
        arch: one of :data:`d2g_fast.bench.archs.ARCHS`; batch: micro-batch (one process);
        precision: "bf16" or "fp32" (the trainer's --precision).
    Raises:
        Unavailable: the trainer is not importable.
    """
    from d2g_fast.bench import archs

    TrainConfig, build_run, train_step = trainer_api()
    comps = archs.components(arch, device="cpu" if arch.startswith("tiny") else device,
                             seed=seed)
    teacher = archs.teacher(arch, comps)
    config = TrainConfig(batch_size=batch, precision=precision, lpips_random=True,
                         lpips_encoder=archs.ARCH_INFO[arch].lpips_encoder,
                         gradient_checkpointing=gradient_checkpointing, device=device,
                         progress=False, seed=seed)
    from d2g_fast.bench.collect_speed import GUIDANCE

    # The collection guidance of the timed pairs (FLUX-dev's G embeds it; others ignore it).
    run = build_run(config, teacher=teacher, dataset=None, device=device, guidance=GUIDANCE)
    data = synthetic_batch(arch, batch, seed)

    def step_fn(step: int) -> dict:
        return train_step(run, data, step)
    return step_fn, run


def time_steps(step_fn, run, *, device: str, quick: bool) -> StepTiming:
    """Time plain steps (median) and one R1 step of a built run."""
    from d2g_fast.bench.timing import measure

    interval = max(1, int(run.config.r1_interval))
    r1_on = run.config.r1_gamma > 0
    plain_steps = (s for s in itertools.count(1) if not (r1_on and s % interval == 0))
    plain = measure(lambda: step_fn(next(plain_steps)), device, warmup=1,
                    min_reps=2 if quick else 3, min_time_s=0.2 if quick else 1.0)
    r1_s = None
    if r1_on:
        r1 = measure(lambda: step_fn(interval), device, warmup=0, min_reps=1, min_time_s=0.0)
        r1_s = r1.median_s
    peaks = [p for p in (plain.peak_mem_gb, r1.peak_mem_gb if r1_on else None) if p is not None]
    return StepTiming(plain.median_s, r1_s, interval, max(peaks) if peaks else None,
                      run.config.batch_size)


def measure_train_step(arch: str, *, device: str, batch: int, precision: str, kernels_choice: str,
                       gradient_checkpointing: bool = False, quick: bool = False) -> StepTiming:
    """Build and time the full step with the given kernels ("fused" or "ref")."""
    from d2g_fast.bench.timing import free_memory

    with kernels(kernels_choice):
        step_fn, run = build_step(arch, device=device, batch=batch, precision=precision,
                                  gradient_checkpointing=gradient_checkpointing)
        try:
            return time_steps(step_fn, run, device=device, quick=quick)
        finally:
            del step_fn, run
            free_memory(device)


def largest_batch(arch: str, *, device: str, precision: str, gradient_checkpointing: bool,
                  start: int = 8, limit: int = 512) -> int:
    """The largest per-device batch (doubling from ``start``, then bisecting) whose step runs
    without running out of CUDA memory; 0 if even ``start`` does not fit. GPU only."""
    if not device.startswith("cuda"):
        raise ValueError("largest_batch: a CUDA device is needed (out-of-memory search)")
    from d2g_fast.bench.timing import free_memory

    def fits(b: int) -> bool:
        try:
            step_fn, run = build_step(arch, device=device, batch=b, precision=precision,
                                      gradient_checkpointing=gradient_checkpointing)
            step_fn(1)
            step_fn(run.config.r1_interval)  # the R1 step holds the most
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            step_fn = run = None  # noqa: F841 (drop the references before freeing)
            free_memory(device)

    good, bad = 0, None
    b = start
    while b <= limit and fits(b):
        good, b = b, b * 2
    bad = b if b <= limit else None
    while bad is not None and bad - good > max(1, good // 8):
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good
