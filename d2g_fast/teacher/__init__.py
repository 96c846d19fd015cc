"""The teacher adapter (diffusers SD/SDXL) and ODE-pair collection."""
from d2g_fast.teacher.adapter import Conditioning, NonFiniteLatentError, Teacher, parse_dtype
from d2g_fast.teacher.collect import collect, collection_config, recompute_pairs

__all__ = ["Teacher", "Conditioning", "NonFiniteLatentError", "parse_dtype", "collect",
           "collection_config", "recompute_pairs"]
