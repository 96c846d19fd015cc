"""Per-prompt diversity: how different the samples of one prompt are under different noise.

For every prompt with at least two samples, the mean distance over its unordered pairs of
samples; the diversity is the mean of these per-prompt means (each prompt weighs the same, however
many samples it has). 0 means the generator ignores its noise (mode collapse given the prompt);
the real data's own value, where it can be measured (the toy world), is the target.

The distance is Euclidean in a feature space by default (the space of the Fréchet distance:
Inception for ``d2g eval``, the toy classifier for the toy evaluation) or any callable on batches
of pairs (e.g. E-LatentLPIPS on latents, augmentation off so the number is deterministic).

Public API:
    per_prompt_diversity(samples [N, ...], prompts (N keys), distance=None, batch_size=1024)
        -> {"mean", "std", "prompts", "pairs"}
    euclidean(a [B, ...], b [B, ...]) -> [B] float64 distances
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from itertools import combinations

import numpy as np
import torch

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance of flattened samples, in float64: [B, ...] x2 -> [B]."""
    diff = a.reshape(len(a), -1).double() - b.reshape(len(b), -1).double()
    return diff.square().sum(1).sqrt()


def prompt_pairs(prompts: Sequence[Hashable]) -> tuple[list[tuple[int, int]], list[int]]:
    """Unordered index pairs (i < j) of samples sharing a prompt, and the group of each pair
    (groups numbered by first appearance, only prompts with >= 2 samples)."""
    groups: dict[Hashable, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    pairs, owner = [], []
    for g, members in enumerate(m for m in groups.values() if len(m) >= 2):
        for i, j in combinations(members, 2):
            pairs.append((i, j))
            owner.append(g)
    return pairs, owner


@torch.no_grad()
def per_prompt_diversity(samples, prompts: Sequence[Hashable], distance: Distance | None = None,
                         batch_size: int = 1024) -> dict:
    """Mean pairwise distance between samples of the same prompt, averaged over prompts.

    Args:
        samples: [N, ...] numpy array or tensor (features, latents, images).
        prompts: N hashable keys (caption text or index); samples with equal keys are compared.
        distance: (a [B, ...], b [B, ...]) -> [B] distances (or [B, 1, 1, 1]); default
            ``euclidean`` on the flattened samples in float64.
        batch_size: pairs per ``distance`` call.
    Returns:
        {"mean": mean over prompts of the per-prompt mean pairwise distance,
         "std": standard deviation of the per-prompt means (0 for one prompt),
         "prompts": prompts with >= 2 samples, "pairs": pairs compared}.
    Raises:
        ValueError when lengths differ or no prompt has two samples.
    """
    x = samples if isinstance(samples, torch.Tensor) else torch.from_numpy(np.asarray(samples))
    if len(prompts) != len(x):
        raise ValueError(f"prompts: {len(prompts)} keys for {len(x)} samples")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    pairs, owner = prompt_pairs(prompts)
    if not pairs:
        raise ValueError("prompts: no prompt has two or more samples; diversity needs several "
                         "samples (different noise) of the same prompt")
    distance = distance or euclidean
    index = torch.tensor(pairs, dtype=torch.long)
    values = torch.cat([
        distance(x[index[s:s + batch_size, 0]], x[index[s:s + batch_size, 1]]
                 ).reshape(-1).double().cpu()
        for s in range(0, len(index), batch_size)])
    if len(values) != len(pairs):
        raise ValueError(f"distance: returned {len(values)} values for {len(pairs)} pairs "
                         f"(expected one per pair)")
    groups = torch.tensor(owner)
    num_groups = int(groups.max()) + 1
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, values)
    counts = torch.bincount(groups, minlength=num_groups).double()
    per_prompt = sums / counts
    return {"mean": float(per_prompt.mean()),
            "std": float(per_prompt.std(unbiased=False)) if num_groups > 1 else 0.0,
            "prompts": num_groups, "pairs": len(pairs)}
