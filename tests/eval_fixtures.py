"""Tiny stand-ins for d2g eval's tests: a TorchScript network in clean-fid's Inception format, a
tiny CLIP folder, captions, reference images and a tiny SD pipeline folder (all made locally)."""
import os

import numpy as np
import torch


class TinyInception(torch.nn.Module):
    """clean-fid's TorchScript Inception interface: ``layers`` maps (x - 128) / 128 at 299x299
    to features; ``forward`` exists so the file is a complete module."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                          torch.nn.Linear(48, dim), torch.nn.Tanh())

    def forward(self, x):
        return self.layers(x)


def save_tiny_inception(path: str, dim: int = 12, seed: int = 0) -> str:
    torch.manual_seed(seed)
    torch.jit.script(TinyInception(dim).eval()).save(path)
    return path


def save_tiny_clip(folder: str, seed: int = 0) -> str:
    """A tiny random CLIPModel (32x32 images) with its processor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from d2g_fast.testing.tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_captions(path: str, n: int) -> str:
    words = ["a red cat", "two dogs", "a blue car", "an old house", "a bowl of fruit", "the sea"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(f"{words[i % len(words)]} number {i}\n")
    return path


def write_reference_images(folder: str, n: int, seed: int = 0) -> str:
    """n smooth random RGB images of varied (non-square) sizes as PNG."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = 16 + int(rng.integers(0, 8)), 16 + int(rng.integers(0, 8))
        base = rng.random((4, 4, 3)) * 255
        img = Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
        img.save(os.path.join(folder, f"ref-{i:03d}.png"))
    return folder


def save_tiny_dinov2(folder: str, seed: int = 0) -> str:
    """A tiny random DINOv2 (32x32 images) with its image processor: the optional second space."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=4, mlp_ratio=2)
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                      ).save_pretrained(folder)
    return folder
