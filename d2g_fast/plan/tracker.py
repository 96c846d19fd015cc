"""Live-bytes accounting of torch allocations, on real or fake tensors.

:class:`LiveBytes` is a dispatch mode that sees every tensor an aten op creates, counts the bytes
of each new storage while any tensor (or autograd's saved copy) still uses it, and files them
under the current label ("G", "loss", ...). On real CPU tensors it reads what
``torch.profiler``'s memory events read (the allocator's live bytes, without a caching
allocator's slack); on fake tensors it is the same accounting for a network that was never
allocated, which is how the planner measures SDXL-sized steps without the memory.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive, per label.

    Storages that existed before (weights, inputs), views and in-place results of them are not
    counted. With ``record=True`` every allocation appends the per-label live bytes after it to
    ``timeline`` (the order of ``labels``): the same program at two batch sizes gives two
    timelines of the same length, from which any other batch size follows (see
    :mod:`d2g_fast.plan.simulate`)."""

    def __init__(self, labels: tuple[str, ...] = ("other",), record: bool = False):
        super().__init__()
        self.labels = tuple(labels)
        self._index = {name: i for i, name in enumerate(self.labels)}
        self.live_by = [0] * len(self.labels)
        self.label = self.labels[0]
        self.peak = 0
        self.record = record
        self.timeline: list[tuple[int, ...]] = []
        self._owner: dict[int, tuple[int, int]] = {}  # storage key -> (label index, bytes)

    @property
    def live(self) -> int:
        return sum(self.live_by)

    def reset_peak(self) -> None:
        self.peak = self.live

    def relabel(self, t: torch.Tensor, label: str) -> None:
        """File the storage of ``t`` under ``label`` from now on (e.g. a finished gradient)."""
        key = storage_key(t)
        if key in self._owner:
            old, size = self._owner[key]
            new = self._index[label]
            self.live_by[old] -= size
            self.live_by[new] += size
            self._owner[key] = (new, size)

    def _free(self, key: int) -> None:
        entry = self._owner.pop(key, None)
        if entry is not None:
            self.live_by[entry[0]] -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {storage_key(t) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._owner:
                continue
            size = storage.nbytes()
            index = self._index[self.label]
            self._owner[key] = (index, size)
            self.live_by[index] += size
            live = self.live
            self.peak = max(self.peak, live)
            if self.record:
                self.timeline.append(tuple(self.live_by))
            # Storage objects are preserved while any tensor uses them: this fires at the free.
            weakref.finalize(storage, self._free, key)
        return out
