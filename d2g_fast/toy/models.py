"""The toy world's networks: tokenizer, text encoder, VAE, UNet, scheduler and the evaluation
classifier. Configurations live here only; ``d2g toy train`` builds them with random weights and
trains them (d2g_fast/toy/train.py).

Sizes: 32x32 RGB images, latents (4, 8, 8) (two 2x downsamplings), captions of at most
``MAX_TOKENS`` tokens. The tokenizer is a real ``CLIPTokenizer`` whose byte-level BPE merges are
learnt here from the caption words, so every caption word is one token.
"""
from __future__ import annotations

import collections
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2g_fast.testing.tiny import bytes_to_unicode
from d2g_fast.toy import data

LATENT_CHANNELS = 4
LATENT_SIZE = 8
TEXT_HIDDEN = 64
# "<|startoftext|>" + 12 caption words + "<|endoftext|>" fit with room to spare.
MAX_TOKENS = 20
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def caption_words() -> list[str]:
    """The distinct words of all captions, sorted."""
    return sorted({w for c in data.all_captions() for w in c.split()})


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair-encoding training on ``words`` (each counted once) until every word is one
    symbol: repeatedly merge the most frequent adjacent pair (ties: the smallest pair). Encoding a
    training word with these merges, in this order, reproduces the training merges, so each word
    becomes a single token."""
    segmented = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges = []
    while True:
        pairs = collections.Counter(p for s in segmented for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        segmented = [_apply_merge(s, best) for s in segmented]


def _apply_merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write_tokenizer_files(folder: str) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of the toy CLIP tokenizer into ``folder``: every
    byte character and its end-of-word form (any text still tokenizes), the merged caption
    words and their prefixes, and the two special tokens."""
    merges = learn_merges(caption_words())
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [_BOS, _EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_tokenizer(folder: str):
    """The toy ``CLIPTokenizer``, written to ``folder`` and loaded back from it."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def build_text_encoder(tokenizer, seed: int):
    """A 2-layer CLIP text transformer (width 64) with random weights drawn from ``seed``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=TEXT_HIDDEN,
        bos_token_id=vocab[_BOS], eos_token_id=vocab[_EOS], pad_token_id=vocab[_EOS])
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def build_vae(seed: int):
    """AutoencoderKL: 32x32x3 <-> 4x8x8 (three blocks, two downsamplings)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        mid_block_add_attention=False, sample_size=data.RESOLUTION)


def build_unet(seed: int):
    """A two-level cross-attention UNet on 4x8x8 latents (about 1.1 M parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=16,
        # An attention-pooled caption embedding added to the time embedding: global attributes
        # (colour, background) condition every ResNet block directly, which a from-scratch
        # text encoder learns far sooner than through cross-attention alone. The pipeline
        # needs nothing extra (it pools encoder_hidden_states itself).
        addition_embed_type="text", addition_embed_type_num_heads=4)


def build_scheduler():
    """Stable Diffusion 1.5's DDIM configuration (scaled-linear betas, epsilon prediction)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


class AttributeClassifier(nn.Module):
    """A small CNN on 32x32 images in [-1, 1] with one linear head per caption attribute.

    Used ONLY for evaluation: its accuracy judges prompt adherence and its penultimate features
    (``FEATURE_DIM``) are the space of the Fréchet distance.
    """

    FEATURE_DIM = 64

    def __init__(self):
        super().__init__()
        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.trunk = nn.Sequential(
            *block(3, 32), *block(32, 32), nn.AvgPool2d(2),           # 16x16
            *block(32, 64), *block(64, 64), nn.AvgPool2d(2),          # 8x8
            *block(64, 128), nn.AvgPool2d(2),                         # 4x4
            nn.Flatten(), nn.Linear(128 * 16, self.FEATURE_DIM), nn.SiLU())
        self.heads = nn.ModuleList(nn.Linear(self.FEATURE_DIM, k) for k in data.NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) in [-1, 1] -> (N, FEATURE_DIM)."""
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits per attribute: a list of (N, k) tensors in ``data.ATTRIBUTES`` order."""
        h = self.features(images)
        return [head(h) for head in self.heads]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 4) predicted attribute indices."""
        return torch.stack([logits.argmax(1) for logits in self(images)], dim=1)


def classifier_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the cross-entropy."""
    return sum(F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(logits))
