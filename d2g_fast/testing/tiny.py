"""Tiny Stable-Diffusion-shaped and SDXL-shaped diffusers models with random weights.

Everything is built from configs and a tokenizer vocabulary written here, so it works offline
(no model hub). The models are small enough that a 4-step guided sample takes well under a
second on a CPU, yet they have the structure of the real ones: cross-attention UNet, CLIP text
encoder(s), a VAE config with the usual scale factor, and for SDXL the second text encoder with a
projection, pooled embeddings and "text_time" added conditioning.

Public API (all arguments optional):
    tiny_clip_tokenizer(model_max_length=77) -> CLIPTokenizer
    tiny_sd_components(seed=0, prediction_type="epsilon") -> dict  # StableDiffusionPipeline kwargs
    tiny_sd_pipeline(seed=0, ...) -> StableDiffusionPipeline
    save_tiny_sd_pipeline(path, seed=0, ...) -> path                # a local diffusers folder
    tiny_sdxl_components(seed=0) -> dict                       # StableDiffusionXLPipeline kwargs
    tiny_sdxl_pipeline(seed=0) -> StableDiffusionXLPipeline
    save_tiny_sdxl_pipeline(path, seed=0) -> path
    sd15_shaped_components(device="cpu", dtype=torch.float32) -> dict   # full-size, for timing
    SD15_UNET_CONFIG, SD15_TEXT_CONFIG                                  # the SD1.5 configs

Latent shapes: tiny SD (4, 8, 8) at 16x16 pixels; tiny SDXL (4, 8, 8) at 16x16 pixels.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

# Text dimensions of the tiny models.
_HIDDEN = 32
_MAX_LEN = 77


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP vocabulary: every byte character, its end-of-word form, a few merges, specials."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = ["t h", "th e</w>", "a n", "o n</w>", "i n", "e r</w>"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def tiny_clip_tokenizer(model_max_length: int = _MAX_LEN):
    """A CLIPTokenizer over a tiny byte-level vocabulary (about 520 tokens), written to a temporary
    folder and loaded back with ``from_pretrained`` (so it saves and reloads like a real one)."""
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_vocab()
    with tempfile.TemporaryDirectory(prefix="d2g_tiny_tok_") as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)


def _text_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    vocab = tokenizer.get_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=_MAX_LEN, hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=_HIDDEN,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], **extra)


def _ddim(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         latent_channels=4, sample_size=16)


def tiny_sd_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Components of a tiny SD1.5/SD2.1-shaped pipeline (one CLIP text encoder), random weights
    drawn from ``seed``. ``prediction_type`` "v_prediction" gives the SD2.1 (768-v) flavour.
    Returns the keyword arguments of ``StableDiffusionPipeline`` (safety checker disabled)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=_HIDDEN,
        attention_head_dim=8, norm_num_groups=32)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                tokenizer=tokenizer, scheduler=_ddim(prediction_type), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny ``StableDiffusionPipeline`` (random weights, CPU, float32)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(seed, prediction_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Components of a tiny SDXL-shaped pipeline: two CLIP text encoders (the second with a
    projection giving the pooled embedding), a "text_time" UNet; the scheduler is Euler, as in
    the real SDXL folder (the collector switches to DDIM by default). Keyword arguments of
    ``StableDiffusionXLPipeline``."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_embed_dim + _HIDDEN,
        cross_attention_dim=2 * _HIDDEN, norm_num_groups=32)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=scheduler)


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` (random weights, CPU, float32)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd_pipeline(path: str, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Write a tiny SD-shaped pipeline as a local diffusers folder (safetensors weights)."""
    tiny_sd_pipeline(seed, prediction_type).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_sdxl_pipeline(path: str, seed: int = 0) -> str:
    """Write a tiny SDXL-shaped pipeline as a local diffusers folder (safetensors weights)."""
    tiny_sdxl_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


# ---------------------------------------------------------------------------------------------
# Full-size architectures with random weights (for speed and memory measurements only)

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32)
"""The UNet config of Stable Diffusion 1.5 (860 M parameters, 64x64x4 latents at 512 px)."""

SD15_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                        hidden_act="quick_gelu", projection_dim=768)
"""The CLIP ViT-L/14 text encoder config of Stable Diffusion 1.5."""


def sd15_shaped_components(device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
    """SD1.5-architecture components with random weights, built directly on ``device``: the
    full UNet and CLIP text encoder, the SD1.5 DDIM scheduler, a small VAE with the SD scale
    factor 8 (its weights are never used for latents) and the tiny tokenizer (ids fit the full
    vocabulary). Keyword arguments of ``StableDiffusionPipeline``. For timing, not quality."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(dtype).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **SD15_TEXT_CONFIG, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
        text_encoder = text_encoder.to(dtype).eval()
        vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512).to(dtype).eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=_ddim(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
