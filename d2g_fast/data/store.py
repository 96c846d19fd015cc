"""The pair store: safetensors shards plus a JSON manifest, every write atomic.

Layout of a store folder:
  manifest.json               config, teacher identity, per-shard counts/sizes/sha256, cost
  prompts.json                the prompt list (pairs store an index into it)
  shard-00000.safetensors     tensors of pairs [start, start + count):
                                noise [n, C, h, w] float32, latent [n, C, h, w] float32,
                                index [n] int64 (pair index), prompt_index [n] int64,
                                optionally prompt_embeds [n, L, D] and pooled_prompt_embeds [n, P]
  shard-00000.json            the shard's receipt (sha256, size, device-seconds), written after
                              the shard; a shard counts as done only when its receipt exists

Shard k always holds pairs [k * shard_size, min((k + 1) * shard_size, num_pairs)), whatever the
number of processes; each process writes whole shards, so nothing is shared between writers but
the manifest, which one process writes. Files are written to a temporary name in the same folder,
flushed to disk, then renamed: a killed writer leaves either the old state or the new one, plus
at worst a temporary file that the next run removes.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

FORMAT = "d2g-pairs"
VERSION = 1
MANIFEST = "manifest.json"
PROMPTS = "prompts.json"
_TMP_MARK = ".tmp-"


class StoreError(RuntimeError):
    """A store folder is missing, incomplete, corrupted or inconsistent."""


class ConfigMismatchError(ValueError):
    """A store folder holds pairs made with a different configuration."""


def shard_file(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def receipt_file(k: int) -> str:
    return f"shard-{k:05d}.json"


def plan_shards(num_pairs: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard number, first pair index, count) of every shard."""
    return [(k, start, min(shard_size, num_pairs - start))
            for k, start in enumerate(range(0, num_pairs, shard_size))]


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename,
    fsync of the folder (so the rename itself survives a power cut). A full or read-only disk
    raises StorageError (d2g_fast.runtime.diskspace) with the temporary file removed."""
    from d2g_fast.runtime.diskspace import inject_fault, writing

    folder = os.path.dirname(os.path.abspath(path))
    with writing(path, len(data)):
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + _TMP_MARK, dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            inject_fault(path)  # the tests' full disk, after the bytes went out
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename in it) to disk."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False)
                              + "\n").encode())


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ensure_writable(out: str) -> str:
    """Create ``out`` if needed and check that files can be created in it; errors name --out."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"out (--out): {out!r} exists and is not a folder")
    from d2g_fast.runtime.diskspace import check_creatable, check_writable_folder

    check_creatable(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"out (--out): cannot create the output folder {out!r}: "
                              f"{exc.strerror or exc}") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe" + _TMP_MARK, dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"out (--out): the output folder {out!r} is not writable: "
                              f"{exc.strerror or exc}") from exc
    check_writable_folder(out)
    return out


def remove_stale_temporaries(out: str) -> list[str]:
    """Remove temporary files left by a killed writer."""
    removed = []
    for name in os.listdir(out):
        if _TMP_MARK in name:
            try:
                os.unlink(os.path.join(out, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise StoreError(f"root: {root!r} is not a pair store (no {MANIFEST})")
    try:
        manifest = read_json(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"root: {path} is unreadable or corrupted: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise StoreError(f"root: {path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise StoreError(f"root: {path} has format version {manifest.get('version')}, this "
                         f"d2g_fast reads version {VERSION}")
    return manifest


def describe_mismatch(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = []
    for key in keys:
        if old.get(key) != new.get(key):
            a, b = json.dumps(old.get(key))[:80], json.dumps(new.get(key))[:80]
            diffs.append(f"{key}: stored {a}, requested {b}")
    return "; ".join(diffs)


def read_receipt(out: str, k: int, start: int, count: int, config_hash: str) -> dict | None:
    """The receipt of shard k when the shard is done for this configuration and layout (its
    receipt exists, matches, and the shard file has the recorded size), else None."""
    path = os.path.join(out, receipt_file(k))
    try:
        receipt = read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    if (receipt.get("config_hash"), receipt.get("start"), receipt.get("count")) != \
            (config_hash, start, count):
        return None
    try:
        if os.path.getsize(os.path.join(out, receipt["file"])) != receipt["bytes"]:
            return None
    except (OSError, KeyError):
        return None
    return receipt


def verify_store(root: str, *, checksums: bool = True) -> list[str]:
    """Check a store: manifest, prompt list, and every shard (present, size, sha256). Returns a
    list of problems (empty when all is well); each names the file it is about."""
    problems = []
    try:
        manifest = read_manifest(root)
    except StoreError as exc:
        return [str(exc)]
    if not manifest.get("complete"):
        problems.append(f"{MANIFEST}: the collection is incomplete (rerun the same d2g collect "
                        f"command to finish it)")
    prompts_entry = manifest.get("prompts", {})
    prompts_path = os.path.join(root, PROMPTS)
    if not os.path.isfile(prompts_path):
        problems.append(f"{PROMPTS}: missing")
    elif checksums and sha256_file(prompts_path) != prompts_entry.get("sha256"):
        problems.append(f"{PROMPTS}: sha256 mismatch (corrupted or replaced)")
    for shard in manifest.get("shards", []):
        path = os.path.join(root, shard["file"])
        if not os.path.isfile(path):
            problems.append(f"{shard['file']}: missing")
            continue
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            problems.append(f"{shard['file']}: size {size} bytes, manifest says {shard['bytes']}")
        elif checksums and sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['file']}: sha256 mismatch (corrupted)")
    return problems
