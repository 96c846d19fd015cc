"""Decisions made once, on rank 0, and shared with every rank of a torchrun job."""
from __future__ import annotations


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def on_main_then_share(fn, rank: int, share_result: bool = True):
    """Run ``fn()`` on rank 0 only; every rank returns its result (``share_result``) or raises
    its error, so that no rank waits forever for a rank 0 that gave up. Collective."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
    if world_size() > 1:
        import torch.distributed as dist

        box = [(result if share_result else None,
                None if error is None else (type(error), str(error)))]
        dist.broadcast_object_list(box, src=0)
        shared, err = box[0]
        if rank != 0:
            if err is not None:
                kind, message = err
                try:
                    error = kind(message)
                except Exception:  # noqa: BLE001 - an exception type with other arguments
                    error = RuntimeError(message)
            result = shared
    if error is not None:
        raise error
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (one tiny all-reduce). Collective."""
    if world_size() <= 1:
        return bool(flag)
    import torch
    import torch.distributed as dist

    device = "cpu"
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return float(t) > 0
