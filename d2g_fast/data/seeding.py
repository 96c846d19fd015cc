"""Determinism by pair index: pair i's noise depends only on (seed, i), its prompt only on
(prompt list, seed, i). Any subset of pairs can be regenerated and checked, by any process, in
any order, with any batch or shard layout."""
from __future__ import annotations

import functools
import hashlib

import torch

NOISE_RULE = "randn float32, torch CPU generator seeded with derive_seed(seed, i, 'noise')"
PROMPT_RULE = "epoch e = i // P: randperm(P) seeded with derive_seed(seed, e, 'prompts'); [i % P]"


def derive_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed from (seed, index, stream name), well mixed (sha256) so that neighbouring
    indices and seeds give unrelated random streams."""
    digest = hashlib.sha256(f"d2g_fast/{stream}/{int(seed)}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def pair_noise(seed: int, index: int, shape) -> torch.Tensor:
    """The initial noise of pair ``index``: float32 on the CPU (the same on every machine)."""
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, index, "noise"))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def batch_noise(seed: int, indices, shape) -> torch.Tensor:
    """The noises of several pairs stacked: [len(indices), *shape]."""
    return torch.stack([pair_noise(seed, i, shape) for i in indices])


class PromptSchedule:
    """Which prompt pair i uses: the prompt list is walked in a seeded random order, a new order
    every epoch (every ``num_prompts`` pairs), so each prompt is used once per epoch."""

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts < 1:
            raise ValueError("prompts (--prompts): the prompt list is empty")
        self.num_prompts = int(num_prompts)
        self.seed = int(seed)

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, epoch, "prompts"))
        return torch.randperm(self.num_prompts, generator=gen)

    def __call__(self, index: int) -> int:
        epoch, offset = divmod(int(index), self.num_prompts)
        return int(self._order(epoch)[offset])

    def indices(self, indices) -> list[int]:
        return [self(i) for i in indices]
