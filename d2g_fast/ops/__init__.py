"""Public functional ops. Each takes ``impl="auto" | "ref" | "cpu" | "cuda" | "triton"``."""
from d2g_fast.ops.lpips_distance import lpips_distance, lpips_distance_multi
from d2g_fast.ops.multiscale_heads import multiscale_heads
from d2g_fast.ops.paired_augment import paired_augment

__all__ = ["lpips_distance", "lpips_distance_multi", "multiscale_heads", "paired_augment"]
