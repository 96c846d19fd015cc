"""The training loop: resume, read micro-batches, step, log, sample, checkpoint."""
from __future__ import annotations

import json
import os
import time

import torch

from d2g_fast.train import checkpoint as ckpt
from d2g_fast.train.build import Run, build_run
from d2g_fast.train.config import TrainConfig
from d2g_fast.train.data import MicroBatchSampler, PairOrder
from d2g_fast.train.distributed import Processes, start_processes, stop_processes
from d2g_fast.train.log import (MetricsLog, bar_postfix, decode_latents, image_grid,
                                progress_bar, save_png)
from d2g_fast.train.step import conditioning, train_step

CONFIG_FILE = "config.json"
# Settings a resumed run must share with the checkpoint: they decide what the run computes.
RECIPE_FIELDS = ("seed", "batch_size", "parameterization", "timestep", "val_pairs")


# ------------------------------------------------------------------------------ run folder
def prepare_run_dir(config: TrainConfig, procs: Processes, log=print):
    """Check --out, take its lock for the job (refused, touching nothing, when another command
    holds it) and only then remove what a killed run left. Returns (run folder, lock)."""
    from d2g_fast.data.store import ensure_writable
    from d2g_fast.runtime.lock import FolderLock
    from d2g_fast.runtime.ranks import on_main_then_share

    out = os.path.abspath(config.out)

    def take():
        ensure_writable(out)
        lock = FolderLock(out, "d2g distill").acquire(log)
        try:
            ckpt.remove_incomplete(out)
        except BaseException:
            lock.release()
            raise
        return lock

    return out, on_main_then_share(take, procs.rank, share_result=False)


def find_resume_point(config: TrainConfig, run_dir: str, log=print) -> str | None:
    """The checkpoint folder to continue from, or None for a fresh start. Checkpoints are
    verified against their checksums: damaged ones are named and skipped (or refused)."""
    if config.resume == "none":
        if ckpt.list_checkpoints(run_dir):
            raise ValueError(f"resume (--resume): {run_dir!r} already holds checkpoints; use "
                             f"--resume auto to continue it, or choose a new --out")
        return None
    if config.resume == "auto":
        return ckpt.newest_intact_checkpoint(run_dir, lambda text: log(f"d2g distill: {text}"))
    path = config.resume
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume (--resume): no such checkpoint folder {path!r}")
    if not os.path.isfile(os.path.join(path, ckpt.COMPLETE)):
        raise ValueError(f"resume (--resume): {path!r} is not a complete checkpoint folder")
    problems = ckpt.verify_checkpoint(path)
    if problems:
        raise ValueError(f"resume (--resume): {path!r} is damaged ({'; '.join(problems[:3])}); "
                         f"nothing was loaded")
    return path


def check_resume_compatible(saved: dict, config: TrainConfig, global_batch: int) -> list[str]:
    """Refuse a resume that would change what the run computes; return the harmless changes."""
    old = saved["config"]
    for name in RECIPE_FIELDS:
        if old.get(name) != getattr(config, name):
            raise ValueError(f"{name} (--{name.replace('_', '-')}): the checkpoint was trained "
                             f"with {old.get(name)!r}, this run asks for {getattr(config, name)!r}"
                             f"; resume with the same value or start a new --out")
    if saved.get("global_batch") != global_batch:
        raise ValueError(f"batch_size (--batch-size): the checkpoint's global batch was "
                         f"{saved.get('global_batch')}, this run's is {global_batch} (batch size x "
                         f"grad accumulation x processes); keep it equal to resume")
    skip = set(RECIPE_FIELDS) | {"resume", "out", "progress"}
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in config.to_dict().items()
            if k not in skip and old.get(k) != v]


def write_config(run_dir: str, config: TrainConfig) -> None:
    from d2g_fast.data.store import atomic_write_json

    atomic_write_json(os.path.join(run_dir, CONFIG_FILE), config.to_dict())


# ------------------------------------------------------------------------------ pieces
def make_loader(run: Run, start_step: int):
    c = run.config
    sampler = MicroBatchSampler(PairOrder(run.num_train, c.seed), start_step, c.max_steps,
                                c.batch_size, c.grad_accum, run.procs.rank, run.procs.world)
    from d2g_fast.runtime.signals import ignore_in_worker

    # Workers ignore the preemption signals (a scheduler signals every process of the job):
    # the main process finishes the step and saves, the workers must live until then.
    return torch.utils.data.DataLoader(run.dataset, batch_sampler=sampler,
                                       num_workers=c.num_workers,
                                       persistent_workers=c.num_workers > 0,
                                       worker_init_fn=ignore_in_worker if c.num_workers else None)


@torch.no_grad()
def validate(run: Run) -> float | None:
    """Mean E-LatentLPIPS (no augmentation) of G on the held-out pairs, over all processes.
    Every process runs the same number of G calls (FSDP's gathers are collective): a process
    with nothing left in the last round repeats a pair with weight 0."""
    if run.config.val_pairs <= 0 or run.dataset is None:
        return None
    held_out = list(range(run.num_train, len(run.dataset)))
    bs, rank, world = run.config.batch_size, run.procs.rank, run.procs.world
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    for start in range(0, len(held_out), bs * world):
        mine = held_out[start + rank * bs:start + (rank + 1) * bs]
        weight = 1.0 if mine else 0.0
        items = [run.dataset[i] for i in (mine or held_out[:1])]
        batch = torch.utils.data.default_collate(items)
        ehs, added = conditioning(run, batch)
        fake = run.generator(batch["noise"].to(run.device), ehs, added)
        d = run.lpips(fake, batch["latent"].to(run.device), ensembling=False)
        total[0] += weight * d.double().sum()
        total[1] += weight * d.shape[0]
    run.procs.sum_(total)
    return float(total[0] / total[1])


class SampleWriter:
    """PNG grids of (EMA) G's samples for fixed prompts and noise, decoded by the teacher's VAE."""

    def __init__(self, run: Run, run_dir: str):
        self.run, self.folder = run, os.path.join(run_dir, "samples")
        c = run.config
        self.prompts = list(c.sample_prompts) or list(run.dataset.prompts[:8])
        gen = torch.Generator().manual_seed(c.seed)
        self.noise = torch.randn((len(self.prompts), *run.teacher.latent_shape), generator=gen)
        self.vae = None
        self.failed = None

    def _load_vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.run.config.teacher, subfolder="vae",
                                             local_files_only=True).to(self.run.device).eval()

    @torch.no_grad()
    def write(self, step: int) -> str | None:
        """Every process calls this (G's forward is collective under FSDP); rank 0 saves."""
        run = self.run
        model = run.ema if run.ema is not None else run.generator
        ehs, added = conditioning(run, {"prompt": self.prompts})
        latents = model(self.noise.to(run.device), ehs, added)
        if self.failed or not run.procs.is_main:
            return None
        if self.vae is None:
            try:
                self.vae = self._load_vae()
            except Exception as exc:  # noqa: BLE001 - samples are optional, training goes on
                self.failed = f"{type(exc).__name__}: {exc}"
                print(f"d2g distill: sample grids disabled: the teacher's VAE cannot be loaded "
                      f"({self.failed})")
                return None
        images = decode_latents(self.vae, latents)
        path = os.path.join(self.folder, f"{ckpt.checkpoint_name(step)}.png")
        save_png(image_grid(images, columns=min(4, len(self.prompts))), path)
        return path


def checkpoint_state(run: Run, step: int) -> dict:
    c = run.config
    return {"config": c.to_dict(), "global_batch": run.global_batch, "world": run.procs.world,
            "data_position": PairOrder(run.num_train, c.seed).position(step, run.global_batch),
            "counters": dict(run.counters),
            "generator": {**run.generator.describe(), "parameterization": c.parameterization,
                          "resolution": [run.teacher.height, run.teacher.width]},
            "teacher": os.path.abspath(c.teacher),
            "teacher_sha256": run.teacher.identity()["sha256"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ the loop
def train(config: TrainConfig, log=print) -> dict:
    """Run (or continue) the distillation described by ``config``; returns a summary dict."""
    from d2g_fast.runtime import signals

    config.validate()
    with signals.watch("d2g distill"):
        procs, device = start_processes(config.device)
        try:
            run_dir, lock = prepare_run_dir(config, procs, log)
            try:
                return _train(config, procs, device, log, run_dir)
            finally:
                if lock is not None:
                    lock.release()
        finally:
            stop_processes()


def _stop_if_preempted(run: Run, run_dir: str, done: int, metrics_log, bar) -> None:
    """After a step: when a preemption signal reached any process, all write the checkpoint of
    this step and raise Preempted (d2g exits with the requeue status)."""
    from d2g_fast.runtime import signals

    if not signals.requested_on_any_rank():
        return
    path = ckpt.save_checkpoint(run, run_dir, done, checkpoint_state(run, done))
    bar.close()
    if metrics_log is not None:
        metrics_log.close()
    raise signals.Preempted(signals.resume_line(
        "d2g distill", f"checkpoint {path} (step {done} of {run.config.max_steps}) written")
        if run.procs.is_main else "")


def _train(config: TrainConfig, procs: Processes, device: torch.device, log, run_dir) -> dict:
    from d2g_fast.runtime.ranks import on_main_then_share

    # Rank 0 verifies the checkpoints (reading them once) and tells the others which to load.
    resume_from = on_main_then_share(lambda: find_resume_point(config, run_dir, log), procs.rank)
    run = build_run(config, procs=procs, device=device)
    start_step = 0
    if resume_from is not None:
        saved = ckpt.read_state(resume_from)
        changes = check_resume_compatible(saved, config, run.global_batch)
        state = ckpt.load_checkpoint(run, resume_from)
        start_step = int(state["step"])
        run.counters.update(state["counters"])
        run.counters["nonfinite_in_a_row"] = 0
        if procs.is_main:
            log(f"d2g distill: resuming from {resume_from} (step {start_step})"
                + (f"; changed settings: {'; '.join(changes)}" if changes else ""))
    elif procs.is_main:
        if config.fsdp and procs.world == 1:
            log("d2g distill: --fsdp with one process: nothing to shard, training replicated")
        log(f"d2g distill: starting {run_dir} ({run.global_batch} pairs per step on "
            f"{procs.world} process(es), {run.num_train} training pairs)")
    if procs.is_main and device.type == "cpu":
        from d2g_fast.cpu_features import bf16_hardware, describe

        log(f"d2g distill: {describe()}; --precision {config.precision}"
            + ("" if config.precision != "bf16" or bf16_hardware() else
               " (consider --precision fp32 on this CPU)"))
    metrics_log = samples = None
    if procs.is_main:
        write_config(run_dir, config)
        metrics_log = MetricsLog(run_dir, start_step if resume_from else None)
    if config.sample_every:
        samples = SampleWriter(run, run_dir)
    bar = progress_bar(config.max_steps, start_step, config.progress and procs.is_main)
    loader_iter = iter(make_loader(run, start_step))
    last = {}
    for step in range(start_step, config.max_steps):
        batches = [next(loader_iter) for _ in range(config.grad_accum)]
        _sync(device)
        t0 = time.perf_counter()
        last = train_step(run, batches, step)
        _sync(device)
        seconds = time.perf_counter() - t0
        run.counters["device_seconds"] += seconds * procs.world
        done = step + 1
        if done % config.log_every == 0 or done == config.max_steps:
            val = validate(run)
            if metrics_log is not None:
                metrics_log.append({**last, "step": done, "val_e_latentlpips": val,
                                    "nonfinite_skipped": run.counters["nonfinite_skipped"],
                                    "samples_per_s": run.global_batch / seconds,
                                    "device_hours": run.counters["device_seconds"] / 3600})
        if samples is not None and done % config.sample_every == 0:
            samples.write(done)
        if done % config.checkpoint_every == 0 or done == config.max_steps:
            ckpt.save_checkpoint(run, run_dir, done, checkpoint_state(run, done))
            if procs.is_main:
                ckpt.prune_checkpoints(run_dir, config.keep_checkpoints)
        bar.update(1)
        bar.set_postfix(bar_postfix(last), refresh=False)
        if done < config.max_steps:
            _stop_if_preempted(run, run_dir, done, metrics_log, bar)
    bar.close()
    if metrics_log is not None:
        metrics_log.close()
    summary = {"run_dir": run_dir, "steps": config.max_steps, "resumed_from": resume_from,
               "last": last, "device_hours": run.counters["device_seconds"] / 3600,
               "checkpoint": ckpt.latest_checkpoint(run_dir)}
    if procs.is_main:
        log(f"d2g distill: done, {config.max_steps} steps, "
            f"{summary['device_hours']:.4f} device-hours; checkpoint {summary['checkpoint']}")
    return summary


def read_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run_dir: {run_dir!r} is not a d2g distill run folder (no "
                                f"{CONFIG_FILE})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
