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


# ------------------------------------------------------------------------------ FSDP2
def _unet_blocks(unet) -> list[torch.nn.Module]:
    blocks = list(unet.down_blocks) + list(unet.up_blocks)
    if unet.mid_block is not None:
        blocks.append(unet.mid_block)
    return blocks


def shard_generator(generator, blocks: list[torch.nn.Module] | None = None) -> None:
    """FSDP2: every block of G's network its own unit (``blocks``: the teacher family's
    ``blocks(net)``, e.g. every SD3/FLUX transformer block; default the UNet's blocks), the rest
    in the root unit."""
    from torch.distributed.fsdp import fully_shard

    for block in (_unet_blocks(generator.unet) if blocks is None else blocks):
        if block is not None:
            fully_shard(block)
    fully_shard(generator)


def shard_discriminator(discriminator) -> None:
    """FSDP2 for D. Its parameters stay gathered from the first forward of a step to its end
    : R1 differentiates D twice, and the second backward
    needs the gathered weights the first one would otherwise free (``reshard_all`` after the
    optimiser step). Gradients and AdamW states are still sharded."""
    from torch.distributed.fsdp import fully_shard

    for unit in _discriminator_units(discriminator):
        fully_shard(unit, reshard_after_forward=False)
    fully_shard(discriminator, reshard_after_forward=False)
    discriminator.set_reshard_after_backward(False)


def _discriminator_units(discriminator) -> list[torch.nn.Module]:
    """The modules D calls one by one (FSDP gathers a unit when it is called): a transformer
    D's blocks (``fsdp_units``); for the UNet D its down and mid blocks and, since it taps
    features between them, its up blocks' resnets, attentions and upsamplers."""
    if hasattr(discriminator, "fsdp_units"):
        return discriminator.fsdp_units()
    unet = discriminator.unet
    units = list(unet.down_blocks) + ([unet.mid_block] if unet.mid_block is not None else [])
    for block in unet.up_blocks:
        units += list(block.resnets) + list(getattr(block, "attentions", None) or []) + \
            list(block.upsamplers or [])
    return units


def reshard_all(module: torch.nn.Module) -> None:
    """Free the gathered weights of every FSDP unit in ``module`` (``reshard()`` of one unit
    does not recurse), so the next forward gathers the updated shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state_dict(module: torch.nn.Module, sharded: bool) -> dict:
    """The module's whole state on the CPU (a collective under FSDP: every process calls it)."""
    if not sharded:
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in
                module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def load_full_state_dict(module: torch.nn.Module, state: dict, sharded: bool) -> None:
    if not sharded:
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(module, optimizer, sharded: bool) -> dict:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module, optimizer, state: dict, sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)

    set_optimizer_state_dict(module, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
