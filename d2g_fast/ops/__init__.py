"""Public functional ops. Each takes ``impl="auto" | "ref" | "cpu" | "cuda" | "triton"``."""
from d2g_fast.ops.lpips_distance import lpips_distance
from d2g_fast.ops.paired_augment import paired_augment

__all__ = ["lpips_distance", "paired_augment"]
