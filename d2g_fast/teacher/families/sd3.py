"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``).

Prompt encoding as ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L and CLIP-G penultimate
hidden states (77 tokens each) concatenated on the feature axis and zero-padded to the T5 width,
followed on the token axis by the T5 encoder's output (256 tokens, the pipeline's
``max_sequence_length``); without a T5 encoder in the folder the pipeline's zeros stand in for
it. The pooled embedding is [CLIP-L pooled, CLIP-G pooled] (projections). Stored per pair:
``prompt_embeds`` [333, joint_attention_dim] and ``pooled_prompt_embeds`` [2048] (SD3 sizes:
333 x 4096 x 2 bytes = 2.7 MB per pair in bf16).

Guidance: classifier-free guidance when ``guidance > 1`` (the negative prompt, default "", is
encoded: no zeros), both halves in one batched call. The exported one-step student takes
``guidance_scale=1`` (or any value <= 1): it was distilled from guided samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from d2g_fast.models.transformer_discriminator import SD3Discriminator
from d2g_fast.teacher.families.base import Conditioning
from d2g_fast.teacher.families.flow import FlowFamily, calculate_shift


class SD3Family(FlowFamily):
    """``StableDiffusion3Pipeline`` teachers (SD3-medium, SD3.5 large/medium)."""

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    text_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                  ("tokenizer_3", "text_encoder_3"))
    optional_components = ("tokenizer_3", "text_encoder_3")
    lpips_encoder = "sd3"
    default_max_shift = 1.16
    max_sequence_length = 256  # the pipeline's default for T5

    @classmethod
    def patch_of(cls, denoiser_config: dict) -> int:
        return int(denoiser_config.get("patch_size", 2))

    def check_components(self) -> None:
        cfg = self.transformer.config
        if cfg.in_channels != self.latent_channels:
            raise ValueError(f"transformer: in_channels {cfg.in_channels} differs from the VAE's "
                             f"latent_channels {self.latent_channels}")
        self.patch = int(cfg.patch_size)
        for tok, enc in self.text_pairs[:2]:
            if getattr(self, enc) is None or getattr(self, tok) is None:
                raise ValueError(f"teacher (--teacher): an SD3 folder needs {tok}/ and {enc}/")

    def default_resolution(self):
        size = int(self.transformer.config.sample_size) * self.vae_scale_factor
        return size, size

    def _resolve_resolution(self, resolution):
        h, w = super()._resolve_resolution(resolution)
        limit = self.transformer.config.pos_embed_max_size
        if limit is not None and max(h, w) // self.vae_scale_factor // self.patch > limit:
            raise ValueError(f"resolution (--resolution): {(h, w)} needs more than the "
                             f"transformer's pos_embed_max_size of {limit} patches per side")
        return h, w

    def max_sequence_lengths(self):
        limits = [self.tokenizer.model_max_length] * 2
        return limits + ([self.max_sequence_length] if self.text_encoder_3 is not None else [])

    # ------------------------------------------------------------------ prompts
    def _clip(self, texts, tok, enc):
        ids = tok(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        out = enc(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.text_encoder.dtype), out[0]

    def _t5(self, texts):
        if self.text_encoder_3 is None:  # the pipeline's stand-in
            return torch.zeros(len(texts), self.max_sequence_length,
                               self.transformer.config.joint_attention_dim,
                               device=self.device, dtype=self.text_encoder.dtype)
        ids = self.tokenizer_3(texts, padding="max_length", max_length=self.max_sequence_length,
                               truncation=True, add_special_tokens=True,
                               return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(self.device))[0].to(self.text_encoder_3.dtype)

    def _encode(self, texts):
        hidden_l, pooled_l = self._clip(texts, self.tokenizer, self.text_encoder)
        hidden_g, pooled_g = self._clip(texts, self.tokenizer_2, self.text_encoder_2)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        t5 = self._t5(texts)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt=None, guided=True) -> Conditioning:
        """As ``StableDiffusion3Pipeline.encode_prompt`` (see the module docstring)."""
        n = len(prompts)
        embeds, pooled = self._encode(list(prompts))
        embeds, pooled = embeds.to(self.dtype), pooled.to(self.dtype)
        if not guided:
            return Conditioning(embeds, {"pooled_projections": pooled}, embeds, pooled)
        key = (negative_prompt, n, self.device, self.dtype)
        if key not in self._negative_cache:
            neg, neg_pooled = self._encode([negative_prompt or ""] * n)
            self._negative_cache[key] = (neg.to(self.dtype), neg_pooled.to(self.dtype))
        neg, neg_pooled = self._negative_cache[key]
        return Conditioning(torch.cat([neg, embeds]),
                            {"pooled_projections": torch.cat([neg_pooled, pooled])},
                            embeds, pooled)

    # ------------------------------------------------------------------ network
    @classmethod
    def denoise(cls, net, x, t, encoder_hidden_states, added_cond_kwargs=None, guidance=None):
        t = torch.as_tensor(t, device=x.device)
        timestep = t.expand(x.shape[0]) if t.ndim == 0 else t
        return net(hidden_states=x, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                   pooled_projections=added_cond_kwargs["pooled_projections"],
                   return_dict=False)[0]

    def set_timesteps(self, scheduler, steps: int) -> None:
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            _, h, w = self.latent_shape
            kwargs["mu"] = calculate_shift((h // self.patch) * (w // self.patch),
                                           scheduler.config, self.default_max_shift)
        scheduler.set_timesteps(steps, device=self.device, **kwargs)

    @classmethod
    def discriminator_class(cls) -> type:
        return SD3Discriminator

    def blocks(self, net) -> list:
        """The joint (MMDiT) blocks; each returns (text tokens, image tokens)."""
        return list(net.transformer_blocks)
