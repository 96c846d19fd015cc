"""Data: the pair store (sharded safetensors + manifest), prompt sources, datasets."""
from d2g_fast.data.dataset import PairDataset
from d2g_fast.data.prompts import load_prompts
from d2g_fast.data.seeding import PromptSchedule, batch_noise, derive_seed, pair_noise
from d2g_fast.data.store import ConfigMismatchError, StoreError, read_manifest, verify_store

__all__ = ["PairDataset", "load_prompts", "PromptSchedule", "batch_noise", "derive_seed",
           "pair_noise", "ConfigMismatchError", "StoreError", "read_manifest", "verify_store"]
