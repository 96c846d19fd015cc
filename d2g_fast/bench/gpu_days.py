"""``d2g bench gpu-days``: what a whole distillation costs on this device, and what each
optimisation saves, measured.

Stages (each prints its progress):
  0. memory: the model state per GPU (G, EMA, D, AdamW states, teacher) replicated and under
     FSDP2, from the parameter counts of meta-device networks built from the published configs
     (d2g_fast.bench.memory; no weights, no device memory: runs anywhere, for every arch);
     then each memory lever's predicted peak per GPU (full training, LoRA student, light D,
     both, gradient checkpointing, FSDP2 over 8 GPUs) from ``d2g plan`` (d2g_fast.plan: the
     trainer's step simulated on fake tensors; minutes of CPU for the large teachers;
     ``--no-levers`` skips it);
  1. collection: pairs/s of ODE-pair collection, our Teacher against diffusers' pipeline loop
     (and CUDA graphs / torch.compile of our UNet where the device allows);
  2. loss: E-LatentLPIPS against pixel LPIPS with VAE decoding, forward + backward;
  3. training: samples/s and peak memory of the trainer's full step, fused kernels against the
     reference ops (``D2G_IMPL=ref``), bf16 against fp32;
  4. the report: device-days of the recipe (``--pairs`` pairs at ``--steps`` steps, ``--iters``
     iterations at global batch ``--batch``), the saving of each optimisation, and the paper's and
     peers' published costs (cited, on their hardware).

Every row of the output is ``measured`` (in this run, on this device), ``cited`` (with its source)
or ``derived`` (computed from the named rows; extrapolations say from what).
"""
from __future__ import annotations

import datetime as dt
import os
import sys
import time
from dataclasses import dataclass

import torch

from d2g_fast.bench.machine import device_name, git_revision  # noqa: F401 (re-exported)

SECONDS_PER_DAY = 86400.0
# Real-size transformer architectures: only their memory rows (meta device) run on a CPU.
CPU_UNTIMED = ("sd3-medium", "flux-dev")
SOURCES = ("measured", "cited", "derived")


@dataclass
class Row:
    """One figure of the report."""
    name: str          # unique id; derived rows name the rows they are computed from
    section: str       # collection | training | loss | recipe | savings | published
    quantity: str      # what the value is, in words
    value: float | None
    unit: str
    source: str        # measured | cited | derived
    detail: str        # how: the measurement, the citation, or the formula

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"Row {self.name!r}: source must be one of {SOURCES}, "
                             f"got {self.source!r}")


# The paper's and peers' published costs (paper-notes section 5), on their own hardware.
# (name, quantity, value, unit, source)
PUBLISHED = (
    ("published.dmd2_sd15", "DMD2, SD1.5 one-step: 64 A100 x ~26 h (FID 8.35, COCO-30k 256 px)",
     64 * 26 / 24, "A100-days",
     "Yin et al., Improved Distribution Matching Distillation (DMD2), arXiv 2405.14867"),
    ("published.dmd2_sdxl", "DMD2, SDXL: 64 GPUs x 57 h", 64 * 57 / 24, "GPU-days",
     "Yin et al., DMD2, arXiv 2405.14867"),
    ("published.instaflow", "InstaFlow-0.9B, SD1.5 one-step: total training", 199.0, "A100-days",
     "Liu et al., InstaFlow, arXiv 2309.06380 (also quoted by Kang et al. 2024)"),
    ("published.lcm", "LCM, SD one-to-four-step: 32 A100 GPU-hours", 32 / 24, "A100-days",
     "Luo et al., Latent Consistency Models, arXiv 2310.04378"),
    ("published.d2g_bound", "Diffusion2GAN SD1.5 incl. ODE dataset: fewer GPU-days than "
     "InstaFlow's 199 (an upper bound; hardware 64 A100-80GB, batch 1024)", 199.0, "A100-days",
     "Kang et al., Distilling Diffusion Models into Conditional GANs, arXiv 2405.05967"),
    ("published.d2g_loss_pixel", "pixel LPIPS + VAE decode per iteration (A100, batch not stated)",
     117.0, "ms", "Kang et al. 2024, project page (decode 78.7 ms + LPIPS 38.3 ms)"),
    ("published.d2g_loss_elatent", "E-LatentLPIPS per iteration (A100, batch not stated)", 12.1,
     "ms", "Kang et al. 2024, project page (augment 3.7 ms + LatentLPIPS 8.4 ms)"),
)


@dataclass
class Settings:
    """The command's arguments, checked."""
    arch: str
    out: str
    pairs: float = 3e6
    steps: int = 50
    iters: int = 20000
    batch: int = 1024
    quick: bool = False
    device: str = "auto"
    guidance: float = 8.0
    collect_batch: int | None = None
    train_batch: int | None = None
    compile: bool = False
    levers: bool = True  # --no-levers: skip the memory levers' plan stage (measure_levers)

    def check(self) -> "Settings":
        from d2g_fast.bench.archs import check_arch

        check_arch(self.arch)
        for name in ("pairs", "steps", "iters", "batch"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} (--{name}): must be > 0, got {getattr(self, name)!r}")
        for name in ("collect_batch", "train_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}): must be >= 1, got {value}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device (--device): {self.device!r} asked for but no GPU is visible")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device (--device): 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise NotADirectoryError(f"out (--out): {self.out!r} exists and is not a folder")
        if self.compile and not self.gpu:
            raise ValueError("compile (--compile): torch.compile of the UNet is measured on GPUs "
                             "only")
        return self

    def command(self) -> str:
        """The command line that reproduces this run."""
        parts = [f"d2g bench gpu-days --arch {self.arch} --out {self.out}",
                 f"--pairs {self.pairs:g} --steps {self.steps} --iters {self.iters}",
                 f"--batch {self.batch} --device {self.device} --guidance {self.guidance:g}"]
        if self.collect_batch:
            parts.append(f"--collect-batch {self.collect_batch}")
        if self.train_batch:
            parts.append(f"--train-batch {self.train_batch}")
        parts += [flag for flag, on in (("--quick", self.quick), ("--compile", self.compile),
                                        ("--no-levers", not self.levers)) if on]
        return " ".join(parts)

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def precision(self) -> str:
        """The precision of "ours": bf16 on GPUs; fp32 on CPUs (no bf16 matrix units there)."""
        return "bf16" if self.gpu else "fp32"

    @property
    def few_repeats(self) -> bool:
        """Time with the fewest repeats: --quick, and the tiny models (a functional check)."""
        return self.quick or self.arch.startswith("tiny")

    @property
    def measured_steps(self) -> int:
        """Sampler steps actually timed (--quick and tiny time 10 and extrapolate: the cost per
        step is the same at every step of DDIM)."""
        return min(self.steps, 10) if self.few_repeats else self.steps

    def default_collect_batch(self) -> int:
        if self.collect_batch:
            return self.collect_batch
        if not self.gpu:
            return 4
        return {"sdxl": 4, "sd3-medium": 4, "flux-dev": 2}.get(self.arch, 16)

    def default_train_batch(self) -> int:
        if self.train_batch:
            return self.train_batch
        tiny = {"tiny": 4, "tiny-sd3": 4, "tiny-flux": 4}
        return {"sd15": 8, "sd21": 4, "sdxl": 2, "sd3-medium": 1, "flux-dev": 1, **tiny}[
            self.arch] if self.gpu else tiny.get(self.arch, 1)


class Progress:
    """Per-stage progress lines on stderr, with elapsed time."""

    def __init__(self, total: int):
        self.total, self.k, self.t0 = total, 0, time.perf_counter()
        self.omitted: list[str] = []   # what could not be measured here, and why

    def omit(self, what: str) -> None:
        self.omitted.append(what)
        self.note(f"  {what}")

    def stage(self, what: str) -> None:
        self.k += 1
        self.note(f"[stage {self.k}/{self.total}] {what}")

    def note(self, what: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {what}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ measuring
def _where(s: Settings) -> str:
    return f"{device_name(s.device)}, torch {torch.__version__}"


def _sampler(arch: str) -> str:
    from d2g_fast.bench import archs

    return "flow-matching Euler" if archs.ARCH_INFO[arch].prediction_type == "flow" else "DDIM"


def measure_memory(s: Settings, progress: Progress) -> list[Row]:
    """Stage 0: parameter counts and model-state memory per GPU (see d2g_fast.bench.memory)."""
    from d2g_fast.bench.memory import memory_rows

    rows = memory_rows(s.arch, Row)
    for r in rows:
        if r.unit == "GiB":
            progress.note(f"  {r.name}: {r.value:.3g} GiB")
    return rows


LORA_RANK = 64
"""The LoRA rank of the lever rows (LCM-LoRA's for SD1.5/SDXL)."""
# (lever, d2g plan flags, TrainConfig overrides, gradient checkpointing)
LEVER_PLANS = (
    ("full", "", {}, False),
    ("lora", f"--lora-rank {LORA_RANK}", {"lora_rank": LORA_RANK}, False),
    ("light-d", "--light-d", {"light_d": True}, False),
    ("lora+light-d", f"--lora-rank {LORA_RANK} --light-d",
     {"lora_rank": LORA_RANK, "light_d": True}, False),
    ("checkpointing", "--gradient-checkpointing", {}, True),
)
LEVER_GPUS = 8       # the FSDP row: the full run sharded over this many GPUs
LEVER_GPU_GB = 80.0  # the GPUs the lever rows are planned for


def measure_levers(s: Settings, progress: Progress) -> list[Row]:
    """Stage 0b: the predicted peak memory per GPU of each memory lever, from ``d2g plan``
    (the trainer's R1 step simulated on fake tensors: d2g_fast.plan), at the training batch of
    the timed rows, bf16, on 80 GB GPUs; the FSDP row reuses the full run's simulation."""
    from d2g_fast.plan.planner import GIB, PlanRequest, plan, simulate
    from d2g_fast.train.config import TrainConfig

    batch = s.default_train_batch()
    rows, full = [], None
    for lever, flags, overrides, ckpt in LEVER_PLANS:
        if any(k not in TrainConfig.__dataclass_fields__ for k in overrides):
            progress.omit(f"memory.plan.{lever}: the trainer has no {flags} yet")
            continue
        req = PlanRequest(s.arch, batch_size=batch, gpu_memory_gb=LEVER_GPU_GB,
                          gradient_checkpointing=ckpt, precision="bf16", options=overrides)
        simulated = simulate(req)
        requests = [(lever, flags, req)]
        if lever == "full":
            sharded = PlanRequest(s.arch, batch_size=batch, gpus=LEVER_GPUS, fsdp=True,
                                  gpu_memory_gb=LEVER_GPU_GB, precision="bf16")
            requests.append((f"fsdp{LEVER_GPUS}", f"--gpus {LEVER_GPUS} --fsdp", sharded))
        for name, flags_of, request in requests:
            result = plan(request, timeline=simulated[0], state=simulated[1],
                          counts=simulated[2])
            command = (f"d2g plan --arch {s.arch} --batch-size {batch} --precision bf16 "
                       f"{flags_of}").strip()
            versus = "" if full is None else \
                f"; {result.peak / full.peak:.2f}x memory.plan.full"
            rows.append(Row(
                f"memory.plan.{name}", "memory",
                f"predicted peak memory per GPU, {name} (micro-batch {batch}, bf16)",
                result.peak / GIB, "GiB", "derived",
                f"{command}: {'fits' if result.fits else 'does NOT fit'} a "
                f"{LEVER_GPU_GB:g} GB GPU, largest batch {result.largest_batch}; G "
                f"{result.params['g_trainable'] / 1e6:.1f} M of memory.params.generator "
                f"trained{versus}"))
            if name == "full":
                full = result
            progress.note(f"  memory.plan.{name}: {result.peak / GIB:.3g} GiB")
    return rows


def measure_collection(s: Settings, progress: Progress) -> list[Row]:
    """Stage 1: seconds per batch of each collection provider (measured rows)."""
    from d2g_fast.bench import archs
    from d2g_fast.bench.collect_speed import (PROVIDERS, Unavailable, make_collect_fn,
                                              unavailable_reason)
    from d2g_fast.bench.timing import free_memory, measure

    dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    batch, steps = s.default_collect_batch(), s.measured_steps
    rows = []
    for provider in PROVIDERS:
        if provider == "ours-compiled" and not s.compile:
            progress.omit("collection ours-compiled: not measured (opt-in with --compile: "
                          "compiling a full UNet takes about a minute)")
            continue
        reason = unavailable_reason(provider, s.device)
        if reason:
            progress.omit(f"collection {provider}: not measured ({reason})")
            continue
        progress.note(f"  collection {provider}: batch {batch}, {steps} steps ...")
        comps = archs.components(s.arch, device=s.device, dtype=dtype)
        try:
            fn = make_collect_fn(provider, comps, device=s.device, batch=batch, steps=steps,
                                 guidance=s.guidance, pipeline_cls=archs.pipeline_class(s.arch),
                                 resolution=archs.resolution(s.arch))
        except Unavailable as exc:
            progress.omit(f"collection {provider}: not measured ({exc})")
            continue
        t = measure(fn, s.device, warmup=1, min_reps=2 if s.few_repeats else 3,
                    min_time_s=0.2 if s.few_repeats else 1.0)
        del fn, comps
        free_memory(s.device)
        rate = batch / t.median_s
        progress.note(f"  collection {provider}: {rate:.3g} pairs/s")
        rows.append(Row(
            f"collect.{provider}", "collection",
            f"ODE-pair collection, {provider}: pairs/s at {steps} steps", rate, "pairs/s",
            "measured", f"{archs.ARCH_INFO[s.arch].description} {s.precision}, batch {batch}, "
            f"{steps} {_sampler(s.arch)} steps, guidance {s.guidance:g}; median of {t.reps} "
            f"batches; "
            f"{_where(s)}"))
    return rows


def measure_training(s: Settings, progress: Progress) -> list[Row]:
    """Stage 2: the trainer's full step, fused kernels vs reference ops, bf16 vs fp32."""
    from d2g_fast.bench import archs
    from d2g_fast.bench.train_speed import Unavailable, measure_train_step

    batch = s.default_train_batch()
    variants = [("fused", s.precision), ("ref", s.precision)]
    if s.precision == "bf16":
        variants.append(("fused", "fp32"))
    else:
        progress.omit("bf16 training: not measured (fp32 is the precision of CPU runs)")
    rows = []
    for kernels, precision in variants:
        progress.note(f"  train step, {kernels} kernels, {precision}: batch {batch} ...")
        try:
            t = measure_train_step(s.arch, device=s.device, batch=batch, precision=precision,
                                   kernels_choice=kernels, quick=s.few_repeats)
        except Unavailable as exc:
            progress.omit(f"training step: not measured ({exc})")
            return rows
        except torch.cuda.OutOfMemoryError:
            from d2g_fast.bench.timing import free_memory

            free_memory(s.device)
            progress.omit(f"training step, {kernels} kernels, {precision}: out of memory on one "
                          f"device at micro-batch {batch} (replicated; see the memory rows for "
                          f"FSDP)")
            continue
        progress.note(f"  train step, {kernels} kernels, {precision}: "
                      f"{t.samples_per_s:.3g} samples/s")
        how = (f"{archs.ARCH_INFO[s.arch].description}, d2g_fast.train.train_step (G and D "
               f"fwd+bwd, AdamW, EMA) at micro-batch {batch} on one device, "
               f"{'D2G_IMPL=ref' if kernels == 'ref' else 'fused kernels (impl auto)'}; step "
               f"time = median plain step {t.plain_s:.4g} s + (one R1 step {t.r1_s or 0:.4g} s "
               f"- plain) / {t.r1_interval}; {_where(s)}")
        key = f"train.{kernels}.{precision}"
        rows.append(Row(key, "training", f"training samples/s, {kernels} kernels, {precision}",
                        t.samples_per_s, "samples/s", "measured", how))
        if t.peak_mem_gb is not None:
            rows.append(Row(f"{key}.peak_mem", "training",
                            f"training peak memory, {kernels} kernels, {precision}",
                            t.peak_mem_gb, "GiB", "measured",
                            f"torch.cuda.max_memory_allocated over the timed steps, weights and "
                            f"optimiser states included; {_where(s)}"))
    return rows


def measure_loss(s: Settings, progress: Progress) -> list[Row]:
    """Stage 3: the regression loss alone, E-LatentLPIPS vs decode + pixel LPIPS."""
    from d2g_fast.bench import archs
    from d2g_fast.bench.loss_speed import LOSSES, Unavailable, make_loss_fn
    from d2g_fast.bench.timing import free_memory, measure

    batch = s.default_train_batch()
    rows = []
    for loss in LOSSES:
        progress.note(f"  loss {loss}: batch {batch}, {s.precision} ...")
        try:
            fn = make_loss_fn(loss, s.arch, device=s.device, batch=batch, precision=s.precision)
        except Unavailable as exc:
            progress.omit(f"loss {loss}: not measured ({exc})")
            continue
        t = measure(fn, s.device, warmup=1, min_reps=2 if s.few_repeats else 3,
                    min_time_s=0.2 if s.few_repeats else 0.5)
        del fn
        free_memory(s.device)
        progress.note(f"  loss {loss}: {t.median_s * 1e3:.3g} ms")
        how = (f"forward + backward to the generated latent, batch {batch} "
               f"{'x'.join(map(str, archs.latent_shape(s.arch)))} latents, {s.precision}; "
               f"median of {t.reps}; {_where(s)}")
        rows.append(Row(f"loss.{loss}", "loss", f"{loss} fwd+bwd per batch", t.median_s * 1e3,
                        "ms", "measured", how))
        if t.peak_mem_gb is not None:
            rows.append(Row(f"loss.{loss}.peak_mem", "loss", f"{loss} peak memory",
                            t.peak_mem_gb, "GiB", "measured", how))
    return rows


# ------------------------------------------------------------------------------ deriving
def derive(s: Settings, measured: list[Row]) -> list[Row]:
    """Recipe device-days and savings from the measured rows (each row names its inputs)."""
    value = {r.name: r.value for r in measured}
    rows: list[Row] = []
    unit = f"{'GPU' if s.gpu else 'CPU'}-days ({device_name(s.device)})"
    ratio = s.steps / s.measured_steps
    extrapolated = (f"; extrapolated linearly from {s.measured_steps} measured steps to "
                    f"{s.steps}" if ratio != 1 else "")

    def collect_days(provider: str) -> float:
        return s.pairs * ratio / value[f"collect.{provider}"] / SECONDS_PER_DAY

    def train_days(key: str) -> float:
        return s.iters * s.batch / value[key] / SECONDS_PER_DAY

    # Collection of the recipe's pairs.
    collected = [p for p in ("diffusers", "ours", "ours-graphs", "ours-compiled")
                 if f"collect.{p}" in value]
    for p in collected:
        rows.append(Row(f"recipe.collect.{p}", "recipe",
                        f"collect {s.pairs:.3g} pairs at {s.steps} steps, {p}", collect_days(p),
                        unit, "derived", f"pairs / collect.{p}{extrapolated}"))
    ours_collect = [p for p in collected if p != "diffusers"]
    best_collect = min(ours_collect, key=lambda p: collect_days(p)) if ours_collect else None

    # Training of the recipe.
    scaling = (f"; {s.iters} iterations x global batch {s.batch} at the measured per-device "
               f"rate (micro-batch {s.default_train_batch()}), assuming perfect data-parallel "
               f"scaling (no communication cost)")
    ours_train = f"train.fused.{s.precision}"
    for key in ("train.fused.bf16", "train.ref.bf16", "train.fused.fp32", "train.ref.fp32"):
        if key in value:
            rows.append(Row(f"recipe.{key}", "recipe",
                            f"train {s.iters} iterations at batch {s.batch}, "
                            f"{key.split('.')[1]} kernels, {key.split('.')[2]}",
                            train_days(key), unit, "derived", f"{key}{scaling}"))

    # Totals: ours (fastest collection + fused kernels) and the plain stack (diffusers + ref ops).
    if best_collect and ours_train in value:
        rows.append(Row("recipe.total.ours", "recipe",
                        f"whole distillation, ours ({best_collect} collection + fused "
                        f"{s.precision} training)",
                        collect_days(best_collect) + train_days(ours_train), unit, "derived",
                        f"recipe.collect.{best_collect} + recipe.{ours_train}"))
    plain_train = f"train.ref.{s.precision}"
    if "collect.diffusers" in value and plain_train in value:
        rows.append(Row("recipe.total.plain", "recipe",
                        f"whole distillation, diffusers collection + reference ops "
                        f"({s.precision})",
                        collect_days("diffusers") + train_days(plain_train), unit, "derived",
                        f"recipe.collect.diffusers + recipe.{plain_train}"))

    rows += _savings(s, value, collect_days, train_days, best_collect, unit)
    return rows


def _savings(s, value, collect_days, train_days, best_collect, unit) -> list[Row]:
    """One row per optimisation measured: speed-up and device-days saved on the recipe."""
    rows = []

    def saving(name, what, base_days, fast_days, base_row, fast_row):
        rows.append(Row(f"saving.{name}", "savings", f"{what}: speed-up", base_days / fast_days,
                        "x", "derived", f"recipe.{base_row} / recipe.{fast_row}"))
        rows.append(Row(f"saving.{name}.days", "savings", f"{what}: device-days saved",
                        base_days - fast_days, unit, "derived",
                        f"recipe.{base_row} - recipe.{fast_row}"))

    if "collect.diffusers" in value and "collect.ours" in value:
        saving("collector", "our collector vs diffusers' pipeline loop",
               collect_days("diffusers"), collect_days("ours"), "collect.diffusers",
               "collect.ours")
    for option, provider in (("cuda_graphs", "ours-graphs"), ("compile", "ours-compiled")):
        if "collect.ours" in value and f"collect.{provider}" in value:
            saving(option, f"collection with {option.replace('_', ' ')}",
                   collect_days("ours"), collect_days(provider), "collect.ours",
                   f"collect.{provider}")
    p = s.precision
    if f"train.ref.{p}" in value and f"train.fused.{p}" in value:
        saving("fused_kernels", f"fused kernels vs reference ops (training, {p})",
               train_days(f"train.ref.{p}"), train_days(f"train.fused.{p}"),
               f"train.ref.{p}", f"train.fused.{p}")
    if "train.fused.fp32" in value and "train.fused.bf16" in value:
        saving("bf16", "bf16 vs fp32 (training, fused kernels)", train_days("train.fused.fp32"),
               train_days("train.fused.bf16"), "train.fused.fp32", "train.fused.bf16")
    if "loss.pixel-lpips" in value and "loss.e-latentlpips" in value:
        per_batch_ms = value["loss.pixel-lpips"] - value["loss.e-latentlpips"]
        batches = s.iters * s.batch / s.default_train_batch()
        rows.append(Row("saving.latent_loss", "savings",
                        "E-LatentLPIPS vs decode + pixel LPIPS (loss alone): speed-up",
                        value["loss.pixel-lpips"] / value["loss.e-latentlpips"], "x", "derived",
                        "loss.pixel-lpips / loss.e-latentlpips"))
        rows.append(Row("saving.latent_loss.days", "savings",
                        "E-LatentLPIPS vs decode + pixel LPIPS: device-days saved on the recipe",
                        per_batch_ms * 1e-3 * batches / SECONDS_PER_DAY, unit, "derived",
                        f"(loss.pixel-lpips - loss.e-latentlpips) x {s.iters} x {s.batch} / "
                        f"{s.default_train_batch()} loss batches"))
    return rows


def published() -> list[Row]:
    return [Row(name, "published", quantity, value, unit, "cited", source)
            for name, quantity, value, unit, source in PUBLISHED]


# ------------------------------------------------------------------------------ the command
def run_gpu_days(s: Settings) -> list[Row]:
    """Measure, derive, write DIR/gpu_days.{csv,md,png}; returns every row.

    The CSV and markdown are rewritten after every stage (a run stopped by a time limit keeps
    what it measured); the cheap stages come first, the fp32 training step last.
    """
    from d2g_fast.bench import report

    s.check()
    os.makedirs(s.out, exist_ok=True)
    progress = Progress(6)
    t0 = time.perf_counter()
    meta = {"command": s.command(), "device": device_name(s.device),
            "torch": torch.__version__, "git": git_revision(), "arch": s.arch,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "omitted": progress.omitted,
            "recipe": f"{s.pairs:.3g} pairs at {s.steps} steps, {s.iters} iterations at "
                      f"global batch {s.batch}"}
    measured: list[Row] = []

    def report_so_far(final: bool = False):
        meta["wall_s"] = time.perf_counter() - t0
        rows = measured + derive(s, measured) + published()
        if final:
            return rows, report.write_all(rows, meta, s.out)
        report.write_text_files(rows, {**meta, "partial": True}, s.out)
        return rows, None

    for title, stage in (("model-state memory (meta-device networks)", measure_memory),
                         ("each memory lever's peak per GPU (d2g plan)", measure_levers),
                         (f"collection on {device_name(s.device)}", measure_collection),
                         ("regression loss", measure_loss), ("training step", measure_training)):
        progress.stage(title)
        if stage is measure_levers and not s.levers:
            progress.omit(f"{title}: skipped (--no-levers)")
            continue
        if stage in (measure_collection, measure_training) and s.arch in CPU_UNTIMED \
                and not s.gpu:
            progress.omit(f"{title}: not measured ({s.arch} is timed on GPUs only: its random "
                          f"weights alone need tens of GB of host memory; on a CPU, "
                          f"--arch tiny-sd3 / tiny-flux measure the same code on tiny models)")
            continue
        measured += stage(s, progress)
        report_so_far()
    progress.stage("report")
    rows, paths = report_so_far(final=True)
    print(report.markdown(rows, meta))
    progress.note(f"wrote {', '.join(paths)} ({meta['wall_s']:.0f} s in all)")
    return rows
