"""The extension's build record: which torch ``d2g_fast._C`` was compiled against.

setup.py writes it next to the extension; d2g_fast/_ext.py reads it before loading the
extension and refuses one compiled for another torch (its C++ ABI differs: the load fails with
undefined symbols, or worse, succeeds and misbehaves). This file imports neither torch nor the
package, because setup.py runs it on its own.
"""
from __future__ import annotations

import json
import os

FILE_NAME = "_C.build.json"

# How a user rebuilds the extension against the torch they run (see README.md, "Installing").
REBUILD_COMMAND = "pip install --no-build-isolation --no-deps --force-reinstall ."


def write(folder: str, record: dict) -> str:
    """Write ``record`` (e.g. ``{"torch": torch.__version__, ...}``) into ``folder``; returns
    the file's path."""
    path = os.path.join(folder, FILE_NAME)
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def read(folder: str) -> dict | None:
    """The record in ``folder``, or None when there is none (e.g. a CMake build) or it is
    unreadable."""
    try:
        with open(os.path.join(folder, FILE_NAME)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def torch_mismatch(record: dict | None, running_torch: str) -> str | None:
    """None when the extension may be loaded with ``running_torch`` (the record agrees, or
    there is no record), else the explanation with the fix."""
    if record is None or record.get("torch") == running_torch:
        return None
    return (f"the compiled extension d2g_fast._C was built against torch {record.get('torch')}, "
            f"but torch {running_torch} is running; an extension compiled for another torch "
            f"does not load (or worse, loads and misbehaves), so it was not loaded. Rebuild it "
            f"against this torch: `{REBUILD_COMMAND}` in the d2g_fast source folder (`make "
            f"build` in a development checkout). A plain `pip install .` builds in an isolated "
            f"environment against whatever torch pip fetches there: always pass "
            f"--no-build-isolation.")
