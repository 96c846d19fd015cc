"""`make demo` must keep working: run it end to end at its smallest."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "d2g_fast.demo", "--out", str(out), "--pairs", "8", "--steps", "3",
         "--iters", "2", "--batch-size", "4"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo finished" in proc.stdout
    assert (out / "pairs" / "manifest.json").is_file()
    assert (out / "generator" / "config.json").is_file(), "the generator was not exported"
    assert (out / "generator" / "diffusion_pytorch_model.safetensors").is_file()


def test_demo_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "d2g_fast.demo", "--out", str(tmp_path), "--iters", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "--iters must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
