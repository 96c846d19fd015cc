"""Full-state checkpoints: ``RUN_DIR/checkpoints/step-NNNNNNN/``, atomic, the newest K kept.

A checkpoint folder holds everything needed to continue exactly:
  generator.safetensors, ema.safetensors, discriminator.safetensors   the networks (a LoRA
                                     student's G and EMA, a light D: trainable parameters only)
  optimizer_g.pt, optimizer_d.pt     AdamW states (tensors and numbers only: read back with
                                     torch.load(weights_only=True))
  rng-rank<R>.pt                     every process's CPU, CUDA, Python and NumPy RNG states
  state.json                         step, data position, counters, the resolved config
  complete.json                      written last: step, world, and the size and sha256 of
                                     every other file (``verify_checkpoint`` checks them)
It is written under a temporary name in checkpoints/ and renamed when complete, so a run killed
while writing never leaves a folder that looks complete; the next run removes the leftover. A
full disk leaves no temporary folder and the older checkpoints as they were
(d2g_fast.runtime.diskspace). ``newest_intact_checkpoint`` skips damaged checkpoints (moved
aside as ``damaged-step-N``, never loaded).
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
from d2g_fast.runtime import checksums
from d2g_fast.runtime.diskspace import check_space, writing

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
def _unet_state(generator, sharded: bool, keys: set[str] | None = None) -> dict:
    """G's UNet weights (the keys of a diffusers UNet) from G's whole-module state; with
    ``keys`` (a LoRA student's trainable parameters) only those."""
    from d2g_fast.train.distributed import full_state_dict

    return {k[len("unet."):]: v for k, v in full_state_dict(generator, sharded).items()
            if k.startswith("unet.") and (keys is None or k in keys)}


def _d_keys(run) -> set[str] | None:
    """State keys of a light D's trained parameters (--light-d: its frozen backbone is the
    teacher's, rebuilt from the teacher folder, so not saved); None: the whole D is saved."""
    from d2g_fast.train.lora import trainable_keys

    return trainable_keys(run.discriminator) if getattr(run.config, "light_d", False) else None


def _d_state(run) -> dict:
    """D's weights as a checkpoint holds them (a light D: its trained parameters only)."""
    from d2g_fast.train.distributed import full_state_dict

    keys = _d_keys(run)
    return {k: v for k, v in full_state_dict(run.discriminator, run.sharded).items()
            if keys is None or k in keys}


def _save_tensors(path: str, state: dict) -> None:
    from safetensors.torch import save_file

    with writing(path, _nbytes(state)):
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        _fsync(path)


def _save_torch(path: str, obj) -> None:
    with writing(path, _nbytes(obj)):
        torch.save(obj, path)
        _fsync(path)


def _nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: the size a checkpoint file will about have."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


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

    Every process writes its own RNG file; rank 0 writes the rest, records every file's size and
    sha256 in complete.json and renames the folder (all processes must call this). A full disk
    raises StorageError on every process, with the temporary folder removed."""
    from d2g_fast.runtime.ranks import any_rank, on_main_then_share

    root = checkpoints_dir(run_dir)
    final = os.path.join(root, checkpoint_name(step))
    tmp = os.path.join(root, _TMP_PREFIX + f"{step:07d}")
    procs = run.procs
    if os.path.isfile(os.path.join(final, COMPLETE)):
        return final  # already written (a run resumed exactly at its last checkpoint)

    def start_folder():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp, cleanup=[tmp]):
            os.makedirs(tmp)

    on_main_then_share(start_folder, procs.rank, share_result=False)
    rng_error = None
    try:
        _save_torch(os.path.join(tmp, f"rng-rank{procs.rank}.pt"), rng_state())
    except Exception as exc:  # noqa: BLE001 - shared with every rank below
        rng_error = exc
    # Gathering is collective under FSDP: every process takes part, rank 0 writes.
    from d2g_fast.train.distributed import full_optimizer_state, full_state_dict

    from d2g_fast.train.lora import trainable_keys

    keys = trainable_keys(run.generator)  # a LoRA student: its adapters only
    tensors = {"generator": _unet_state(run.generator, run.sharded, keys),
               "discriminator": _d_state(run)}
    if run.ema is not None:
        tensors["ema"] = _unet_state(run.ema, run.sharded, keys)
    optimizers = {"optimizer_g": full_optimizer_state(run.generator, run.opt_g, run.sharded),
                  "optimizer_d": full_optimizer_state(run.discriminator, run.opt_d, run.sharded)}
    if any_rank(rng_error is not None):  # every rank's RNG file is written past this point
        if procs.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise rng_error or RuntimeError(f"checkpoint {final}: another process could not write "
                                        f"its RNG state (see its message)")

    def write_rest():
        try:
            check_space(root, _nbytes(tensors) + _nbytes(optimizers))
            _save_tensors(os.path.join(tmp, "generator.safetensors"), tensors.pop("generator"))
            _maybe_fault(step)
            for name, state in tensors.items():
                _save_tensors(os.path.join(tmp, f"{name}.safetensors"), state)
            for name, state in optimizers.items():
                _save_torch(os.path.join(tmp, f"{name}.pt"), state)
            atomic_write_json(os.path.join(tmp, "state.json"), {"step": step, **extra_state})
            atomic_write_json(os.path.join(tmp, COMPLETE), {
                "step": step, "world": procs.world, "files": checksums.record_folder(tmp)})
            if os.path.isdir(final):  # an incomplete folder of the same name: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing partial stays behind
            raise

    on_main_then_share(write_rest, procs.rank, share_result=False)
    return final


def verify_checkpoint(path: str) -> list[str]:
    """Problems of a checkpoint folder (empty: intact): every file against the size and sha256
    in its complete.json. Checkpoints written before checksums were recorded pass unchecked."""
    try:
        with open(os.path.join(path, COMPLETE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        return [f"{os.path.join(path, COMPLETE)}: unreadable ({exc})"]
    return checksums.verify_folder(path, record.get("files", {}))


def newest_intact_checkpoint(run_dir: str, warn=print) -> str | None:
    """The newest complete checkpoint whose files match their checksums (None: there is none).
    Damaged newer ones are named in a warning and moved aside as ``damaged-step-N`` (kept for
    inspection, never loaded); when every checkpoint is damaged nothing is moved and the
    resume is refused."""
    damaged = []
    for _, path in reversed(list_checkpoints(run_dir)):
        problems = verify_checkpoint(path)
        if not problems:
            for bad in damaged:
                aside = os.path.join(os.path.dirname(bad), "damaged-" + os.path.basename(bad))
                while os.path.exists(aside):
                    aside += "-again"
                os.replace(bad, aside)
            return path
        warn(f"warning: checkpoint {path} is damaged ({'; '.join(problems[:3])}); it is skipped "
             f"and never loaded")
        damaged.append(path)
    if damaged:
        raise ValueError(f"resume (--resume auto): every checkpoint in {checkpoints_dir(run_dir)} "
                         f"is damaged ({', '.join(os.path.basename(p) for p in damaged)}); "
                         f"nothing was loaded. Check them with d2g verify {run_dir}; move them "
                         f"away to start afresh")
    return None


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

    from d2g_fast.train.lora import trainable_keys

    check_lora_compatible(read_state(path).get("config", {}), run.config)
    check_light_d_compatible(read_state(path).get("config", {}), run.config)
    keys = trainable_keys(run.generator)

    def unet_file(name):
        state = {"unet." + k: v for k, v in _load_tensors(os.path.join(path, name)).items()}
        if keys is not None and set(state) != keys:
            raise ValueError(f"resume (--resume): {path!r} holds other G weights than this "
                             f"LoRA student's adapters (--lora-targets differ?)")
        return state

    def load_g(module, state):
        if keys is None:
            load_full_state_dict(module, state, run.sharded)
        else:  # the adapters only (checked above); the frozen base is the teacher's
            load_partial_state_dict(module, state, run.sharded)

    load_g(run.generator, unet_file("generator.safetensors"))
    if run.ema is not None:
        has_ema = os.path.isfile(os.path.join(path, "ema.safetensors"))
        load_g(run.ema, unet_file("ema.safetensors" if has_ema else "generator.safetensors"))
    d_keys = _d_keys(run)
    d_state = _load_tensors(os.path.join(path, "discriminator.safetensors"))
    if d_keys is None:
        load_full_state_dict(run.discriminator, d_state, run.sharded)
    elif set(d_state) != d_keys:
        raise ValueError(f"resume (--resume): {path!r} holds other D weights than this light "
                         f"D's trained parts (other --d-* settings?)")
    else:  # a light D's trained parts; its frozen backbone is the teacher's
        load_partial_state_dict(run.discriminator, d_state, run.sharded)
    for name, module, opt in (("optimizer_g.pt", run.generator, run.opt_g),
                              ("optimizer_d.pt", run.discriminator, run.opt_d)):
        state = torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
        load_full_optimizer_state(module, opt, state, run.sharded)
    rng_file = os.path.join(path, f"rng-rank{run.procs.rank}.pt")
    if not os.path.isfile(rng_file):
        rng_file = os.path.join(path, "rng-rank0.pt")
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return read_state(path)


def check_lora_compatible(saved_config: dict, config) -> None:
    """Refuse resuming a LoRA checkpoint as another LoRA student or as a full G (and back)."""
    from d2g_fast.train.lora import settings

    old, new = settings(saved_config), settings(config)
    if old != new:
        raise ValueError(f"lora_rank (--lora-rank): the checkpoint was trained with LoRA "
                         f"settings {old} (None: full G), this run asks for {new}; resume with "
                         f"the same --lora-rank/--lora-alpha/--lora-targets or start a new --out")


def check_light_d_compatible(saved_config: dict, config) -> None:
    """Refuse resuming a light-D checkpoint with the full D (and back)."""
    old, new = bool(saved_config.get("light_d", False)), bool(config.light_d)
    if old != new:
        raise ValueError(f"light_d (--light-d): the checkpoint was trained with "
                         f"{'the light D' if old else 'the full D'}, this run asks for "
                         f"{'the light D' if new else 'the full D'}; resume with the same "
                         f"--light-d setting or start a new --out")


def load_partial_state_dict(module, state: dict, sharded: bool) -> None:
    """Load some of a module's parameters (the caller checked the keys)."""
    if not sharded:
        module.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True,
                                                                 strict=False))


def load_generator_weights(path: str, use_ema: bool = True) -> dict:
    """G's (EMA by default) UNet state dict from a checkpoint folder (for export)."""
    name = "ema.safetensors" if use_ema and os.path.isfile(
        os.path.join(path, "ema.safetensors")) else "generator.safetensors"
    return _load_tensors(os.path.join(path, name))
