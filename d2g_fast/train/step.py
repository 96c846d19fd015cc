"""One optimiser step of the distillation: G's step and D's step on a global batch.

For the micro-batches of the step (this process's share of them), first G's phase, then D's:
  1. G: x = G(z, c); loss = E-LatentLPIPS(x, teacher latent) + lambda_GAN * L_GAN(D(x, z, c)),
     D frozen (no D gradients); the GAN term is off during the warm-up.
  2. D: non-saturating loss on (teacher latent: real) vs (x detached, some replaced by
     mismatched real latents: fake), lazy single-sample R1 on R1 steps; skipped when
     lambda_GAN = 0 (regression only: G never reads D).
Both losses are divided by the number of micro-batches of the step; after the last micro-batch
the gradients are averaged over processes, the step is skipped everywhere if any loss was not
finite, gradients are clipped, AdamW steps G and D, and the EMA follows G.

D's phase judges G's fakes from before G's update (no second G forward). With
``--overlap-phases`` (CPU), G's loss and backward and D's step of a micro-batch run side by side
on two threads after G's forward: nothing in one reads what the other writes (G's phase takes
D's input gradient only, D's phase D's weight gradients), so the math is the sequential order's.
The random draws of a micro-batch (augmentation, mix-and-match) are seeded from (seed, step,
micro-batch number), so a resumed run and a run on another number of processes draw the same
numbers.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import math

import torch

from d2g_fast.train.data import micro_batch_seed

# metrics.csv columns filled by a step, in order; the step sums them over micro-batches and
# processes and divides by the micro-batch count.
LOSS_KEYS = ("e_latentlpips", "g_gan", "d_loss", "d_gan", "r1", "d_real", "d_fake")


def autocast(run):
    if run.config.precision == "bf16":
        return torch.autocast(device_type=run.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def conditioning(run, batch: dict) -> tuple[torch.Tensor, dict | None]:
    """(encoder_hidden_states [B, L, D] float32, added_cond_kwargs or None) of a batch: the
    stored prompt embeddings when the store holds them, else the teacher's text encoder(s).
    A guidance-conditioned G (pairs collected over several scales) also gets each pair's
    scale as ``added_cond_kwargs["guidance"]`` [B], which G and D read and mix-and-match keeps
    with its condition."""
    ehs, added = _text_conditioning(run, batch)
    if "guidance" in batch and getattr(run.generator, "guidance_conditioned", False):
        added = {**(added or {}), "guidance": batch["guidance"].to(run.device, torch.float32)}
    return ehs, added


def _text_conditioning(run, batch: dict) -> tuple[torch.Tensor, dict | None]:
    teacher = run.teacher
    if "prompt_embeds" in batch:
        ehs = batch["prompt_embeds"].to(run.device, torch.float32)
        pooled = batch.get("pooled_prompt_embeds")
        pooled = pooled.to(run.device, torch.float32) if pooled is not None else None
        return teacher.conditioning_from_store(ehs, pooled)
    with torch.no_grad():
        cond = teacher.encode_prompts(list(batch["prompt"]), guided=False)
    added = None
    if cond.added_cond_kwargs:
        added = {k: v.float() for k, v in cond.added_cond_kwargs.items()}
    return cond.encoder_hidden_states.float(), added


def gan_active(run, step: int) -> bool:
    return run.config.lambda_gan > 0 and step >= run.config.warmup_steps


def gan_gradient(run, fake: torch.Tensor, micro: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_GAN(G), dL_GAN/dfake): D's verdict on G's fakes and its gradient with respect to the
    fakes only. Asking autograd for that one input leaves D's weight gradients uncomputed (D is
    frozen for G's step) without touching D's parameters, which also works under FSDP, where
    the weights D computes with are not the parameters a caller could freeze."""
    from d2g_fast.losses import generator_loss

    leaf = fake.detach().requires_grad_(True)
    gan = generator_loss(run.discriminator, leaf, micro["noise"], micro["ehs"], micro["added"])
    (grad,) = torch.autograd.grad(gan, leaf)
    return gan.detach(), grad


def generator_forward(run, micro: dict) -> torch.Tensor:
    """G(z, c) of a prepared micro-batch, with its graph; stores the detached fake, which D's
    phase judges, in ``micro["fake"]``."""
    with autocast(run):
        fake = run.g_forward(micro["noise"], micro["ehs"], micro["added"])
    micro["fake"] = fake.detach()
    return fake


def generator_micro_step(run, micro: dict, step: int, scale: float) -> dict:
    """G's forward, loss and backward on one prepared micro-batch (see generator_loss_step)."""
    return generator_loss_step(run, micro, generator_forward(run, micro), step, scale)


def generator_loss_step(run, micro: dict, fake: torch.Tensor, step: int, scale: float) -> dict:
    """G's loss on its fakes, backpropagated into G (times ``scale``).
    Returns {"e_latentlpips", "g_gan" (None in warm-up)}."""
    torch.manual_seed(micro["seed"])  # the augmentation draws (host or device sampler)
    # run.regression: --regression-loss (E-LatentLPIPS by default); older callers' Runs lack it.
    regression = (run.regression(fake, micro["target"]) if run.regression is not None
                  else run.lpips(fake, micro["target"])).mean()
    loss = regression
    gan = None
    if gan_active(run, step):
        gan, grad = gan_gradient(run, fake, micro)
        # d/dG of <fake, grad> is the GAN loss's gradient through G.
        loss = loss + run.config.lambda_gan * (fake * grad).sum()
    (loss * scale).backward()
    return {"e_latentlpips": regression.detach(), "g_gan": gan}


def discriminator_micro_step(run, micro: dict, step: int, scale: float) -> dict:
    """D's loss on one micro-batch (teacher latents vs G's detached fakes), backpropagated."""
    draws = torch.Generator().manual_seed(micro["seed"])  # mix-and-match
    out = run.d_loss(run.discriminator, micro["target"], micro["fake"], micro["noise"],
                     micro["ehs"], micro["added"], step=step, generator=draws)
    (out.loss * scale).backward()
    return {"d_loss": out.loss.detach(), "d_gan": out.gan_loss.detach(),
            "r1": None if out.r1_penalty is None else out.r1_penalty.detach(),
            "d_real": out.real_score.mean(), "d_fake": out.fake_score.mean()}


def overlaps(run, step: int) -> bool:
    """Whether this step runs its phases side by side (--overlap-phases). Not on R1 steps: R1
    switches attention to the math backend through a process-wide setting that G's phase, on
    the other thread, would see for part of its step (a race on its rounding)."""
    return (run.phase_pool is not None and run.config.lambda_gan > 0
            and not run.d_loss.is_r1_step(step))


def overlapped_micro_step(run, micro: dict, step: int, scale: float) -> dict:
    """G's forward, then G's loss and backward on this thread beside D's step on the phase
    pool's, each with half of the intra-op threads (small kernels scale poorly over cores; two
    independent halves keep them busy). Returns both phases' logs."""
    fake = generator_forward(run, micro)
    total = torch.get_num_threads()
    half = max(1, total // 2)
    torch.set_num_threads(half)
    try:
        d_phase = run.phase_pool.submit(_on_threads, half, discriminator_micro_step, run, micro,
                                        step, scale)
        try:
            entry = generator_loss_step(run, micro, fake, step, scale)
        except BaseException:
            concurrent.futures.wait([d_phase])  # D's thread finishes before the error leaves
            raise
        entry.update(d_phase.result())
    finally:
        torch.set_num_threads(total)
    return entry


def _on_threads(threads: int, fn, *args):
    torch.set_num_threads(threads)  # this thread's OpenMP team (a new thread starts with all)
    return fn(*args)


def prepare_micro_batch(run, batch: dict, step: int, micro: int) -> dict:
    """Tensors on the device, the text conditioning, and the seed of the micro-batch's draws."""
    ehs, added = conditioning(run, batch)
    return {"seed": micro_batch_seed(run.config.seed, step, micro),
            "noise": batch["noise"].to(run.device, torch.float32),
            "target": batch["latent"].to(run.device, torch.float32), "ehs": ehs, "added": added}


def _sum_logs(logs: list[dict], run) -> dict:
    """Mean of every loss over all micro-batches of all processes (one all-reduce)."""
    values = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=run.device)
    present = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=run.device)
    for entry in logs:
        for k, key in enumerate(LOSS_KEYS):
            v = entry.get(key)
            if v is not None:
                values[k] += v.double()
                present[k] += 1
    run.procs.sum_(values)
    run.procs.sum_(present)
    return {key: (float(values[k] / present[k]) if present[k] > 0 else None)
            for k, key in enumerate(LOSS_KEYS)}


def _clip(params, max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def update_ema(run) -> None:
    if run.ema is None:
        return
    with torch.no_grad():
        # The trained parameters only (a LoRA student's frozen base equals its EMA's).
        pairs = [(e, p) for e, p in zip(run.ema.parameters(), run.generator.parameters())
                 if p.requires_grad]
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs],
                             1.0 - run.config.ema_decay)


def apply_updates(run, losses: dict) -> dict:
    """Average gradients, skip on NaN/Inf, clip, step both optimisers and the EMA."""
    from d2g_fast.train.distributed import average_gradients

    g_params = list(run.generator.parameters())
    d_params = run.d_params
    if not run.sharded:
        average_gradients(g_params, run.procs)
        average_gradients(d_params, run.procs)
    finite = all(v is None or math.isfinite(v) for v in losses.values())
    if finite:
        grad_norm_g = _clip(g_params, run.config.grad_clip)
        grad_norm_d = _clip(d_params, run.config.grad_clip)
        finite = math.isfinite(grad_norm_g) and math.isfinite(grad_norm_d)
    else:
        grad_norm_g = grad_norm_d = float("nan")
    if finite:
        run.opt_g.step()
        run.opt_d.step()
        update_ema(run)
        run.counters["nonfinite_in_a_row"] = 0
    else:
        run.counters["nonfinite_in_a_row"] += 1
        run.counters["nonfinite_skipped"] += 1
    run.opt_g.zero_grad(set_to_none=True)
    run.opt_d.zero_grad(set_to_none=True)
    if run.sharded:
        from d2g_fast.train.distributed import reshard_all

        reshard_all(run.discriminator)
    return {"grad_norm_g": grad_norm_g, "grad_norm_d": grad_norm_d, "skipped": not finite}


def train_step(run, batches: list[dict] | dict, step: int) -> dict:
    """One optimiser step on this process's micro-batches of step ``step``.

    Args:
        run: from :func:`d2g_fast.train.build_run`.
        batches: this process's ``grad_accum`` micro-batches (a single dict when grad_accum is
            1): {"noise": [B, C, h, w], "latent": [B, C, h, w], "prompt": list of B str} and
            optionally "prompt_embeds" [B, L, D] (+ "pooled_prompt_embeds" [B, P] for SDXL).
        step: the step number (decides warm-up, R1 and the random draws).
    Returns:
        the step's metrics (floats; None where a loss did not run this step), including
        "samples" (the global batch) and "skipped".
    """
    if isinstance(batches, dict):
        batches = [batches]
    if len(batches) != run.config.grad_accum:
        raise ValueError(f"train_step: {len(batches)} micro-batches for grad_accum "
                         f"{run.config.grad_accum}")
    run.generator.train()
    run.discriminator.train()
    micros = [prepare_micro_batch(run, batch, step, a * run.procs.world + run.procs.rank)
              for a, batch in enumerate(batches)]
    # FSDP averages gradients over processes itself; replicated training sums them.
    scale = 1.0 / (run.config.grad_accum if run.sharded else run.micro_batches)
    if overlaps(run, step):
        logs = [overlapped_micro_step(run, m, step, scale) for m in micros]
    else:
        logs = [generator_micro_step(run, m, step, scale) for m in micros]
        # Regression only (lambda_GAN = 0): G never reads D, so D's phase would only cost time.
        if run.config.lambda_gan > 0:
            for m, entry in zip(micros, logs):
                entry.update(discriminator_micro_step(run, m, step, scale))
    losses = _sum_logs(logs, run)
    update = apply_updates(run, losses)
    if run.counters["nonfinite_in_a_row"] >= run.config.max_nonfinite:
        raise FloatingPointError(
            f"{run.counters['nonfinite_in_a_row']} steps in a row had a NaN/Inf loss or gradient "
            f"(last losses {losses}); stopping (max_nonfinite, --max-nonfinite). Lower the "
            f"learning rates (--lr-g/--lr-d), try --precision fp32, or check the pairs "
            f"(d2g verify)")
    return {**losses, **update, "samples": run.global_batch}
