"""The teacher architectures measured by ``d2g bench``: real configs, random weights, no download.

Each architecture gives the UNet, text encoder(s), VAE and scheduler configs of the released
model, so that speed and memory are those of the real network (the weights never matter for
timing). The tokenizer is the tiny offline one of :mod:`d2g_fast.testing.tiny`: its ids fit every
vocabulary here and tokenisation cost is the same order as CLIP's.

    sd15  Stable Diffusion 1.5: 4x64x64 latents (512 px), CLIP ViT-L/14 text (768-d), epsilon
    sd21  Stable Diffusion 2.1 (the 768-v model): 4x96x96 latents (768 px), OpenCLIP ViT-H/14
          text (1024-d, penultimate layer: 23 layers), v-prediction
    sdxl  SDXL base 1.0: 4x128x128 latents (1024 px), CLIP ViT-L + OpenCLIP bigG text (2048-d
          context, 1280-d pooled), "text_time" conditioning, epsilon
    tiny  the tiny SD-shaped test model (4x8x8 latents, 16 px): runs on a CPU in seconds
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ARCHS = ("sd15", "sd21", "sdxl", "tiny")

SD21_UNET_CONFIG = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024, use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    act_fn="silu", downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32)
"""The UNet config of Stable Diffusion 2.1 (865 M parameters)."""

SD21_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                        hidden_act="gelu", projection_dim=512)
"""OpenCLIP ViT-H/14 text tower as shipped with SD2.1 (the last layer dropped: 23 layers)."""

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    norm_eps=1e-5, norm_num_groups=32)
"""The UNet config of SDXL base 1.0 (2.6 B parameters)."""

SDXL_TEXT2_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                         num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                         hidden_act="gelu", projection_dim=1280)
"""OpenCLIP ViT-bigG/14 text tower of SDXL (with its 1280-d projection)."""

SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
"""The AutoencoderKL config of SD1.5/SD2.1/SDXL (same architecture; scaling factors differ)."""


@dataclass(frozen=True)
class ArchInfo:
    name: str
    description: str
    prediction_type: str
    scaling_factor: float
    lpips_encoder: str   # E-LatentLPIPS latent space of the architecture
    latent: tuple[int, int, int]   # (C, h, w) of one latent at the native resolution


ARCH_INFO = {
    "sd15": ArchInfo("sd15", "SD1.5 UNet 4x64x64 (512 px)", "epsilon", 0.18215, "sd15",
                     (4, 64, 64)),
    "sd21": ArchInfo("sd21", "SD2.1-768-v UNet 4x96x96 (768 px)", "v_prediction", 0.18215,
                     "sd21", (4, 96, 96)),
    "sdxl": ArchInfo("sdxl", "SDXL base UNet 4x128x128 (1024 px)", "epsilon", 0.13025, "sdxl",
                     (4, 128, 128)),
    "tiny": ArchInfo("tiny", "tiny SD-shaped UNet 4x8x8 (16 px)", "epsilon", 0.18215, "sd15",
                     (4, 8, 8)),
}


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"arch (--arch): one of {ARCHS}, got {arch!r}")
    return arch


def _cast(module, dtype):
    """``module`` in ``dtype``; untouched when already there (diffusers warns on every cast)."""
    return module if next(module.parameters()).dtype == dtype else module.to(dtype)


def latent_shape(arch: str) -> tuple[int, int, int]:
    """(C, h, w) of one latent of ``arch``."""
    return ARCH_INFO[check_arch(arch)].latent


def _ddim(prediction_type: str):
    from diffusers import DDIMScheduler

    # The released SD1.5/2.1/XL schedules share these betas; DDIM is the collector's sampler.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type)


def _clip_text(config: dict, vocab: dict, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**config, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def vae_decoder(arch: str, device="cpu", dtype=torch.float32):
    """The architecture's AutoencoderKL with random weights and no encoder (only decode runs):
    the VAE the pixel-LPIPS comparison must decode through."""
    from diffusers import AutoencoderKL

    check_arch(arch)
    if arch == "tiny":
        from d2g_fast.testing.tiny import tiny_sd_components
        vae = tiny_sd_components()["vae"]
    else:
        with torch.device(device):
            vae = AutoencoderKL(**SD_VAE_CONFIG, scaling_factor=ARCH_INFO[arch].scaling_factor)
    vae.encoder = None
    return _cast(vae.requires_grad_(False).eval().to(device), dtype)


def components(arch: str, device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
    """Pipeline components of ``arch`` with random weights, built on ``device`` in ``dtype``.

    Args:
        arch: one of :data:`ARCHS`.
    Returns:
        The keyword arguments of ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for
        sdxl). The VAE is the small stand-in of :func:`d2g_fast.testing.tiny.sd15_shaped_components`
        with the scale factor 8 (the collector and the trainer read only its config); use
        :func:`vae_decoder` for a real-size decoder.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from d2g_fast.testing import tiny

    check_arch(arch)
    if arch == "tiny":
        comps = tiny.tiny_sd_components(seed)
        for name in ("unet", "text_encoder", "vae"):
            comps[name] = _cast(comps[name].to(device), dtype)
        return comps
    if arch == "sd15":
        return tiny.sd15_shaped_components(device=device, dtype=dtype, seed=seed)
    tokenizer = tiny.tiny_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    with torch.device(device):
        small_vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4,
                                  scaling_factor=ARCH_INFO[arch].scaling_factor)
        if arch == "sd21":
            unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
            text = _clip_text(SD21_TEXT_CONFIG, vocab)
            comps = dict(text_encoder=text, tokenizer=tokenizer, safety_checker=None,
                         feature_extractor=None, requires_safety_checker=False)
        else:
            unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
            comps = dict(text_encoder=_clip_text(tiny.SD15_TEXT_CONFIG, vocab),
                         text_encoder_2=_clip_text(SDXL_TEXT2_CONFIG, vocab, with_projection=True),
                         tokenizer=tokenizer, tokenizer_2=tiny.tiny_clip_tokenizer())
    for name in ("text_encoder", "text_encoder_2"):
        if name in comps:
            comps[name] = _cast(comps[name], dtype).eval()
    comps.update(unet=_cast(unet, dtype).eval(), vae=_cast(small_vae, dtype).eval(),
                 scheduler=_ddim(ARCH_INFO[arch].prediction_type))
    return comps


def pipeline_class(arch: str):
    """The diffusers pipeline class whose loop is the collection baseline."""
    import diffusers

    return diffusers.StableDiffusionXLPipeline if arch == "sdxl" \
        else diffusers.StableDiffusionPipeline
