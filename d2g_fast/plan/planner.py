"""Peak memory per GPU of a ``d2g distill`` run, predicted before the run.

The prediction has three parts:

1. Persistent state, counted from the trainer's own networks built on fake tensors
   (:func:`d2g_fast.plan.simulate.fake_run`): G's weights, its EMA, D's weights, the frozen
   networks the run keeps on the device (the teacher's network, UNet or transformer, and its
   text encoders, all in fp32 as ``build_run`` loads them; E-LatentLPIPS and its folded trunk
   cache) and AdamW's two states per TRAINABLE parameter. Trainable means
   ``requires_grad`` in the built run, so a LoRA student or a frozen D backbone changes these
   rows by itself once the trainer builds them.
2. The step: the trainer's G phase and D phase (an R1 step) simulated on fake tensors, every
   allocation counted (:mod:`d2g_fast.plan.simulate`), scaled by ``ACTIVATION_FIT`` (fitted on
   measured CPU peaks of tiny models: ``d2g plan --calibrate``).
3. What is not simulated, from its rule: the optimiser step (gradients of G and D alive, plus
   AdamW's foreach temporaries on CUDA: one copy of the trainable weights of the larger
   network), the replicated all-reduce's flat copy of the gradients, and under FSDP the shard
   sizes, D's weights gathered for the whole step (``shard_discriminator``) and the gathered
   unit of G (three copies of its largest block: the unit, the prefetched next one, its
   unsharded gradients). On a GPU a fixed reserve is added for the CUDA context and the caching
   allocator's slack (``CUDA_RESERVE_*``, not measured here: no GPU was lent).

The step's peak is the larger of the simulated phases and the optimiser step.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

GIB = 2 ** 30

ACTIVATION_FIT = {False: 1.0, True: 1.0}
"""Measured / simulated activations (the step's peak above the persistent state, gradients
excluded), by gradient checkpointing off / on; ``d2g plan --calibrate`` prints the least-squares
fit over :data:`d2g_fast.plan.calibrate.CALIBRATION_CASES`. Without checkpointing it is 1.000
(the simulation counts what the profiler counts). The one checkpointing calibration case
(w32 16x16 B4) reads 1.441: at that shape the profiler sees ~9 MiB at the peak that never passes
the dispatcher (allocations inside kernels). Used as the factor, 1.441 overshot both
checkpointing validation cases (+31 %, +41 % of the step) which 1.0 matches to 0.1 %, so 1.0
is used and that case is the plan's known miss (-27 % of the step, -5 % of the total)."""

CUDA_RESERVE_FRACTION = 0.05
"""Caching-allocator slack assumed on a GPU, as a fraction of the predicted peak."""
CUDA_RESERVE_BYTES = 1 * GIB
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers assumed on a GPU."""

# Flags a planned run may not use until the trainer has them: plan flag -> TrainConfig field.
FUTURE_FLAGS: dict = {}


@dataclass
class PlanRequest:
    source: object                 # architecture name, diffusers folder, or callable(device)
    batch_size: int = 8            # micro-batch per GPU
    gpus: int = 1
    gpu_memory_gb: float = 80.0
    fsdp: bool = False
    gradient_checkpointing: bool = False
    precision: str = "bf16"
    device: str = "cuda"           # "cuda": add the GPU reserve; "cpu": none (calibration)
    options: dict = field(default_factory=dict)  # further TrainConfig fields (lora_rank, ...)
    resolution: int | tuple[int, int] | None = None  # a folder's pixels (None: its default)

    def check(self) -> "PlanRequest":
        from d2g_fast.train.config import PRECISIONS, TrainConfig

        _positive_int(self.batch_size, "--batch-size")
        _positive_int(self.gpus, "--gpus")
        if not (isinstance(self.gpu_memory_gb, (int, float)) and self.gpu_memory_gb > 0
                and math.isfinite(self.gpu_memory_gb)):
            raise ValueError(f"gpu_memory (--gpu-memory): GB per GPU, a positive number, got "
                             f"{self.gpu_memory_gb!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision (--precision): one of {PRECISIONS}, got "
                             f"{self.precision!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device: 'cuda' or 'cpu', got {self.device!r}")
        for name, value in self.options.items():
            if name not in TrainConfig.__dataclass_fields__:
                flag = FUTURE_FLAGS.get(name, "--" + name.replace("_", "-"))
                raise ValueError(f"{name} ({flag}): the trainer has no such setting yet "
                                 f"(d2g distill --help lists what it has), so no plan for it")
        return self

    @property
    def sharded(self) -> bool:
        return self.fsdp and self.gpus > 1

    def train_config(self, batch_size: int | None = None):
        from d2g_fast.train import TrainConfig

        return TrainConfig(batch_size=batch_size or self.batch_size, precision=self.precision,
                           gradient_checkpointing=self.gradient_checkpointing, fsdp=self.fsdp,
                           lpips_random=True, device="cpu", progress=False, **self.options)


def _positive_int(value, flag):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{flag.lstrip('-').replace('-', '_')} ({flag}): a positive integer, "
                         f"got {value!r}")


# ------------------------------------------------------------------------------ state
@dataclass
class State:
    """Bytes of what a run keeps between steps (unsharded), and what FSDP needs to know."""
    g_weights: int
    g_trainable: int
    ema: int
    d_weights: int
    d_trainable: int
    frozen: int                    # text encoders, E-LatentLPIPS and its trunk cache
    largest_unit: int              # bytes of the largest FSDP unit (a network block)
    teacher_net: int = 0           # the teacher's own network, kept on the device

    def adamw(self) -> int:
        return 2 * (self.g_trainable + self.d_trainable)


def _bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s._cdata not in seen:
            seen.add(s._cdata)
            total += s.nbytes()
    return total


def state_of(run, lpips_cache: int) -> State:
    seen: set = set()

    def net(m):
        return 0 if m is None else _bytes(list(m.parameters()) + list(m.buffers()), seen)

    def trainable(m):
        return sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)

    g, d = run.generator, run.discriminator
    g_w, ema, d_w = net(g), net(run.ema), net(d)
    from d2g_fast.plan.simulate import frozen_networks

    teacher_net, *texts = frozen_networks(run.teacher)
    teacher_bytes = net(teacher_net)  # after G, EMA, D: what one of them shares is theirs
    frozen = sum(net(m) for m in texts + [run.lpips]) + lpips_cache
    units = [sum(p.numel() * p.element_size() for p in b.parameters())
             for b in run.teacher.blocks(g.net)]  # G's FSDP units (shard_generator's)
    return State(g_w, trainable(g), ema, d_w, d_trainable=sum(
        p.numel() * p.element_size() for p in run.d_params), frozen=frozen,
        largest_unit=max(units, default=0), teacher_net=teacher_bytes)


# ------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    request: PlanRequest
    rows: list[tuple[str, int]]    # (what, bytes per GPU) at the peak, in print order
    phase: str                     # "step" or "optimiser step": where the peak is
    largest_batch: int             # 0: not even batch 1 fits
    params: dict                   # parameter counts (G, D) for the header
    max_batch: int = 4096          # where the largest-batch search stopped

    @property
    def peak(self) -> int:
        return sum(b for _, b in self.rows)

    @property
    def capacity(self) -> int:
        return int(self.request.gpu_memory_gb * 1e9)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    def summary_line(self) -> str:
        r = self.request
        verdict = "fits" if self.fits else "does NOT fit"
        largest = f">= {self.largest_batch} (the search's limit)" \
            if self.largest_batch >= self.max_batch else str(self.largest_batch)
        return (f"plan: {self.peak / GIB:.1f} GiB per GPU predicted at batch {r.batch_size} "
                f"({r.precision}{', FSDP' if r.sharded else ''}"
                f"{', checkpointing' if r.gradient_checkpointing else ''}, {r.gpus} GPU(s)): "
                f"{verdict} in {r.gpu_memory_gb:g} GB; largest batch that fits: {largest}")

    def format(self) -> str:
        r = self.request
        name = r.source if isinstance(r.source, str) else getattr(r.source, "__name__", "model")
        lines = [f"d2g plan: {name}, G {self.params['g'] / 1e9:.3f} B parameters "
                 f"({self.params['g_trainable'] / 1e9:.3f} B trained), D "
                 f"{self.params['d'] / 1e9:.3f} B ({self.params['d_trainable'] / 1e9:.3f} B "
                 f"trained); micro-batch {r.batch_size} per GPU on {r.gpus} GPU(s) of "
                 f"{r.gpu_memory_gb:g} GB",
                 f"peak per GPU (in the {self.phase}), GiB:"]
        for what, b in self.rows:
            lines.append(f"  {what:<52} {b / GIB:9.2f}")
        lines.append(f"  {'total':<52} {self.peak / GIB:9.2f}")
        lines.append(self.summary_line())
        return "\n".join(lines)


def _step_rows(req: PlanRequest, state: State, labels: dict) -> list[tuple[str, int]]:
    """The simulated step's peak, per GPU, with FSDP's changes."""
    n = req.gpus if req.sharded else 1
    fit = ACTIVATION_FIT[bool(req.gradient_checkpointing)]
    rows = [("gradients (G, D)", labels["gradients"] // n),
            ("activations: G", int(fit * labels["G"])),
            ("activations: loss (E-LatentLPIPS)", int(fit * labels["loss"])),
            ("activations: D", int(fit * labels["D"])),
            ("R1 (double backward, one sample)", int(fit * labels["R1"])),
            ("inputs, text encoding, backward temporaries",
             int(fit * (labels["inputs"] + labels["backward"])))]
    if req.sharded:
        rows += [("FSDP: D gathered for the step", state.d_weights - state.d_weights // n),
                 ("FSDP: G's gathered unit (x3)", 3 * state.largest_unit)]
    return rows


def _optimizer_rows(req: PlanRequest, state: State) -> list[tuple[str, int]]:
    n = req.gpus if req.sharded else 1
    grads = (state.g_trainable + state.d_trainable) // n
    rows = [("gradients (G, D)", grads)]
    if req.device == "cuda":  # foreach AdamW: one temporary list the size of the weights
        rows.append(("AdamW foreach temporaries",
                     max(state.g_trainable, state.d_trainable) // n))
    if req.gpus > 1 and not req.sharded:
        rows.append(("all-reduce flat gradient copy", max(state.g_trainable, state.d_trainable)))
    return rows


def _persistent_rows(req: PlanRequest, state: State) -> list[tuple[str, int]]:
    n = req.gpus if req.sharded else 1
    return [("weights: G", state.g_weights // n), ("weights: EMA of G", state.ema // n),
            ("weights: D", state.d_weights // n), ("AdamW states (G, D)", state.adamw() // n),
            ("frozen: the teacher's network (held, not called)", state.teacher_net),
            ("frozen: text encoders, E-LatentLPIPS", state.frozen)]


def _reserve(req: PlanRequest, total: int) -> list[tuple[str, int]]:
    if req.device != "cuda":
        return []
    return [("CUDA context + allocator slack (assumed)",
             CUDA_RESERVE_BYTES + int(CUDA_RESERVE_FRACTION * total))]


def _rows_at(req: PlanRequest, state: State, timeline, batch: int):
    persistent = _persistent_rows(req, state)
    step = _step_rows(req, state, timeline.peak(batch))
    opt = _optimizer_rows(req, state)
    chosen, phase = (step, "step") if sum(b for _, b in step) >= sum(b for _, b in opt) \
        else (opt, "optimiser step")
    rows = persistent + chosen
    return rows + _reserve(req, sum(b for _, b in rows)), phase


def plan(req: PlanRequest, *, timeline=None, state: State | None = None, counts=None,
         max_batch: int = 4096) -> Plan:
    """Predict the peak memory per GPU of ``req`` (see the module docstring). ``timeline``,
    ``state`` and ``counts`` (from :func:`simulate`) may be reused between requests that
    differ only in GPUs, GPU memory and batch size."""
    req.check()
    if timeline is None or state is None:
        timeline, state, counts = simulate(req)
    rows, phase = _rows_at(req, state, timeline, req.batch_size)
    capacity = int(req.gpu_memory_gb * 1e9)

    def fits(b):
        rs, _ = _rows_at(req, state, timeline, b)
        return sum(v for _, v in rs) <= capacity

    return Plan(req, rows, phase, largest_fitting(fits, max_batch),
                counts or {"g": 0, "g_trainable": 0, "d": 0, "d_trainable": 0}, max_batch)


def largest_fitting(fits, max_batch: int) -> int:
    """The largest b in [1, max_batch] with fits(b) (fits is monotone); 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= max_batch and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_batch + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def simulate(req: PlanRequest):
    """(timeline, state, parameter counts) of ``req``'s run on fake tensors."""
    from d2g_fast.plan.fake import fake_tensors
    from d2g_fast.plan.simulate import _record, fake_run, meta_run

    config = req.train_config()
    run = meta_run(req.source, config, req.resolution)
    counts = {"g": sum(p.numel() for p in run.generator.parameters()),
              "g_trainable": sum(p.numel() for p in run.generator.parameters()
                                 if p.requires_grad),
              "d": sum(p.numel() for p in run.discriminator.parameters()),
              "d_trainable": sum(p.numel() for p in run.d_params)}
    from d2g_fast.plan.simulate import step_timeline_of

    with fake_tensors() as mode:
        run = fake_run(run, mode)
        timeline = step_timeline_of(run, config)
        state = state_of(run, timeline.persistent_extra)
    return timeline, state, counts


# ------------------------------------------------------------------------------ d2g distill
PLAN_ENV = "D2G_PLAN"
"""``d2g distill`` plans its run first on CUDA devices; "0" never, "1" also on the CPU."""


def _device_memory_gb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        index = torch.device(device).index
        return torch.cuda.get_device_properties(0 if index is None else index).total_memory / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


MEMORY_OPTIONS = ("lora_rank", "lora_alpha", "lora_targets", "light_d", "d_taps", "augment")
"""TrainConfig fields besides the request's own that change what a run holds; ``d2g distill``'s
plan carries those its run sets."""


def _plan_options(config) -> dict:
    from d2g_fast.train.config import TrainConfig

    default = TrainConfig()
    return {name: getattr(config, name) for name in MEMORY_OPTIONS
            if name in TrainConfig.__dataclass_fields__
            and getattr(config, name) != getattr(default, name)}


def announce(config, log=print) -> Plan | None:
    """What ``d2g distill`` says before building its run: the plan's line for this run
    (process 0 only) and a warning when the prediction exceeds the device's memory. Never stops
    the run: a plan that cannot be made is reported in one line."""
    import torch

    setting = os.environ.get(PLAN_ENV, "")
    device = config.device if config.device != "auto" else \
        ("cuda" if torch.cuda.is_available() else "cpu")
    wanted = setting == "1" or (setting != "0" and device.startswith("cuda"))
    if not wanted or os.environ.get("RANK", "0") != "0":
        return None
    try:
        from d2g_fast.train.build import check_teacher_folder, stored_resolution

        check_teacher_folder(config.teacher)
        req = PlanRequest(config.teacher, batch_size=config.batch_size,
                          resolution=stored_resolution(config.pairs),
                          gpus=int(os.environ.get("WORLD_SIZE", "1")),
                          gpu_memory_gb=_device_memory_gb(device), fsdp=config.fsdp,
                          gradient_checkpointing=config.gradient_checkpointing,
                          precision=config.precision, options=_plan_options(config),
                          device="cuda" if device.startswith("cuda") else "cpu")
        result = plan(req)
    except Exception as exc:  # noqa: BLE001 - the plan is advice; training goes on
        log(f"d2g distill: plan unavailable ({type(exc).__name__}: {exc})")
        return None
    log(f"d2g distill: {result.summary_line()}")
    if not result.fits:
        log(f"d2g distill: WARNING: the predicted peak {result.peak / GIB:.1f} GiB exceeds this "
            f"device's {req.gpu_memory_gb:.1f} GB; expect an out-of-memory error. Largest batch "
            f"predicted to fit: {result.largest_batch} (d2g plan shows the breakdown; "
            f"--gradient-checkpointing and --fsdp lower it)")
    return result
