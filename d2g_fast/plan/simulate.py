"""The trainer's real step on fake tensors: what every phase of it allocates, at any size.

``fake_run`` builds the trainer's :class:`~d2g_fast.train.build.Run` (``build_run``, the same
G, D, E-LatentLPIPS and text encoders as a real run) on the meta device from the architecture's
configs, then turns every weight into a fake CPU tensor (shape and dtype, no memory).
``step_timeline`` runs the trainer's own micro-step functions (G's phase, then D's phase on an
R1 step) on it under :class:`~d2g_fast.plan.tracker.LiveBytes`, at two batch sizes. Every
allocation of the step is either per-sample (activations) or fixed (gradients, R1's single
sample), so live bytes at each allocation are affine in the batch size and two runs give the
step's memory at every batch size exactly (``StepTimeline.at``).

Not simulated, added by :mod:`d2g_fast.plan.planner`: the optimiser step (torch's AdamW cannot
step fake tensors), the gradient all-reduce and FSDP's gathers.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from d2g_fast.plan.tracker import LiveBytes

# What the step's allocations are filed under (the plan's activation rows).
LABELS = ("inputs", "G", "loss", "D", "R1", "gradients", "backward")
DEFAULT_LABEL = "backward"  # outside every forward: backward temporaries, the G/D loss glue


# ------------------------------------------------------------------------------ meta networks
def _scheduler_real(scheduler):
    """The scheduler rebuilt from its config: its tables are real CPU tensors (tiny)."""
    return type(scheduler).from_config(scheduler.config)


def meta_teacher(source, resolution=None):
    """The teacher family object of ``source`` with its network and text encoders on the meta
    device: ``source`` is an architecture of :mod:`d2g_fast.bench.archs` (at its native
    resolution), a local diffusers folder of any family (configs read, weights never; at
    ``resolution`` pixels, None: the family's default), or a callable ``source(device)``
    returning a teacher family object or the components of a UNet teacher (tests and
    calibration shapes). The scheduler's tables are real CPU tensors (the build reads them)."""
    if callable(source):
        made = source("meta")
        teacher = _teacher(made) if isinstance(made, dict) else made
    elif os.path.isdir(source):
        teacher = _folder_teacher(source, resolution)
    else:
        from d2g_fast.bench import archs

        archs.check_arch(source)
        comps = archs.components(source, device="meta")
        comps["scheduler"] = _scheduler_real(comps["scheduler"])
        teacher = archs.teacher(source, comps)
    teacher.base_scheduler = _scheduler_real(teacher.base_scheduler)
    return teacher


def _folder_teacher(path: str, resolution=None):
    """A local diffusers folder's teacher with meta weights: each network built from its
    config by the class ``model_index.json`` names (the family's parts: its network and text
    encoders), the tokenizers and scheduler loaded (small), the VAE's config read."""
    import diffusers
    import transformers

    from d2g_fast.teacher.families import check_teacher_folder, read_model_index

    family = check_teacher_folder(path, resolution)
    index = read_model_index(path)
    comps = {}
    for name in family.component_names():
        entry = index.get(name)
        sub = os.path.join(path, name)
        if not (isinstance(entry, (list, tuple)) and entry[0] is not None and os.path.isdir(sub)):
            comps[name] = None
            continue
        lib, cls_name = entry
        if name == "scheduler":
            cls = getattr(diffusers, cls_name)
            comps[name] = cls.from_config(cls.load_config(sub))
        elif name.startswith("tokenizer"):
            tok_cls = getattr(transformers, cls_name, transformers.AutoTokenizer)
            comps[name] = tok_cls.from_pretrained(sub, local_files_only=True)
        elif lib == "transformers":
            config = transformers.AutoConfig.from_pretrained(sub, local_files_only=True)
            with torch.device("meta"):
                comps[name] = getattr(transformers, cls_name)(config).eval()
        else:
            cls = getattr(diffusers, cls_name)
            with torch.device("meta"):
                comps[name] = cls.from_config(cls.load_config(sub)).eval()
    vae_config = None
    if os.path.isfile(os.path.join(path, "vae", "config.json")):
        with open(os.path.join(path, "vae", "config.json"), encoding="utf-8") as f:
            vae_config = json.load(f)
    pipeline_config = {k: v for k, v in index.items() if not isinstance(v, (list, tuple))}
    return family(comps, vae_config=vae_config, pipeline_config=pipeline_config,
                  resolution=resolution, source=os.path.abspath(path))


def _teacher(comps: dict):
    """A UNet teacher (SD, or SDXL with a second text encoder) from its components."""
    from d2g_fast.teacher import Teacher

    vae_config = comps.get("vae_config") or comps["vae"].config
    return Teacher(comps["unet"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"],
                   text_encoder_2=comps.get("text_encoder_2"),
                   tokenizer_2=comps.get("tokenizer_2"), vae_config=vae_config)


def frozen_networks(teacher) -> list:
    """What the trainer keeps of the teacher on the device: its network (the run never calls
    it, but the family reads devices and layouts from it) and its text encoders."""
    return [teacher.denoiser] + [getattr(teacher, enc) for _, enc in teacher.text_pairs
                                 if getattr(teacher, enc, None) is not None]


def _to_fake(modules, mode, device: torch.device) -> None:
    """Replace every meta parameter and buffer by a fake tensor on ``device``."""
    from torch._subclasses.fake_tensor import FakeTensor

    for module in modules:
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.device.type == "meta":
                    m._parameters[name] = torch.nn.Parameter(FakeTensor(mode, p.data, device),
                                                             requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None and b.device.type == "meta":
                    m._buffers[name] = FakeTensor(mode, b, device)


def meta_run(source: str, config, resolution=None):
    """The trainer's Run for ``config`` with the teacher of ``source``, every weight on the
    meta device (built outside the fake mode: the build reads the scheduler's real tables)."""
    from d2g_fast.train import build_run

    torch.manual_seed(0)
    teacher = meta_teacher(source, resolution)
    return build_run(config, teacher=teacher, dataset=None, device="meta",
                     guidance=teacher.default_guidance)


def fake_run(run, mode):
    """``run`` (from :func:`meta_run`) with its weights fake CPU tensors of ``mode``.

    The optimisers are the real AdamW objects (their states are never created); mix-and-match
    is off (it reads its random draws back, which fake tensors cannot; it only swaps latents).
    """
    teacher = run.teacher
    cpu = torch.device("cpu")
    nets = [run.generator, run.discriminator, run.lpips] + frozen_networks(teacher)
    nets += [n for n in (run.ema, getattr(run, "regression", None)) if n is not None]
    _to_fake(nets, mode, cpu)
    run.device = cpu
    run.d_params = [p for p in run.discriminator.parameters() if p.requires_grad]
    run.d_loss.mix_fraction = 0.0
    return run


# ------------------------------------------------------------------------------ the step
@contextlib.contextmanager
def _labelled(tracker: LiveBytes, run):
    """File allocations under the network running: G's forward, the loss, D (R1 inside R1),
    and gradients once accumulated."""
    import d2g_fast.losses.gan as gan

    state = {"r1": False}
    stack = []

    def push(label):
        stack.append(tracker.label)
        tracker.label = label

    def pop():
        tracker.label = stack.pop()

    def hooks(module, label):
        pre = module.register_forward_pre_hook(
            lambda *_: push("R1" if state["r1"] else label))
        post = module.register_forward_hook(lambda *_: pop())
        return [pre, post]

    loss = getattr(run, "regression", None) or run.lpips  # --regression-loss (E-LatentLPIPS)
    handles = hooks(run.generator, "G") + hooks(loss, "loss") + hooks(run.discriminator, "D")
    for p in list(run.generator.parameters()) + list(run.d_params):
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(
                lambda q: tracker.relabel(q.grad, "gradients")))
    original_r1 = gan.r1_penalty

    def r1_penalty(*args, **kwargs):
        state["r1"] = True
        push("R1")
        try:
            return original_r1(*args, **kwargs)
        finally:
            pop()
            state["r1"] = False

    gan.r1_penalty = r1_penalty
    try:
        yield
    finally:
        gan.r1_penalty = original_r1
        for h in handles:
            h.remove()


def synthetic_batch(run, batch: int) -> dict:
    """A batch of the pair store's shape: noise, teacher latent, prompts."""
    from d2g_fast.data.prompts import load_prompts

    shape = tuple(run.teacher.latent_shape)
    return {"noise": torch.randn(batch, *shape), "latent": torch.randn(batch, *shape),
            "prompt": (load_prompts(None) * batch)[:batch]}


def run_step_phases(run, batch: dict, step: int) -> None:
    """G's phase then D's phase of one micro-batch, as ``train_step`` runs them (the optimiser
    step, which only needs the gradients, excluded)."""
    from d2g_fast.train.step import (discriminator_micro_step, generator_micro_step,
                                     prepare_micro_batch)

    run.generator.train()
    run.discriminator.train()
    micro = prepare_micro_batch(run, batch, step, 0)
    generator_micro_step(run, micro, step, 1.0)
    discriminator_micro_step(run, micro, step, 1.0)


def warm_up(run, batch: dict) -> int:
    """What the first step leaves behind besides optimiser states (E-LatentLPIPS's folded
    trunk weights): allocated once, then part of the persistent state. Returns its bytes."""
    tracker = LiveBytes()
    with tracker, torch.no_grad():
        target = batch["latent"][:1]
        run.lpips(target, target)
    return tracker.live


@dataclass
class StepTimeline:
    """Per-label live bytes after every allocation of one step, at two batch sizes."""
    labels: tuple[str, ...]
    batches: tuple[int, int]
    lines: tuple[np.ndarray, np.ndarray]  # (allocations, labels) int64 each
    persistent_extra: int                 # bytes the first step leaves (see warm_up)

    def at(self, batch: int) -> np.ndarray:
        (b0, b1), (t0, t1) = self.batches, self.lines
        return t0 + (t1 - t0) * (batch - b0) // (b1 - b0)

    def peak(self, batch: int) -> dict[str, int]:
        """The per-label bytes at the step's peak for ``batch``."""
        lines = self.at(batch)
        row = lines[int(np.argmax(lines.sum(axis=1)))]
        return {name: int(v) for name, v in zip(self.labels, row)}


def _record(run, batch_size: int, step: int) -> tuple[np.ndarray, int]:
    batch = synthetic_batch(run, batch_size)
    extra = warm_up(run, batch)
    tracker = LiveBytes(LABELS, record=True)
    tracker.label = "inputs"
    with tracker, _labelled(tracker, run):
        run_step_phases(run, batch, step)
        tracker.label = DEFAULT_LABEL
        for p in list(run.generator.parameters()) + list(run.d_params):
            p.grad = None
    return np.asarray(tracker.timeline, dtype=np.int64), extra


def r1_step(config) -> int:
    """A step number past the warm-up on which R1 runs (the costlier kind of step)."""
    interval = config.r1_interval
    return interval * (config.warmup_steps // interval + 1)


def step_timeline_of(run, config, batches: tuple[int, int] = (2, 3)) -> StepTimeline:
    """Simulate an R1 step of the fake ``run`` at two batch sizes (2 and 3 by default: above
    1, where a batch could take another code path)."""
    recorded = [_record(run, b, r1_step(config)) for b in batches]
    lines = [line for line, _ in recorded]
    if lines[0].shape != lines[1].shape:
        raise RuntimeError(f"plan: the step allocated {len(lines[0])} and {len(lines[1])} times "
                           f"at batch sizes {batches}; the two runs must be the same program")
    # The first warm-up made E-LatentLPIPS's cache; the second found it.
    return StepTimeline(LABELS, tuple(batches), tuple(lines), recorded[0][1])


def step_timeline(source, config, batches: tuple[int, int] = (2, 3)) -> StepTimeline:
    """:func:`step_timeline_of` the run of ``config`` with the teacher ``source``."""
    from d2g_fast.plan.fake import fake_tensors

    run = meta_run(source, config)
    with fake_tensors() as mode:
        return step_timeline_of(fake_run(run, mode), config, batches)
