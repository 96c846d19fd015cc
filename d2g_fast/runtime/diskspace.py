"""Full and read-only disks: one message for every command, and no partial file left behind.

``writing(path, needed)`` wraps a write: an error that comes from the disk (ENOSPC, EDQUOT,
EROFS, EACCES, EPERM, also when a library reports it as RuntimeError/SafetensorError) becomes a
``StorageError`` naming the path, the bytes needed and the bytes free; the files named in
``cleanup`` are removed first. ``d2g`` prints the message without a traceback and exits with
``EXIT_DISK``. ``check_space`` refuses a large write up front when it cannot fit.

Fault injection for the tests: ``D2G_FAULT_ENOSPC=TEXT`` makes every ``writing`` of a path that
contains TEXT fail with ENOSPC after the bytes were written (so the clean-up is exercised too),
as a disk that is full from then on.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat

FAULT_ENV = "D2G_FAULT_ENOSPC"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded")
# A write that fails while less than this is free is taken to have failed for lack of space
# (torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos").
_NEARLY_FULL = 1 << 20


class StorageError(RuntimeError):
    """A write failed because the disk is full or read-only; the message says what to do."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def free_bytes(path: str) -> int | None:
    """Bytes free to this user on the file system holding ``path`` (or its nearest parent)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def full_message(path: str, needed: int | None) -> str:
    return (f"no space left on the device for {path}: {human(needed)} needed, "
            f"{human(free_bytes(path))} free. Earlier results are intact and nothing partial "
            f"was kept; free some space (or choose another --out) and rerun the same command")


def read_only_message(path: str, reason: str) -> str:
    return (f"cannot write {path}: {reason} (a read-only or unwritable folder). Nothing was "
            f"written; choose a writable --out or fix the folder's permissions")


def is_disk_error(exc: BaseException, path: str | None = None) -> bool:
    """Whether ``exc`` says the disk is full or read-only."""
    if isinstance(exc, StorageError):
        return True
    if isinstance(exc, OSError) and exc.errno in _FULL + _READ_ONLY:
        return True
    text = str(exc)
    if any(t in text for t in _FULL_TEXT):
        return True
    free = free_bytes(path) if path else None
    return isinstance(exc, (OSError, RuntimeError)) and free is not None and free < _NEARLY_FULL


def to_storage_error(exc: BaseException, path: str, needed: int | None = None) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _READ_ONLY:
        return StorageError(read_only_message(path, exc.strerror or str(exc)), path)
    return StorageError(full_message(path, needed), path)


def _remove(paths) -> None:
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)


def inject_fault(path: str) -> None:
    """The tests' full disk: ENOSPC for a path containing $D2G_FAULT_ENOSPC."""
    text = os.environ.get(FAULT_ENV)
    if text and text in path:
        raise OSError(errno.ENOSPC, "No space left on device (injected)", path)


@contextlib.contextmanager
def writing(path: str, needed: int | None = None, cleanup=()):
    """Around a write of ``path`` (``needed`` bytes when known): disk errors become a
    ``StorageError`` after the ``cleanup`` paths (the partial file, a temporary folder) are
    removed. Other errors pass through unchanged (the clean-up still runs)."""
    try:
        yield
        inject_fault(path)
    except BaseException as exc:
        _remove(cleanup)
        if is_disk_error(exc, path):
            raise to_storage_error(exc, path, needed) from None
        raise


def check_space(path: str, needed: int) -> None:
    """Refuse a write of ``needed`` bytes under ``path`` that cannot fit, before writing."""
    free = free_bytes(path)
    if free is not None and needed > free:
        raise StorageError(full_message(path, needed), path)


def check_creatable(out: str, flag: str = "--out") -> None:
    """Refuse to create ``out`` inside a folder marked read-only (as ``check_writable_folder``)."""
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.exists(out) and os.path.isdir(parent) and \
            not os.stat(parent).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"out ({flag}): cannot create {out!r}: the folder {parent!r} is "
                              f"read-only; choose a writable folder")


def check_writable_folder(out: str, flag: str = "--out") -> None:
    """Refuse a folder marked read-only (no write permission bits: even root is refused, as a
    user who made it read-only means it) or on a read-only file system; errors name ``flag``."""
    st = os.stat(out)
    if not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"out ({flag}): the output folder {out!r} is read-only (mode "
                              f"{stat.filemode(st.st_mode)}); choose a writable folder")
    try:
        if os.statvfs(out).f_flag & os.ST_RDONLY:
            raise PermissionError(f"out ({flag}): the output folder {out!r} is on a read-only "
                                  f"file system; choose a writable folder")
    except (AttributeError, OSError):  # no statvfs on this platform
        pass
