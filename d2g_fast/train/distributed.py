"""Processes of a training run: torchrun's environment, gradient averaging, agreement.

Replicated training (the default) keeps a full copy of G and D on every process and averages
gradients with one all-reduce per network after the micro-batches (as StyleGAN2-ADA does, rather
than wrapping in DistributedDataParallel: the discriminator step runs D several times per
backward (reals, negatives, R1), which DDP's per-forward hooks do not allow). With ``fsdp`` the
networks are sharded with FSDP2 ``fully_shard`` and FSDP reduces the gradients itself.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Processes:
    """This process's place in the run (rank 0 of 1 when not started by torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """True when ``flag`` is true on every process (one tiny all-reduce)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([0.0 if flag else 1.0], device=device)
        torch_dist.all_reduce(t)
        return float(t) == 0.0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch_dist.all_reduce(tensor)
        return tensor

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]


def start_processes(device: str) -> tuple[Processes, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs); each
    rank takes ``cuda:LOCAL_RANK``. Returns (Processes, this process's device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device (--device): {device!r} requested but no CUDA GPU is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(), torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                      timeout=datetime.timedelta(minutes=30))
    return Processes(rank, world, local_rank), torch.device(device)


def stop_processes() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], procs: Processes) -> None:
    """Sum the gradients of replicated ``params`` over processes in one flat all-reduce (the
    micro-batch losses were already divided by the number of micro-batches in the step)."""
    if procs.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
