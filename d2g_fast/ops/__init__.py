"""Public functional ops. Each takes ``impl="auto" | "ref" | "cpu" | "cuda" | "triton"``."""
from d2g_fast.ops.lpips_distance import lpips_distance

__all__ = ["lpips_distance"]
