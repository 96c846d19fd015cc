"""One writer per folder: ``FOLDER/.d2g-lock.json`` records the holder (pid, host, command).

A second command on a folder in use is refused at once with a message naming the holder, before
it touches anything. A lock whose process is gone (same host, pid not running or reused by
another process; or an earlier run of this SLURM job, before its requeue) is stale and taken
over. Another host's lock cannot be checked otherwise: it is honoured, and the message says how
to remove it when that job is really gone. Under torchrun
rank 0 takes the job's lock and shares the outcome (``lock_for_job``); the other ranks write
only under it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import uuid

LOCK_FILE = ".d2g-lock.json"


class FolderLockedError(RuntimeError):
    """The folder is being written by another command."""

    @property
    def exit_status(self) -> int:
        from d2g_fast.runtime import EXIT_LOCKED

        return EXIT_LOCKED


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _job() -> dict:
    """The scheduler's job this process belongs to (SLURM keeps the job id across requeues and
    counts the restarts)."""
    keys = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _earlier_run_of_this_job(holder: dict) -> bool:
    """The holder is this SLURM job before a requeue (same job id, another restart count): it
    is gone, whichever host it ran on."""
    theirs, mine = holder.get("job") or {}, _job()
    return "SLURM_JOB_ID" in mine and theirs.get("SLURM_JOB_ID") == mine["SLURM_JOB_ID"] and \
        theirs.get("SLURM_RESTART_COUNT", "0") != mine.get("SLURM_RESTART_COUNT", "0")


def _alive(holder: dict) -> bool:
    if _earlier_run_of_this_job(holder):
        return False
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = holder.get("process_start")
    return start is None or _process_start(pid) in (None, start)


def describe(holder: dict) -> str:
    return (f"{holder.get('command', '?')} (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('started', '?')})")


class FolderLock:
    """The lock of one folder, held by this process until ``release``."""

    def __init__(self, folder: str, command: str):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self.command = command
        self.token = uuid.uuid4().hex
        self.held = False

    def _record(self) -> dict:
        job = _job()
        return {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "argv": sys.argv, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "process_start": _process_start(os.getpid()), "job": job, "token": self.token}

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written this instant, or truncated by a crash

    def acquire(self, log=None) -> "FolderLock":
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                    return self  # this process already holds it (a nested command)
                if holder and _alive(holder):
                    raise FolderLockedError(
                        f"{self.folder} is in use by {describe(holder)}; nothing was touched. "
                        f"Wait for it to finish, or, if that process is really gone, delete "
                        f"{self.path}") from None
                self._take_over(holder, log)
                continue
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self._record(), f)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:  # a full disk: no empty lock file left behind
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise
            self.held = True
            return self
        raise FolderLockedError(f"{self.folder}: could not take the lock {self.path} (other "
                                f"commands keep taking it)")

    def _take_over(self, holder: dict, log) -> None:
        """Move a stale lock aside (atomically: of two takers, one wins) and delete it."""
        aside = f"{self.path}.stale-{os.getpid()}-{self.token[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        os.unlink(aside)
        if log is not None:
            log(f"{self.command}: took over the stale lock of {describe(holder or {})} "
                f"(that process is gone)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder and holder.get("token") == self.token:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_for_job(folder: str, command: str, rank: int = 0, log=None) -> FolderLock | None:
    """Take ``folder``'s lock on rank 0 for the whole (torchrun) job; every rank raises
    ``FolderLockedError`` when it is held elsewhere. Returns the lock on rank 0, else None.
    Collective under torchrun."""
    from d2g_fast.runtime.ranks import on_main_then_share

    return on_main_then_share(lambda: FolderLock(folder, command).acquire(log), rank,
                              share_result=False)
