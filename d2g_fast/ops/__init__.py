"""Public functional ops. Each takes the keyword-only ``impl="auto" | "ref" | "cpu" | "cuda" |
"triton"`` (see d2g_fast._dispatch) and documents its arguments' shapes and its return values."""
from d2g_fast.ops.lpips_distance import lpips_distance, lpips_distance_multi
from d2g_fast.ops.multiscale_heads import multiscale_heads
from d2g_fast.ops.paired_augment import paired_augment

__all__ = ["lpips_distance", "lpips_distance_multi", "multiscale_heads", "paired_augment"]
