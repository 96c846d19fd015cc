"""Installing for use: `pip install --no-build-isolation .` into a fresh virtual environment
builds the extension against the torch installed there, records that torch, and an import
with another torch refuses the extension, saying why and how to rebuild.

The fresh environment sees this checkout's .venv (torch, setuptools, pip) through a .pth file,
so nothing is downloaded; the source is copied first so that the build does not touch the
in-place development build in build/. D2G_NO_CUDA=1 keeps the build to the CPU kernels, which
still takes about 3 CPU-minutes: the install test runs when D2G_TEST_INSTALL=1 (CI sets it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest
import torch

import d2g_fast
from d2g_fast import _build_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_FILES = ("setup.py", "pyproject.toml", "README.md")
SOURCE_DIRS = ("csrc", "d2g_fast")
# Build outputs of the development checkout, never part of a clean source tree.
BUILD_OUTPUTS = shutil.ignore_patterns("*.so", _build_record.FILE_NAME, "__pycache__")


def _copy_source(dest: str) -> str:
    os.makedirs(dest)
    for name in SOURCE_FILES:
        shutil.copy2(os.path.join(ROOT, name), dest)
    for name in SOURCE_DIRS:
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dest, name), ignore=BUILD_OUTPUTS)
    return dest


def _fresh_venv(path: str) -> str:
    """A virtual environment whose only extra packages are those of the running one (a .pth)."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = os.path.join(path, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "running_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "D2G_NO_EXT", "D2G_IMPL")}
    env["D2G_NO_CUDA"] = "1"
    return env


def _run(args, cwd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, **kwargs)


PROBE = """
import importlib.metadata, json, os, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import d2g_fast
    from d2g_fast import _ext, ops
f = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
d = ops.lpips_distance(f, f.flip(0), torch.ones(3, dtype=torch.float64), impl="auto")
print(json.dumps({
    "file": d2g_fast.__file__, "version": d2g_fast.__version__,
    "metadata_version": importlib.metadata.version("d2g_fast"),
    "loaded": _ext.ext_loaded(), "error": _ext.ext_error(), "cuda": _ext.cuda_kernels_compiled(),
    "warnings": [str(w.message) for w in caught], "distance": d.tolist(),
}))
"""


def _probe(python: str, cwd: str) -> dict:
    result = _run([python, "-c", PROBE], cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_torch_mismatch_rule():
    assert _build_record.torch_mismatch(None, "2.14.1") is None  # no record: nothing to compare
    assert _build_record.torch_mismatch({"torch": "2.14.1"}, "2.14.1") is None
    message = _build_record.torch_mismatch({"torch": "2.4.0"}, "2.14.1")
    assert "built against torch 2.4.0" in message and "torch 2.14.1 is running" in message
    assert _build_record.REBUILD_COMMAND in message and "--no-build-isolation" in message


def test_setup_explains_a_build_without_torch(tmp_path):
    """In pip's isolated build environment torch is missing (pyproject.toml does not list it):
    setup.py stops with the --no-build-isolation instructions instead of building against a
    torch fetched for the occasion."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        requires = f.read().split("[build-system]")[1].split("\n[")[0]
    assert "torch" not in requires.split("requires")[1].split("]")[0]
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    result = _run([sys.executable, "-c", code], ROOT)
    assert result.returncode != 0
    assert "pip install --no-build-isolation ." in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("D2G_TEST_INSTALL", "") in ("", "0"),
                    reason="builds the extension from scratch (minutes): set D2G_TEST_INSTALL=1")
def test_pip_install_in_a_fresh_venv_builds_against_the_installed_torch(tmp_path):
    source = _copy_source(str(tmp_path / "src"))
    python = _fresh_venv(str(tmp_path / "venv"))
    install = _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                    "--no-index", "--no-cache-dir", source], str(tmp_path), timeout=1800)
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]

    # The installed package, not this checkout, with its extension built for this torch.
    probe = _probe(python, str(tmp_path))
    package_dir = os.path.dirname(probe["file"])
    assert package_dir.startswith(str(tmp_path / "venv")), probe["file"]
    assert probe["loaded"] and probe["error"] is None and not probe["cuda"], probe
    assert probe["version"] == probe["metadata_version"] == d2g_fast.__version__
    assert not [w for w in probe["warnings"] if "d2g_fast" in w], probe["warnings"]
    record = _build_record.read(package_dir)
    assert record is not None and record["torch"] == torch.__version__, record

    # The same install seen by another torch: the extension is refused, loudly, with the fix,
    # and the ops still work through the reference.
    _build_record.write(package_dir, {**record, "torch": "2.4.0"})
    probe2 = _probe(python, str(tmp_path))
    assert not probe2["loaded"], probe2
    assert "built against torch 2.4.0" in probe2["error"], probe2["error"]
    loud = [w for w in probe2["warnings"] if "built against torch 2.4.0" in w]
    assert loud and _build_record.REBUILD_COMMAND in loud[0], probe2["warnings"]
    assert probe2["distance"] == pytest.approx(probe["distance"], rel=1e-12)
