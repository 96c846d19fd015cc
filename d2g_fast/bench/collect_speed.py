"""ODE-pair collection, one batch: our Teacher against diffusers' own pipeline loop.

One call of the returned function = B pairs sampled at S DDIM steps with classifier-free guidance,
from the pairs' noise to the final latents on the host. Providers (same device, dtype, batch,
steps and guidance):

    diffusers       the architecture's diffusers pipeline, ``output_type="latent"`` (baseline)
    ours            :class:`d2g_fast.teacher.Teacher`, the collector's path (per-pair noise,
                    prompt encoding, one batched CFG UNet call per step, latents to the host),
                    with channels_last + fused QKV on GPUs, as ``d2g collect`` runs by default
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
                    guidance: float = GUIDANCE, pipeline_cls=None) -> Callable[[], torch.Tensor]:
    """Build the one-batch collection callable of ``provider`` from pipeline components.

    Args:
        comps: pipeline keyword arguments (e.g. :func:`d2g_fast.bench.archs.components`), already
            on ``device`` in the measured dtype. The "ours" providers modify the UNet in place
            (fused QKV, channels_last): build fresh components per provider.
        batch: pairs per call; steps: sampler steps; guidance: classifier-free guidance scale.
        pipeline_cls: the diffusers pipeline class of the baseline (default
            StableDiffusionPipeline; StableDiffusionXLPipeline for SDXL components).
    Returns:
        A zero-argument function returning the [batch, C, h, w] latents on the host.
    Raises:
        Unavailable: the provider cannot run on ``device``.
    """
    from d2g_fast.data.prompts import load_prompts
    from d2g_fast.data.seeding import batch_noise
    from d2g_fast.teacher import Teacher

    reason = unavailable_reason(provider, device)
    if reason:
        raise Unavailable(reason)
    prompts = (load_prompts(None) * batch)[:batch]
    if provider == "diffusers":
        if pipeline_cls is None:
            from diffusers import StableDiffusionPipeline as pipeline_cls
        pipe = pipeline_cls(**comps)
        pipe.set_progress_bar_config(disable=True)
        unet = comps["unet"].config
        shape = (unet.in_channels, unet.sample_size, unet.sample_size)
        dtype = comps["unet"].dtype

        def run_diffusers():
            noise = batch_noise(0, range(batch), shape).to(device, dtype)
            return pipe(prompts, latents=noise, num_inference_steps=steps, guidance_scale=guidance,
                        output_type="latent").images.cpu()
        return run_diffusers

    teacher = Teacher(comps["unet"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"],
                      text_encoder_2=comps.get("text_encoder_2"),
                      tokenizer_2=comps.get("tokenizer_2"), vae_config=comps["vae"].config)
    gpu = device.startswith("cuda")
    teacher.optimize(channels_last=gpu, fuse_qkv=gpu, compile=provider == "ours-compiled",
                     cuda_graphs=provider == "ours-graphs")
    if provider == "ours-compiled":  # compile outside the timing
        teacher.sample(batch_noise(0, range(batch), teacher.latent_shape), prompts, steps=2,
                       guidance=guidance)

    def run_ours():
        noise = batch_noise(0, range(batch), teacher.latent_shape)
        return teacher.sample(noise, prompts, steps=steps, guidance=guidance,
                              scheduler="ddim").cpu()
    return run_ours
