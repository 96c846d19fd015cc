"""Full-state checkpoints: ``RUN_DIR/checkpoints/step-NNNNNNN/``, atomic, the newest K kept.

A checkpoint folder holds everything needed to continue exactly:
  generator.safetensors, ema.safetensors, discriminator.safetensors   the networks
  optimizer_g.pt, optimizer_d.pt     AdamW states (tensors and numbers only: read back with
                                     torch.load(weights_only=True))
  rng-rank<R>.pt                     every process's CPU, CUDA, Python and NumPy RNG states
  state.json                         step, data position, counters, the resolved config
  complete.json                      written last
It is written under a temporary name in checkpoints/ and renamed when complete, so a run killed
while writing never leaves a folder that looks complete; the next run removes the leftover.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal

import numpy as np
import torch

from d2g_fast.data.store import atomic_write_json, fsync_dir

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{7,})$")
_TMP_PREFIX = ".tmp-step-"
COMPLETE = "complete.json"
# Fault injection for the crash tests: SIGKILL this process half-way through writing the
# checkpoint of this step.
FAULT_ENV = "D2G_FAULT_KILL_IN_CHECKPOINT"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_incomplete(run_dir: str) -> list[str]:
    """Delete temporary folders of checkpoints whose writer was killed."""
    root = checkpoints_dir(run_dir)
    removed = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(_TMP_PREFIX):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
    return removed


# ------------------------------------------------------------------------------ saving
def _unet_state(generator, sharded: bool) -> dict:
    """G's UNet weights (the keys of a diffusers UNet) from G's whole-module state."""
    from d2g_fast.train.distributed import full_state_dict

    return {k[len("unet."):]: v for k, v in full_state_dict(generator, sharded).items()
            if k.startswith("unet.")}


def _save_tensors(path: str, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path)
    _fsync(path)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state() -> dict:
    """Every RNG this process uses, as tensors and plain numbers."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "internal": list(internal), "gauss": gauss},
             "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                       "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                       "gauss": float(np_gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _maybe_fault(step: int) -> None:
    if os.environ.get(FAULT_ENV, "") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(run, run_dir: str, step: int, extra_state: dict) -> str:
    """Write the checkpoint of the state after ``step`` completed steps; returns its folder.

    Every process writes its own RNG file; rank 0 writes the rest and renames the folder once
    all have written (all processes must call this)."""
    root = checkpoints_dir(run_dir)
    final = os.path.join(root, checkpoint_name(step))
    tmp = os.path.join(root, _TMP_PREFIX + f"{step:07d}")
    procs = run.procs
    if os.path.isfile(os.path.join(final, COMPLETE)):
        return final  # already written (a run resumed exactly at its last checkpoint)
    if procs.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    procs.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{procs.rank}.pt"))
    _fsync(os.path.join(tmp, f"rng-rank{procs.rank}.pt"))
    # Gathering is collective under FSDP: every process takes part, rank 0 writes.
    from d2g_fast.train.distributed import full_optimizer_state, full_state_dict

    tensors = {"generator": _unet_state(run.generator, run.sharded),
               "discriminator": full_state_dict(run.discriminator, run.sharded)}
    if run.ema is not None:
        tensors["ema"] = _unet_state(run.ema, run.sharded)
    optimizers = {"optimizer_g": full_optimizer_state(run.generator, run.opt_g, run.sharded),
                  "optimizer_d": full_optimizer_state(run.discriminator, run.opt_d, run.sharded)}
    if procs.is_main:
        _save_tensors(os.path.join(tmp, "generator.safetensors"), tensors.pop("generator"))
        _maybe_fault(step)
        for name, state in tensors.items():
            _save_tensors(os.path.join(tmp, f"{name}.safetensors"), state)
        for name, state in optimizers.items():
            torch.save(state, os.path.join(tmp, f"{name}.pt"))
            _fsync(os.path.join(tmp, f"{name}.pt"))
        atomic_write_json(os.path.join(tmp, "state.json"), {"step": step, **extra_state})
    procs.barrier()
    if procs.is_main:
        atomic_write_json(os.path.join(tmp, COMPLETE), {"step": step, "world": procs.world})
        if os.path.isdir(final):  # an incomplete folder of the same name: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    procs.barrier()
    return final


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints (keep 0: delete none)."""
    if keep <= 0:
        return []
    removed = []
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------ loading
def read_state(path: str) -> dict:
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        return json.load(f)


def _load_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


def load_checkpoint(run, path: str) -> dict:
    """Restore the networks, optimisers and this process's RNG from a checkpoint folder;
    returns its state.json."""
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise ValueError(f"resume (--resume): {path!r} is not a complete checkpoint folder "
                         f"(no {COMPLETE})")
    from d2g_fast.train.distributed import load_full_optimizer_state, load_full_state_dict

    def unet_file(name):
        return {"unet." + k: v for k, v in _load_tensors(os.path.join(path, name)).items()}

    load_full_state_dict(run.generator, unet_file("generator.safetensors"), run.sharded)
    if run.ema is not None:
        has_ema = os.path.isfile(os.path.join(path, "ema.safetensors"))
        load_full_state_dict(run.ema, unet_file("ema.safetensors" if has_ema else
                                                "generator.safetensors"), run.sharded)
    load_full_state_dict(run.discriminator,
                         _load_tensors(os.path.join(path, "discriminator.safetensors")),
                         run.sharded)
    for name, module, opt in (("optimizer_g.pt", run.generator, run.opt_g),
                              ("optimizer_d.pt", run.discriminator, run.opt_d)):
        state = torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
        load_full_optimizer_state(module, opt, state, run.sharded)
    rng_file = os.path.join(path, f"rng-rank{run.procs.rank}.pt")
    if not os.path.isfile(rng_file):
        rng_file = os.path.join(path, "rng-rank0.pt")
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return read_state(path)


def load_generator_weights(path: str, use_ema: bool = True) -> dict:
    """G's (EMA by default) UNet state dict from a checkpoint folder (for export)."""
    name = "ema.safetensors" if use_ema and os.path.isfile(
        os.path.join(path, "ema.safetensors")) else "generator.safetensors"
    return _load_tensors(os.path.join(path, name))
