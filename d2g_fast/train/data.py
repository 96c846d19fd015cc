"""The data order of a run: which pairs every micro-batch of every step reads.

The training pairs are read as an endless stream of epochs, each a permutation drawn from
(seed, epoch). Optimiser step s consumes the global batch at stream positions
[s * G, (s + 1) * G), G = batch_size x processes x grad_accum, cut into micro-batches of
batch_size; micro-batch m of the step goes to process m % processes. So the order depends only
on the seed, the step and the batch sizes: a resumed run reads exactly what the uninterrupted run
would have read, and one process with grad_accum k reads what k processes read.
"""
from __future__ import annotations

import functools

import torch

from d2g_fast.data.seeding import derive_seed


class PairOrder:
    """Positions in the stream -> pair indices of the training split ``[0, num_train)``."""

    def __init__(self, num_train: int, seed: int):
        if num_train < 1:
            raise ValueError("pairs (--pairs): no training pairs left")
        self.num_train = int(num_train)
        self.seed = int(seed)

    @functools.lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "train-order"))
        return torch.randperm(self.num_train, generator=gen)

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.num_train)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def position(self, step: int, global_batch: int) -> dict:
        """Where step ``step`` starts reading (recorded in checkpoints)."""
        pos = step * global_batch
        epoch, offset = divmod(pos, self.num_train)
        return {"stream_position": pos, "epoch": epoch, "offset_in_epoch": offset}


class MicroBatchSampler(torch.utils.data.Sampler):
    """Batch sampler for a DataLoader: the micro-batches of this process for steps
    ``start_step .. max_steps - 1``, in order (grad_accum per step)."""

    def __init__(self, order: PairOrder, start_step: int, max_steps: int, batch_size: int,
                 grad_accum: int, rank: int, world: int):
        self.order = order
        self.start_step, self.max_steps = start_step, max_steps
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.rank, self.world = rank, world

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world * self.grad_accum

    def micro_index(self, accum: int) -> int:
        """The step-global number of this process's ``accum``-th micro-batch."""
        return accum * self.world + self.rank

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            base = step * self.global_batch
            for a in range(self.grad_accum):
                m = self.micro_index(a)
                yield self.order.indices(base + m * self.batch_size, self.batch_size)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.grad_accum


def micro_batch_seed(seed: int, step: int, micro: int) -> int:
    """The seed of the random draws (augmentation, mix-and-match) of one micro-batch."""
    return derive_seed(seed, step * 1_000_003 + micro, "train-draws")
