"""sha256 + size records of the files of a folder (checkpoints, exported students) or of one
file (d2g lpips checkpoints, in a ``.sha256.json`` beside it), and their verification."""
from __future__ import annotations

import json
import os

from d2g_fast.data.store import atomic_write_json, sha256_file


def digest(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def record_folder(folder: str, skip=(), suffixes: tuple[str, ...] | None = None) -> dict:
    """{relative path: {bytes, sha256}} of every file under ``folder`` (sorted), except the
    names in ``skip`` and, when ``suffixes`` is given, files not ending in one of them."""
    record = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel in skip or name.startswith(".") or \
                    (suffixes is not None and not name.endswith(suffixes)):
                continue
            record[rel] = digest(os.path.join(root, name))
    return record


def verify_folder(folder: str, record: dict) -> list[str]:
    """Problems of ``folder`` against ``record`` (empty: intact); each names its file."""
    problems = []
    for rel, want in sorted(record.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != want["bytes"]:
            problems.append(f"{path}: {size} bytes, the record says {want['bytes']}")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{path}: sha256 mismatch (corrupted)")
    return problems


# ------------------------------------------------------------------------------ one file
def sidecar(path: str) -> str:
    return str(path) + ".sha256.json"


def write_file_record(tmp_path: str, final_path: str) -> None:
    """Before ``tmp_path`` is renamed to ``final_path``: record its digest beside
    ``final_path``, keeping the previous file's digest as "previous" (a crash between the two
    renames leaves the previous file, which still verifies)."""
    previous = None
    if os.path.isfile(sidecar(final_path)):
        try:
            with open(sidecar(final_path), encoding="utf-8") as f:
                previous = json.load(f).get("current")
        except (OSError, ValueError):
            previous = None
    atomic_write_json(sidecar(final_path), {"file": os.path.basename(str(final_path)),
                                            "current": digest(tmp_path), "previous": previous})


def verify_file(path: str) -> list[str]:
    """Problems of one file against its ``.sha256.json`` (empty: intact; no record: unchecked)."""
    path = str(path)
    if not os.path.isfile(sidecar(path)):
        return []
    try:
        with open(sidecar(path), encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError) as exc:
        return [f"{sidecar(path)}: unreadable ({exc})"]
    have = digest(path)
    if have in [r for r in (rec.get("current"), rec.get("previous")) if r]:
        return []
    want = rec.get("current") or {}
    if have["bytes"] != want.get("bytes"):
        return [f"{path}: {have['bytes']} bytes, the record says {want.get('bytes')}"]
    return [f"{path}: sha256 mismatch (corrupted)"]
