"""``d2g verify`` of what is not a pair store: a distillation run folder (every checkpoint), an
exported student folder (the weights recorded in d2g_student.json), a d2g lpips checkpoint (its
.sha256.json). Each check prints ``ok`` or ``FAIL`` lines naming the files."""
from __future__ import annotations

import json
import os


def what_is(path: str) -> str | None:
    """"run", "student", "file" or None (not one of these)."""
    from d2g_fast.runtime.checksums import sidecar

    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "checkpoints")) or \
            os.path.isfile(os.path.join(path, "config.json")) and \
            os.path.isfile(os.path.join(path, "metrics.csv")):
        return "run"
    if os.path.isfile(os.path.join(path, "d2g_student.json")):
        return "student"
    if os.path.isfile(path) and os.path.isfile(sidecar(path)):
        return "file"
    return None


def verify_run(run_dir: str, out=print) -> list[str]:
    from d2g_fast.train.checkpoint import list_checkpoints, verify_checkpoint

    found = list_checkpoints(run_dir)
    if not found:
        return [f"{run_dir}: no complete checkpoint"]
    problems = []
    for step, path in found:
        bad = verify_checkpoint(path)
        out(f"{'FAIL' if bad else 'ok  '} checkpoint step {step}: {path}")
        for p in bad:
            out(f"     {p}")
        problems += bad
    return problems


def verify_student(folder: str, out=print) -> list[str]:
    from d2g_fast.runtime.checksums import verify_folder

    with open(os.path.join(folder, "d2g_student.json"), encoding="utf-8") as f:
        files = json.load(f).get("files")
    if not files:
        return [f"{folder}: d2g_student.json records no checksums (exported by an older d2g)"]
    problems = verify_folder(folder, files)
    for rel in sorted(files):
        bad = [p for p in problems if p.startswith(os.path.join(folder, rel) + ":")]
        out(f"{'FAIL' if bad else 'ok  '} {rel}" + (f": {bad[0].split(': ', 1)[1]}" if bad else ""))
    return problems


def verify_path(path: str, out=print) -> list[str] | None:
    """Problems of a run folder, student folder or checksummed file (None: none of these)."""
    from d2g_fast.runtime.checksums import verify_file

    kind = what_is(path)
    if kind == "run":
        return verify_run(path, out)
    if kind == "student":
        return verify_student(path, out)
    if kind == "file":
        problems = verify_file(path)
        out(f"{'FAIL' if problems else 'ok  '} {path}")
        return problems
    return None
