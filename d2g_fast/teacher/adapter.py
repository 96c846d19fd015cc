"""``Teacher``: the entry point that picks a teacher family (kept for existing callers).

``Teacher.from_pretrained(folder)`` and ``Teacher.from_pipeline(pipe)`` return an instance of the
folder's / pipeline's family class (:mod:`d2g_fast.teacher.families`); ``Teacher(unet,
text_encoder, tokenizer, scheduler, text_encoder_2=..., ...)`` builds a UNet teacher (SDXL when a
second text encoder is given) from model objects. Everything family-specific lives in the family
classes; callers use only their common interface.
"""
from __future__ import annotations

from d2g_fast.teacher.families import (SDFamily, SDXLFamily, family_for_pipeline,
                                       load_teacher)
from d2g_fast.teacher.families.base import (Conditioning, NonFiniteLatentError,  # noqa: F401
                                            TeacherFamily, clean_config, parse_dtype)


class Teacher:
    """Factory of teacher family instances (see the module docstring)."""

    def __new__(cls, unet, text_encoder, tokenizer, scheduler, *, text_encoder_2=None,
                tokenizer_2=None, vae_config=None, force_zeros_for_empty_prompt: bool = True,
                resolution=None, source=None):
        family = SDXLFamily if text_encoder_2 is not None else SDFamily
        components = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer,
                      "scheduler": scheduler}
        if text_encoder_2 is not None:
            components.update(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        return family(components, vae_config=vae_config,
                      pipeline_config={"force_zeros_for_empty_prompt":
                                       force_zeros_for_empty_prompt},
                      resolution=resolution, source=source)

    @staticmethod
    def from_pretrained(path: str, *, dtype="float32", device="cpu",
                        resolution=None) -> TeacherFamily:
        """A local diffusers folder as its family (see ``families.load_teacher``)."""
        return load_teacher(path, dtype=dtype, device=device, resolution=resolution)

    @staticmethod
    def from_pipeline(pipe, resolution=None, source: str | None = None) -> TeacherFamily:
        """A diffusers pipeline object as its family."""
        return family_for_pipeline(pipe).from_pipeline(pipe, resolution=resolution,
                                                       source=source)
