"""FLUX.1 (``FluxPipeline``, ``FluxTransformer2DModel``): dev (guidance-distilled,
``guidance_embeds=True``) and schnell (no guidance embedding).

Prompt encoding as ``FluxPipeline.encode_prompt``: the CLIP-L pooled output (77 tokens in) and
the T5 encoder's last hidden states (512 tokens, the pipeline's ``max_sequence_length``); text
position ids are zeros. Stored per pair: ``prompt_embeds`` [512, 4096] (4 MB per pair in bf16:
storing them is optional) and ``pooled_prompt_embeds`` [768].

Latents: the network sees 2x2-packed tokens [B, (h/2)(w/2), 4C]; everything outside the network
call, and the store, holds them UNPACKED as [B, 16, h, w] (``FluxPipeline._unpack_latents``
layout; pack with ``_pack_latents`` to feed a stock pipeline's ``latents=``).

Scheduler: the folder's FlowMatchEulerDiscreteScheduler with the pipeline's sigmas
linspace(1, 1/steps, steps) and, with ``use_dynamic_shifting``, the resolution-dependent shift
mu = calculate_shift((h/2)(w/2)).

Guidance: no classifier-free guidance and no batch doubling; for dev the ``guidance`` value is
fed to the guidance embedding (the pipeline's ``guidance_scale``, default 3.5), for schnell it is
ignored. No negative prompt (true CFG is not supported). The exported one-step student is called
with ``guidance_scale`` = the collection guidance (dev; G was trained with that embedding).
"""
from __future__ import annotations

import numpy as np
import torch

from d2g_fast.models.transformer_discriminator import FluxDiscriminator
from d2g_fast.teacher.families.base import Conditioning
from d2g_fast.teacher.families.flow import FlowFamily, calculate_shift


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C] (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w] (``FluxPipeline._unpack_latents``)."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Position ids [(h/2)(w/2), 3] of the packed image tokens (row, column in axes 1, 2)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(FlowFamily):
    """``FluxPipeline`` teachers (FLUX.1-dev, FLUX.1-schnell)."""

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    text_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    lpips_encoder = "flux"
    default_max_shift = 1.15
    max_sequence_length = 512  # the pipeline's default for T5
    default_sample_size = 128  # FluxPipeline.default_sample_size (latent pixels per side)
    default_guidance = 3.5     # FluxPipeline's guidance_scale default (dev's embedded guidance)
    latent_note = ("unpacked [16, h, w]; FluxPipeline works on 2x2-packed tokens "
                   "[(h/2)(w/2), 64]: FluxPipeline._pack_latents / _unpack_latents convert")

    @classmethod
    def patch_of(cls, denoiser_config: dict) -> int:
        return 2 * int(denoiser_config.get("patch_size", 1))  # the pipeline's 2x2 packing

    def check_components(self) -> None:
        cfg = self.transformer.config
        if cfg.in_channels != 4 * self.latent_channels:
            raise ValueError(f"transformer: in_channels {cfg.in_channels} is not 4 x the VAE's "
                             f"latent_channels {self.latent_channels} (2x2 packing)")
        for tok, enc in self.text_pairs:
            if getattr(self, enc) is None or getattr(self, tok) is None:
                raise ValueError(f"teacher (--teacher): a FLUX folder needs {tok}/ and {enc}/")

    def default_resolution(self):
        size = self.default_sample_size * self.vae_scale_factor
        return size, size

    def max_sequence_lengths(self):
        return [self.tokenizer.model_max_length, self.max_sequence_length]

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.get("guidance_embeds", False))

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt=None, guided=True) -> Conditioning:
        """As ``FluxPipeline.encode_prompt`` (``guided`` and ``negative_prompt`` do not apply:
        FLUX embeds its guidance)."""
        self.check_sample_options(negative_prompt)
        texts = list(prompts)
        ids = self.tokenizer(texts, padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True,
                             return_overflowing_tokens=False, return_length=False,
                             return_tensors="pt").input_ids
        pooled = self.text_encoder(ids.to(self.device), output_hidden_states=False).pooler_output
        pooled = pooled.to(self.text_encoder.dtype)
        ids = self.tokenizer_2(texts, padding="max_length", max_length=self.max_sequence_length,
                               truncation=True, return_length=False,
                               return_overflowing_tokens=False, return_tensors="pt").input_ids
        embeds = self.text_encoder_2(ids.to(self.device), output_hidden_states=False)[0]
        embeds, pooled = embeds.to(self.dtype), pooled.to(self.dtype)
        return Conditioning(embeds, {"pooled_projections": pooled}, embeds, pooled)

    @classmethod
    def check_sample_options(cls, negative_prompt, scheduler=None) -> None:
        super().check_sample_options(negative_prompt, scheduler)
        if negative_prompt is not None:
            raise ValueError("negative_prompt (--negative-prompt): FLUX teachers take no negative "
                             "prompt (their guidance is embedded, not classifier-free)")

    def uses_cfg(self, guidance: float) -> bool:
        return False

    def guidance_for_generator(self, collection_guidance):
        if not self.guidance_embeds or collection_guidance is None:
            return None
        return float(collection_guidance)

    def export_guidance(self, collection_guidance):
        """dev: the collection guidance (G's embedding); schnell: None (ignored)."""
        return self.guidance_for_generator(collection_guidance)

    def add_guidance_input(self, net) -> None:
        """dev: its own guidance embedding already is one (nothing to add); schnell: none."""
        if not net.config.get("guidance_embeds", False):
            super().add_guidance_input(net)

    @classmethod
    def pipeline_latents(cls, latents):
        return pack(latents)

    # ------------------------------------------------------------------ network
    @classmethod
    def denoise(cls, net, x, t, encoder_hidden_states, added_cond_kwargs=None, guidance=None):
        b, _, h, w = x.shape
        t = torch.as_tensor(t, device=x.device)
        timestep = (t.expand(b) if t.ndim == 0 else t).to(x.dtype)
        g = None
        if net.config.guidance_embeds:
            if guidance is None:
                raise ValueError("guidance: a guidance-embedded FLUX transformer needs a value")
            # One value for the batch, or one per row (a guidance-conditioned student).
            g = torch.as_tensor(guidance, device=x.device, dtype=torch.float32).reshape(-1)
            g = g.expand(b)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device,
                              dtype=encoder_hidden_states.dtype)
        out = net(hidden_states=pack(x), timestep=timestep / 1000, guidance=g,
                  pooled_projections=added_cond_kwargs["pooled_projections"],
                  encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids,
                  img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def set_timesteps(self, scheduler, steps: int) -> None:
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        _, h, w = self.latent_shape
        mu = calculate_shift((h // 2) * (w // 2), scheduler.config, self.default_max_shift)
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)

    @classmethod
    def discriminator_class(cls) -> type:
        return FluxDiscriminator

    def blocks(self, net) -> list:
        """The double-stream blocks, then the single-stream blocks; each returns (text tokens,
        image tokens)."""
        return list(net.transformer_blocks) + list(net.single_transformer_blocks)
