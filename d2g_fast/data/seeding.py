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


GUIDANCE_RULE = ("values: values[randint(len(values))], range [low, high]: low + (high - low) * "
                 "rand (float64), torch CPU generator seeded with derive_seed(seed, i, "
                 "'guidance'); rounded to float32")


def guidance_set(guidance=None, guidance_range=None) -> dict | None:
    """The collection's guidance scales as a manifest entry: ``{"values": [...]}`` (a list of
    two or more distinct scales) or ``{"range": [low, high]}`` (uniform); None for one fixed
    scale (then pair i's guidance is that scale, as before). Bad input names its flag."""
    if guidance_range is not None:
        if guidance is not None and not isinstance(guidance, (int, float)):
            raise ValueError("guidance_range (--guidance-range): give either a --guidance list "
                             "or a --guidance-range, not both")
        low, high = (float(v) for v in guidance_range)
        if not (low == low and high == high) or low < 0 or not low < high:
            raise ValueError(f"guidance_range (--guidance-range): needs 0 <= LOW < HIGH, got "
                             f"{list(guidance_range)}")
        return {"range": [_f32(low), _f32(high)]}
    if guidance is None or isinstance(guidance, (int, float)):
        return None
    values = [float(v) for v in guidance]
    if not values:
        raise ValueError("guidance (--guidance): the list of scales is empty")
    if any(not v == v or v < 0 for v in values):
        raise ValueError(f"guidance (--guidance): every scale must be >= 0, got {values}")
    distinct = sorted({_f32(v) for v in values})
    return None if len(distinct) == 1 else {"values": distinct}


def _f32(value: float) -> float:
    """``value`` rounded to float32 (what the shards store), as a Python float."""
    return float(torch.tensor(float(value), dtype=torch.float32))


class GuidanceSchedule:
    """Which guidance scale pair i is collected with: a pure function of (seed, i) drawn from
    the collection's guidance set (see ``guidance_set``), like its noise and prompt."""

    def __init__(self, spec: dict, seed: int):
        if "values" not in spec and "range" not in spec:
            raise ValueError(f"guidance set: expected 'values' or 'range', got {spec!r}")
        self.spec = spec
        self.seed = int(seed)

    def __call__(self, index: int) -> float:
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, index, "guidance"))
        if "values" in self.spec:
            values = self.spec["values"]
            return _f32(values[int(torch.randint(len(values), (1,), generator=gen))])
        low, high = self.spec["range"]
        u = float(torch.rand(1, generator=gen, dtype=torch.float64))
        return _f32(low + (high - low) * u)

    def values(self, indices) -> torch.Tensor:
        """The guidance of several pairs: float32 [len(indices)]."""
        return torch.tensor([self(i) for i in indices], dtype=torch.float32)
