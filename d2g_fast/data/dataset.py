"""``PairDataset``: random access to the (noise, prompt, latent) pairs of a store folder."""
from __future__ import annotations

import bisect
import os

import torch

from d2g_fast.data.store import (PROMPTS, StoreError, read_json, read_manifest, sha256_bytes,
                                 sha256_file)

EMBEDDING_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


class PairDataset(torch.utils.data.Dataset):
    """The pairs of a store written by ``d2g collect``.

    ``dataset[i]`` is a dict: ``noise`` [C, h, w] float32, ``latent`` [C, h, w] float32 (the
    teacher's final latent, not scaled by the VAE factor), ``prompt`` (str), ``index`` (int,
    the pair index), ``prompt_index`` (int), ``guidance`` (0-d float32 tensor: the guidance
    scale the pair was collected with; stores written before per-pair guidance give the
    collection's one scale), and, when the store holds them and
    ``load_embeddings`` is true, ``prompt_embeds`` [L, D] and ``pooled_prompt_embeds`` [P]
    (SDXL) in the dtype they were computed in.

    Works with ``DistributedSampler`` and multi-worker ``DataLoader`` (shards are memory-mapped
    lazily in each process). ``check`` chooses what is verified: "size" (default: every shard
    present with the recorded size, checked at construction), "sha256" (also the checksum of
    every shard, at construction: reads everything), or "none". Problems raise ``StoreError``
    naming the shard.
    """

    def __init__(self, root: str, *, check: str = "size", load_embeddings: bool = True):
        if check not in ("size", "sha256", "none"):
            raise ValueError(f"check: expected 'size', 'sha256' or 'none', got {check!r}")
        self.root = os.path.abspath(root)
        self.manifest = read_manifest(self.root)
        if not self.manifest.get("complete"):
            raise StoreError(f"root: the collection in {self.root!r} is incomplete; rerun the "
                             f"same d2g collect command to finish it")
        self.shards = self.manifest["shards"]
        self._starts = [s["start"] for s in self.shards]
        self._len = sum(s["count"] for s in self.shards)
        self.load_embeddings = load_embeddings
        self.embedding_keys = tuple(k for k in EMBEDDING_KEYS
                                    if k in self.manifest.get("tensors", {}))
        prompts_path = os.path.join(self.root, PROMPTS)
        if not os.path.isfile(prompts_path):
            raise StoreError(f"root: {PROMPTS} is missing from {self.root!r}")
        with open(prompts_path, "rb") as f:
            raw = f.read()
        if check != "none" and sha256_bytes(raw) != self.manifest["prompts"]["sha256"]:
            raise StoreError(f"{PROMPTS}: sha256 mismatch in {self.root!r} (corrupted)")
        self.prompts: list[str] = read_json(prompts_path)["prompts"]
        if check != "none":
            for shard in self.shards:
                self._check_shard(shard, checksum=(check == "sha256"))
        self._handles: dict = {}
        self._pid = os.getpid()

    @property
    def has_embeddings(self) -> bool:
        return bool(self.embedding_keys)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["config"]["latent_shape"])

    def _check_shard(self, shard: dict, checksum: bool) -> None:
        path = os.path.join(self.root, shard["file"])
        if not os.path.isfile(path):
            raise StoreError(f"{shard['file']}: missing from {self.root!r}")
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise StoreError(f"{shard['file']}: {size} bytes, the manifest records "
                             f"{shard['bytes']} (truncated or replaced)")
        if checksum and sha256_file(path) != shard["sha256"]:
            raise StoreError(f"{shard['file']}: sha256 mismatch (corrupted)")

    @property
    def guidance_set(self) -> dict | None:
        """The guidance set of a multi-guidance collection (``{"values": [...]}`` or
        ``{"range": [low, high]}``); None when every pair has the same scale."""
        return self.manifest["config"].get("guidance_set")

    def _fixed_guidance(self) -> torch.Tensor:
        return torch.tensor(float(self.manifest["config"]["guidance"]), dtype=torch.float32)

    def __len__(self) -> int:
        return self._len

    def _handle(self, k: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked into a DataLoader worker: open our own maps
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            shard = self.shards[k]
            try:
                self._handles[k] = safe_open(os.path.join(self.root, shard["file"]),
                                             framework="pt", device="cpu")
            except Exception as exc:
                raise StoreError(f"{shard['file']}: cannot be read as safetensors "
                                 f"({type(exc).__name__}: {exc}); corrupted?") from exc
        return self._handles[k]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, row in the shard) of pair ``index``."""
        if not -self._len <= index < self._len:
            raise IndexError(f"index: {index} out of range for {self._len} pairs")
        index %= self._len
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def __getitem__(self, index: int) -> dict:
        k, row = self.locate(int(index))
        f = self._handle(k)
        try:
            item = {name: f.get_slice(name)[row:row + 1][0]
                    for name in ("noise", "latent", "index", "prompt_index")}
            item["guidance"] = f.get_slice("guidance")[row:row + 1][0] \
                if "guidance" in f.keys() else self._fixed_guidance()
            if self.load_embeddings:
                for name in self.embedding_keys:
                    item[name] = f.get_slice(name)[row:row + 1][0]
        except Exception as exc:
            raise StoreError(f"{self.shards[k]['file']}: reading row {row} failed "
                             f"({type(exc).__name__}: {exc}); corrupted?") from exc
        item["index"] = int(item["index"])
        item["prompt_index"] = int(item["prompt_index"])
        item["prompt"] = self.prompts[item["prompt_index"]]
        return item
