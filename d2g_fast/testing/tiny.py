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
    tiny_t5_tokenizer(model_max_length=512) -> T5TokenizerFast    # tokenizers Unigram, offline
    tiny_sd3_components(seed=0, **shape) / tiny_sd3_pipeline / save_tiny_sd3_pipeline(path, ...)
    tiny_flux_components(seed=0, **shape) / tiny_flux_pipeline / save_tiny_flux_pipeline(path, ...)
    sd15_shaped_components(device="cpu", dtype=torch.float32) -> dict   # full-size, for timing
    SD15_UNET_CONFIG, SD15_TEXT_CONFIG                                  # the SD1.5 configs

Latent shapes: tiny SD (4, 8, 8) at 16x16 pixels; tiny SDXL (4, 8, 8) at 16x16 pixels; tiny SD3
(16, 8, 8) at 16x16 pixels by default; tiny FLUX (16, h/2, w/2) at the pixel size asked for (the
shapes are keyword arguments of the builders, so tests can use others).
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
# Flow-matching transformer pipelines (SD3 / FLUX shapes)

# Words of the tiny T5 vocabulary (whole-word pieces); anything else falls back to characters.
_T5_WORDS = ("a an the of in on at with and red blue green black white small large old fox "
             "cat dog bird snow lighthouse cliff photo painting city street tree river house "
             "car boat mountain portrait of by night sunset x").split()


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer without downloads: a ``tokenizers`` Unigram model over a small word list
    plus single characters (with the Metaspace pre-tokenizer and an appended ``</s>``), saved
    and loaded back with ``T5TokenizerFast.from_pretrained`` so it saves and reloads like a
    real one. Ids 0/1/2 are <pad>, </s>, <unk> as in T5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5TokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in _T5_WORDS]
    vocab += [("\u2581" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)
    with tempfile.TemporaryDirectory(prefix="d2g_tiny_t5_") as tmp:
        fast.save_pretrained(tmp)
        return T5TokenizerFast.from_pretrained(tmp, model_max_length=model_max_length)


def _tiny_t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
        num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        is_encoder_decoder=False, use_cache=False)).eval()


def _tiny_vae16(vae_blocks: int, shift_factor: float, scaling_factor: float):
    """A 16-channel AutoencoderKL (no quant convs) with scale factor 2 ** (vae_blocks - 1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32,) * vae_blocks, in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                         up_block_types=("UpDecoderBlock2D",) * vae_blocks, latent_channels=16,
                         layers_per_block=1, norm_num_groups=32, sample_size=32,
                         use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=shift_factor, scaling_factor=scaling_factor).eval()


def _flow_scheduler(shift: float, dynamic_shifting: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=shift, use_dynamic_shifting=dynamic_shifting,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def tiny_sd3_components(seed: int = 0, *, sample_size: int = 8, patch_size: int = 2,
                        num_layers: int = 2, num_heads: int = 2, head_dim: int = 8,
                        t5: bool = True, t5_dim: int = 2 * _HIDDEN, vae_blocks: int = 2,
                        shift: float = 3.0, dynamic_shifting: bool = False) -> dict:
    """Components of a tiny ``StableDiffusion3Pipeline``: two ``CLIPTextModelWithProjection``
    (CLIP-L and CLIP-G shapes), a ``T5EncoderModel`` (``t5=False``: none, the pipeline then uses
    zeros), an ``SD3Transformer2DModel`` (16 latent channels, ``patch_size``), a 16-channel VAE
    (scale factor 2 ** (vae_blocks - 1)) and a ``FlowMatchEulerDiscreteScheduler`` with
    ``shift``. ``t5_dim`` (the joint attention width) must be >= 2 x the CLIP width (64).
    Default image: sample_size x VAE factor = 16 px, latent (16, 8, 8)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=patch_size, in_channels=16, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=t5_dim,
        caption_projection_dim=num_heads * head_dim, pooled_projection_dim=2 * _HIDDEN,
        out_channels=16, pos_embed_max_size=max(16, 2 * sample_size // patch_size)).eval()
    torch.manual_seed(seed + 1)
    vae = _tiny_vae16(vae_blocks, shift_factor=0.0609, scaling_factor=1.5305)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2)).eval()
    tokenizer_3 = text_encoder_3 = None
    if t5:
        tokenizer_3 = tiny_t5_tokenizer()
        torch.manual_seed(seed + 4)
        text_encoder_3 = _tiny_t5_encoder(tokenizer_3, t5_dim)
    return dict(transformer=transformer, scheduler=_flow_scheduler(shift, dynamic_shifting),
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def tiny_sd3_pipeline(seed: int = 0, **shape):
    """A tiny ``StableDiffusion3Pipeline`` (random weights, CPU, float32); ``shape``: the keyword
    arguments of :func:`tiny_sd3_components`."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed, **shape))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd3_pipeline(path: str, seed: int = 0, **shape) -> str:
    """Write a tiny SD3-shaped pipeline as a local diffusers folder (safetensors weights)."""
    tiny_sd3_pipeline(seed, **shape).save_pretrained(path, safe_serialization=True)
    return path


def tiny_flux_components(seed: int = 0, *, num_layers: int = 1, num_single_layers: int = 1,
                         num_heads: int = 2, head_dim: int = 16,
                         axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
                         guidance_embeds: bool = True, t5_dim: int = _HIDDEN,
                         vae_blocks: int = 2, shift: float = 3.0,
                         dynamic_shifting: bool = True) -> dict:
    """Components of a tiny ``FluxPipeline``: a ``CLIPTextModel`` (pooled), a
    ``T5EncoderModel``, a ``FluxTransformer2DModel`` (in_channels 64 = 16 x 2x2 packing,
    ``guidance_embeds`` True: FLUX.1-dev-like, False: schnell-like; sum(axes_dims_rope) must be
    ``head_dim``), a 16-channel VAE (scale factor 2 ** (vae_blocks - 1)) and a
    ``FlowMatchEulerDiscreteScheduler`` with dynamic (resolution-dependent) shifting.
    The pipeline's default size (128 x VAE factor) is large: pass ``height``/``width`` (or
    --resolution), e.g. 32 px for a (16, 16, 16) latent."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=t5_dim,
        pooled_projection_dim=_HIDDEN, guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(axes_dims_rope)).eval()
    torch.manual_seed(seed + 1)
    vae = _tiny_vae16(vae_blocks, shift_factor=0.1159, scaling_factor=0.3611)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = _tiny_t5_encoder(tokenizer_2, t5_dim)
    return dict(transformer=transformer, scheduler=_flow_scheduler(shift, dynamic_shifting),
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def tiny_flux_pipeline(seed: int = 0, **shape):
    """A tiny ``FluxPipeline`` (random weights, CPU, float32); ``shape``: the keyword arguments
    of :func:`tiny_flux_components`."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(seed, **shape))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_flux_pipeline(path: str, seed: int = 0, **shape) -> str:
    """Write a tiny FLUX-shaped pipeline as a local diffusers folder (safetensors weights)."""
    tiny_flux_pipeline(seed, **shape).save_pretrained(path, safe_serialization=True)
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
