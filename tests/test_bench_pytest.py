"""The benchmark suite on pytest-benchmark (benchmarks/test_cases.py, benchmarks/conftest.py):
every bench_*.py's cases are collected, the quick CPU cases run once (a smoke test: no timing
is asserted), and two saved runs compare, with --benchmark-compare-fail catching a regression.

Each test runs ``pytest benchmarks/`` in a subprocess, as a user would, from the checkout.
"""
import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.harness import case_id  # noqa: E402

# Compiling every reference with torch.compile takes minutes on 2 cores (a tiny UNet alone over
# a minute): the smoke run leaves the ref-compiled provider out; test_bench_harness covers it.
SMOKE_SELECTION = "not ref-compiled"


def _pytest_benchmarks(*args, timeout=900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    return proc


def _expected_ids(device: str) -> dict[str, set[str]]:
    """Per bench_*.py file (found here by glob, not by the harness): the ids of its quick cases."""
    expected = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py"))):
        name = os.path.basename(path)[:-3]
        module = importlib.import_module(f"benchmarks.{name}")
        expected[name] = {case_id(device, name, case, mode)
                          for case in module.cases(device, True) for mode in case.modes}
    return expected


def _collected_ids(output: str) -> list[str]:
    return [line.split("::test_case[", 1)[1][:-1] for line in output.splitlines()
            if "::test_case[" in line]


def test_every_bench_file_quick_cases_are_pytest_benchmark_items():
    proc = _pytest_benchmarks("--collect-only", "-q")
    assert proc.returncode == 0, proc.output[-3000:]
    collected = _collected_ids(proc.output)
    assert len(collected) == len(set(collected)), "two items with one name"
    for device in ("cpu", "cuda"):  # the CUDA items are collected everywhere, skipped without a GPU
        for name, ids in _expected_ids(device).items():
            assert ids, f"benchmarks/{name}.py has no quick {device} case"
            missing = ids - set(collected)
            assert not missing, f"benchmarks/{name}.py: not collected by pytest: {sorted(missing)[:5]}"
    expected = set().union(*_expected_ids("cpu").values(), *_expected_ids("cuda").values())
    assert set(collected) == expected, sorted(set(collected) - expected)[:5]


def test_quick_cpu_cases_run_once():
    """Every quick CPU case (but the compiled references) makes and runs each mode once."""
    proc = _pytest_benchmarks("--benchmark-disable", "--bench-device", "cpu", "-k", SMOKE_SELECTION,
                              "-q", "-rs", "--durations=5", timeout=3600)  # 2-3 min on 2 idle cores
    print(proc.output[-2500:])  # the slowest items, in the -rA / failure report
    assert proc.returncode == 0, proc.output[-5000:]
    assert " passed" in proc.output and " failed" not in proc.output, proc.output[-3000:]


def _scale_saved_times(path: str, factor: float) -> None:
    with open(path) as f:
        data = json.load(f)
    for bench in data["benchmarks"]:
        stats = bench["stats"]
        for key in ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "ld15iqr", "hd15iqr",
                    "total"):
            stats[key] *= factor
        stats["data"] = [t * factor for t in stats.get("data", [])]
        stats["ops"] /= factor
    with open(path, "w") as f:
        json.dump(data, f)


def test_saved_runs_compare_and_the_regression_gate_fails(tmp_path):
    storage = tmp_path / "store"
    run = ("--benchmark-only", "--bench-device", "cpu", "-k", "augment_params_sample and host",
           "--benchmark-min-rounds", "3", f"--benchmark-storage=file://{storage}", "-q")
    for name in ("first", "second"):
        proc = _pytest_benchmarks(*run, f"--benchmark-save={name}", f"--benchmark-json={tmp_path}/{name}.json")
        assert proc.returncode == 0, proc.output[-3000:]
    saved = sorted(glob.glob(str(storage / "*" / "*.json")))
    assert [os.path.basename(p)[:4] for p in saved] == ["0001", "0002"], saved
    data = json.loads((tmp_path / "first.json").read_text())
    info = data["machine_info"]["d2g_fast"]
    assert {"cpu_flags", "torch", "git", "threads", "cpu"} <= set(info)
    assert {b["extra_info"]["op"] for b in data["benchmarks"]} == {"augment_params_sample"}

    compare = subprocess.run([sys.executable, "-m", "pytest_benchmark", "--storage", f"file://{storage}",
                              "compare", "0001", "0002", "--group-by", "name"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "0001_first" in compare.stdout and "0002_second" in compare.stdout, compare.stdout

    # A baseline a million times faster than any machine: the gate must fail the run.
    _scale_saved_times(saved[0], 1e-6)
    gate = _pytest_benchmarks(*run, "--benchmark-compare=0001", "--benchmark-compare-fail=median:10%")
    assert gate.returncode != 0, gate.output[-3000:]
    assert "Performance has regressed" in gate.output, gate.output[-3000:]


@pytest.mark.parametrize("flag", ["--bench-warmup-rounds=-1", "--bench-threads=0"])
def test_bad_options_are_named(flag):
    proc = _pytest_benchmarks("--collect-only", "-q", flag, timeout=300)
    assert proc.returncode != 0
    assert flag.split("=")[0] in proc.output, proc.output[-2000:]
