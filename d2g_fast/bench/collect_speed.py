"""ODE-pair collection, one batch: our Teacher against diffusers' own pipeline loop.

One call of the returned function = B pairs sampled at S DDIM steps with classifier-free guidance,
from the pairs' noise to the final latents on the host. Providers (same device, dtype, batch,
steps and guidance):

    diffusers       the architecture's diffusers pipeline, ``output_type="latent"`` (baseline)
    ours            the teacher family (:mod:`d2g_fast.teacher.families`), the collector's path
                    (per-pair noise, prompt encoding, one batched CFG network call per step,
                    latents to the host), with channels_last + fused QKV on GPUs, as
                    ``d2g collect`` runs by default; the family's own sampler (DDIM for UNets,
                    the folder's flow-matching Euler scheduler for SD3/FLUX)
    ours-graphs     the same with the UNet forward replayed as a CUDA graph (GPU only)
    ours-compiled   the same with ``torch.compile`` of the UNet (GPU only; compiling a full UNet
                    takes about a minute, outside the timing)
"""
from __future__ import annotations

from typing import Callable

import torch

PROVIDERS = ("diffusers", "ours", "ours-graphs", "ours-compiled")
GUIDANCE = 8.0
"""Classifier-free guidance of the paper's SD1.5 pairs."""


class Unavailable(Exception):
    """This provider cannot run on this device (the reason is the message)."""


def unavailable_reason(provider: str, device: str) -> str | None:
    """None when ``provider`` can run on ``device``, else why not."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider: one of {PROVIDERS}, got {provider!r}")
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        return "no GPU"
    if provider in ("ours-graphs", "ours-compiled") and not gpu:
        return f"{provider} needs a GPU"
    return None


def make_collect_fn(provider: str, comps: dict, *, device: str, batch: int, steps: int,
                    guidance: float = GUIDANCE, pipeline_cls=None,
                    resolution: int | None = None) -> Callable[[], torch.Tensor]:
    """Build the one-batch collection callable of ``provider`` from pipeline components.

    Args:
        comps: pipeline keyword arguments (e.g. :func:`d2g_fast.bench.archs.components`), already
            on ``device`` in the measured dtype. The "ours" providers modify the UNet in place
            (fused QKV, channels_last): build fresh components per provider.
        batch: pairs per call; steps: sampler steps; guidance: classifier-free guidance scale.
        pipeline_cls: the diffusers pipeline class of the baseline (default
            StableDiffusionPipeline; StableDiffusionXLPipeline for SDXL components,
            StableDiffusion3Pipeline / FluxPipeline for flow transformers).
        resolution: the image side in pixels (default: the pipeline's own).
    Returns:
        A zero-argument function returning the batch's latents on the host: [batch, C, h, w]
        ("diffusers" for FLUX: the pipeline's packed [batch, tokens, 4C]).
    Raises:
        Unavailable: the provider cannot run on ``device``.
    """
    from d2g_fast.data.prompts import load_prompts
    from d2g_fast.data.seeding import batch_noise
    from d2g_fast.teacher.families import family_for_pipeline

    reason = unavailable_reason(provider, device)
    if reason:
        raise Unavailable(reason)
    prompts = (load_prompts(None) * batch)[:batch]
    if pipeline_cls is None:
        from diffusers import StableDiffusionPipeline as pipeline_cls
    pipe = pipeline_cls(**comps)
    pipe.set_progress_bar_config(disable=True)
    family = family_for_pipeline(pipe)
    teacher = family.from_pipeline(pipe, resolution=resolution)
    if provider == "diffusers":
        dtype = teacher.dtype

        def run_diffusers():
            noise = batch_noise(0, range(batch), teacher.latent_shape).to(device, dtype)
            return pipe(prompts, latents=family.pipeline_latents(noise),
                        num_inference_steps=steps, guidance_scale=guidance,
                        height=teacher.height, width=teacher.width,
                        output_type="latent").images.cpu()
        return run_diffusers

    gpu = device.startswith("cuda")
    teacher.optimize(channels_last=gpu, fuse_qkv=gpu, compile=provider == "ours-compiled",
                     cuda_graphs=provider == "ours-graphs")
    if provider == "ours-compiled":  # compile outside the timing
        teacher.sample(batch_noise(0, range(batch), teacher.latent_shape), prompts, steps=2,
                       guidance=guidance)

    def run_ours():
        noise = batch_noise(0, range(batch), teacher.latent_shape)
        return teacher.sample(noise, prompts, steps=steps, guidance=guidance).cpu()
    return run_ours
