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
    sd3-medium  Stable Diffusion 3 medium: SD3Transformer2DModel (24 joint blocks, width 1536,
          2.0 B parameters), 16x128x128 latents (1024 px), CLIP-L + OpenCLIP bigG + T5-XXL text,
          flow matching (FlowMatchEulerDiscreteScheduler, shift 3)
    flux-dev  FLUX.1-dev: FluxTransformer2DModel (19 double + 38 single blocks, width 3072,
          11.9 B parameters, guidance embedding), 16x128x128 latents (1024 px), CLIP-L + T5-XXL
          text, flow matching with resolution-dependent shifting
    tiny-sd3, tiny-flux  the tiny SD3-/FLUX-shaped test pipelines (16x8x8 latents, 16 px)

The SD3/FLUX configs are those published with the models' diffusers folders
(stabilityai/stable-diffusion-3-medium-diffusers, black-forest-labs/FLUX.1-dev), written here so
that nothing is downloaded; ``meta_networks`` builds them on the meta device (no memory, no
weights) for the parameter counts behind the memory rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ARCHS = ("sd15", "sd21", "sdxl", "tiny", "sd3-medium", "flux-dev", "tiny-sd3", "tiny-flux")
FLOW_ARCHS = ("sd3-medium", "flux-dev", "tiny-sd3", "tiny-flux")

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


SD3_MEDIUM_TRANSFORMER_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
"""The SD3Transformer2DModel config of Stable Diffusion 3 medium (2.03 B parameters)."""

FLUX_DEV_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56))
"""The FluxTransformer2DModel config of FLUX.1-dev (11.9 B parameters)."""

CLIP_G_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                          num_hidden_layers=32, num_attention_heads=20,
                          max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
"""OpenCLIP ViT-bigG/14 text tower of SD3 (all 32 layers; the pipeline reads the penultimate)."""

T5_XXL_CONFIG = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                     num_heads=64, relative_attention_num_buckets=32, dropout_rate=0.0,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
"""The T5 v1.1 XXL encoder of SD3 and FLUX.1 (4.76 B parameters)."""

FLOW_VAE_NORMALIZATION = {"sd3-medium": (0.0609, 1.5305), "flux-dev": (0.1159, 0.3611)}
"""(shift_factor, scaling_factor) of the 16-channel VAEs."""


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
    "sd3-medium": ArchInfo("sd3-medium", "SD3-medium transformer 16x128x128 (1024 px)", "flow",
                           1.5305, "sd3", (16, 128, 128)),
    "flux-dev": ArchInfo("flux-dev", "FLUX.1-dev transformer 16x128x128 (1024 px)", "flow",
                         0.3611, "flux", (16, 128, 128)),
    "tiny-sd3": ArchInfo("tiny-sd3", "tiny SD3-shaped transformer 16x8x8 (16 px)", "flow",
                         1.5305, "sd3", (16, 8, 8)),
    "tiny-flux": ArchInfo("tiny-flux", "tiny FLUX-shaped transformer 16x8x8 (16 px)", "flow",
                          0.3611, "flux", (16, 8, 8)),
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
    elif arch in ("tiny-sd3", "tiny-flux"):
        vae = components(arch)["vae"]
    elif arch in FLOW_ARCHS:
        shift, scale = FLOW_VAE_NORMALIZATION[arch]
        with torch.device(device):
            vae = AutoencoderKL(**{**SD_VAE_CONFIG, "latent_channels": 16}, use_quant_conv=False,
                                use_post_quant_conv=False, shift_factor=shift,
                                scaling_factor=scale)
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
    if arch in FLOW_ARCHS:
        return _flow_components(arch, device, dtype, seed)
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


def _flow_components(arch: str, device, dtype, seed: int) -> dict:
    """StableDiffusion3Pipeline / FluxPipeline keyword arguments of a flow architecture (random
    weights; the VAE a small 16-channel stand-in with scale factor 8, as for the UNets)."""
    from diffusers import (AutoencoderKL, FluxTransformer2DModel,
                           FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel)
    from transformers import T5Config, T5EncoderModel

    from d2g_fast.testing import tiny

    if arch in ("tiny-sd3", "tiny-flux"):
        comps = (tiny.tiny_sd3_components if arch == "tiny-sd3" else tiny.tiny_flux_components)(
            seed)
    else:
        clip = tiny.tiny_clip_tokenizer()
        vocab = clip.get_vocab()
        shift, scale = FLOW_VAE_NORMALIZATION[arch]
        torch.manual_seed(seed)
        with torch.device(device):
            vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), latent_channels=16,
                                down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                                use_post_quant_conv=False, shift_factor=shift,
                                scaling_factor=scale)
            t5 = T5EncoderModel(T5Config(**T5_XXL_CONFIG))
            if arch == "sd3-medium":
                comps = dict(
                    transformer=SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER_CONFIG),
                    text_encoder=_clip_text(tiny.SD15_TEXT_CONFIG, vocab, with_projection=True),
                    text_encoder_2=_clip_text(CLIP_G_TEXT_CONFIG, vocab, with_projection=True),
                    text_encoder_3=t5, tokenizer=clip, tokenizer_2=tiny.tiny_clip_tokenizer(),
                    tokenizer_3=tiny.tiny_t5_tokenizer(),
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
            else:
                comps = dict(
                    transformer=FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER_CONFIG),
                    text_encoder=_clip_text(tiny.SD15_TEXT_CONFIG, vocab), text_encoder_2=t5,
                    tokenizer=clip, tokenizer_2=tiny.tiny_t5_tokenizer(),
                    scheduler=FlowMatchEulerDiscreteScheduler(
                        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                        base_image_seq_len=256, max_image_seq_len=4096))
        comps["vae"] = vae
    for name, value in comps.items():
        if isinstance(value, torch.nn.Module):
            comps[name] = _cast(value.to(device), dtype).eval()
    return comps


def meta_networks(arch: str) -> dict:
    """The trained and the frozen networks of ``arch`` on the meta device (shapes only: no
    memory, no weights): {"denoiser": the UNet or transformer, "text_encoders": [...]}."""
    comps = components(arch, device="meta")
    denoiser = comps.get("transformer", comps.get("unet"))
    texts = [comps[k] for k in ("text_encoder", "text_encoder_2", "text_encoder_3")
             if comps.get(k) is not None]
    return {"denoiser": denoiser, "text_encoders": texts}


def resolution(arch: str) -> int:
    """The image side in pixels of ``arch``'s latent (the VAE scale factor: 8, tiny models 2)."""
    return ARCH_INFO[check_arch(arch)].latent[1] * (2 if arch.startswith("tiny") else 8)


def teacher(arch: str, comps: dict | None = None):
    """The teacher family object of ``arch`` (random weights) from its pipeline components."""
    from d2g_fast.teacher.families import family_for_pipeline

    pipe = pipeline_class(arch)(**(comps or components(arch)))
    return family_for_pipeline(pipe).from_pipeline(pipe, resolution=resolution(arch))


def pipeline_class(arch: str):
    """The diffusers pipeline class whose loop is the collection baseline."""
    import diffusers

    if arch in ("sd3-medium", "tiny-sd3"):
        return diffusers.StableDiffusion3Pipeline
    if arch in ("flux-dev", "tiny-flux"):
        return diffusers.FluxPipeline
    return diffusers.StableDiffusionXLPipeline if arch == "sdxl" \
        else diffusers.StableDiffusionPipeline
