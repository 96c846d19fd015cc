"""Helpers for tests, benchmarks and demos: tiny diffusers models with random weights.

Nothing here downloads anything; see :mod:`d2g_fast.testing.tiny`.
"""
from d2g_fast.testing.tiny import (  # noqa: F401
    tiny_clip_tokenizer,
    tiny_sd_components,
    tiny_sd_pipeline,
    tiny_sdxl_components,
    tiny_sdxl_pipeline,
    save_tiny_sd_pipeline,
    save_tiny_sdxl_pipeline,
    SD15_UNET_CONFIG,
    SD15_TEXT_CONFIG,
    sd15_shaped_components,
)
