"""SDXL (``StableDiffusionXLPipeline``): two CLIP text encoders (penultimate hidden states of
both, pooled output of the second), a UNet with "text_time" added conditioning (pooled text
embedding and six time ids: original size, crop, target size).

Guidance: classifier-free guidance when ``guidance > 1``; an absent negative prompt gives zeros
when the folder asks for it (``force_zeros_for_empty_prompt``, true for SDXL base). The exported
one-step student takes ``guidance_scale=1``.
"""
from __future__ import annotations

import torch

from d2g_fast.teacher.families.base import Conditioning
from d2g_fast.teacher.families.sd import UNetFamily


class SDXLFamily(UNetFamily):
    """``StableDiffusionXLPipeline`` teachers."""

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    optional_components = ("tokenizer", "text_encoder")
    lpips_encoder = "sdxl"

    def check_components(self) -> None:
        super().check_components()
        if getattr(self.unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError("unet: an SDXL-shaped teacher (two text encoders) needs a UNet with "
                             "addition_embed_type='text_time'")

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.pipeline_config.get("force_zeros_for_empty_prompt", True))

    def _encode(self, texts, max_length=None):
        hidden, pooled = [], None
        for tok, enc in self._text_pairs():
            inputs = tok(texts, padding="max_length",
                         max_length=max_length or tok.model_max_length, truncation=True,
                         return_tensors="pt")
            out = enc(inputs.input_ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def time_ids(self, n: int) -> torch.Tensor:
        """The added time ids [n, 6] for this teacher's resolution (no crop), as the SDXL
        pipeline builds them."""
        ids = [self.height, self.width, 0, 0, self.height, self.width]
        proj_dim = self.text_encoder_2.config.projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if self.unet.config.addition_time_embed_dim * len(ids) + proj_dim != expected:
            raise ValueError(f"unet: expects an added embedding of {expected} features, the "
                             f"text encoder and time ids give "
                             f"{self.unet.config.addition_time_embed_dim * len(ids) + proj_dim}")
        return torch.tensor([ids], dtype=self.dtype, device=self.device).repeat(n, 1)

    def _added(self, pooled, n):
        return {"text_embeds": pooled, "time_ids": self.time_ids(n)}

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt=None, guided=True) -> Conditioning:
        """As ``StableDiffusionXLPipeline.encode_prompt`` (no crop, target = resolution)."""
        return self._encode_guided(prompts, negative_prompt, guided,
                                   zeros_for_empty=self.force_zeros_for_empty_prompt)

    def conditioning_from_store(self, prompt_embeds, pooled_prompt_embeds):
        added = {"text_embeds": pooled_prompt_embeds,
                 "time_ids": self.time_ids(prompt_embeds.shape[0]).to(
                     prompt_embeds.device, prompt_embeds.dtype)}
        return prompt_embeds, added
