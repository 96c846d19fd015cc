"""benchmarks/gpu_check.sh run dry on the CPU: a fake python and nvidia-smi stand in for the GPU
machine, so the script's own logic is tested (time boxes and their total, the summary rewritten
after every step, a step cut by its box, the rerun of only what failed)."""
import os
import shutil
import stat
import subprocess
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
BUDGET_S = 540  # one device call: 9 minutes, build and wheels included

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")

# The fake interpreter: logs its arguments, answers each step as the scenario says.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
arg_after() { local want=$1; shift; while [ $# -gt 0 ]; do
  [ "$1" = "$want" ] && { echo "$2"; return; }; shift; done; }
case "$*" in
  *"import xdist"*) exit 1 ;;
  *"import torch, triton"*) echo "torch 0.fake cuda 13.0 triton 0.fake" ;;
  *"build_info"*) cp "$FAKE_OUT/summary.txt" "$FAKE_SNAPSHOT"; echo "build info ok" ;;
  *"pip install"*) echo "installed" ;;
  *"-m pytest"*"not triton"*)
    echo "tests/test_a.py::test_ok PASSED [ 50%]"
    echo "tests/test_a.py::test_bad[x] FAILED [100%]"
    echo "======== 1 failed, 1 passed in 0.10s ========"; exit 1 ;;
  *"-m pytest"*"-m triton"*)
    if [[ "$*" == *"--deselect tests/test_t.py::test_one"* ]]; then
      echo "tests/test_t.py::test_two PASSED [100%]"
      echo "======== 1 passed in 0.10s ========"; exit 0
    fi
    echo "tests/test_t.py::test_one PASSED [ 50%]"; sleep 30 ;;
  *"-m pytest"*)
    echo "tests/test_a.py::test_bad[x] PASSED [100%]"
    echo "======== 1 passed in 0.10s ========" ;;
  *"bench gpu-days"*)
    out=$(arg_after --out "$@"); mkdir -p "$out"
    printf '%s\n' "# GPU-day accounting" "## Device-days of the recipe on this device" "" \
      "| quantity | value | unit | source | how |" "|---|---:|---|---|---|" \
      "| whole distillation, ours | 12.5 | GPU-days | derived | x |" \
      "## Measured: ODE-pair collection" "| hidden row | 1 | u | measured | x |" \
      > "$out/gpu_days.md" ;;
  *"benchmarks/run.py"*)
    only=$(arg_after --only "$@"); out=$(arg_after --out "$@")
    [ "$only" = "bench_elatentlpips" ] && sleep 30
    printf '%s\n' "| op | config | provider | mode | median ms |" "|---|---|---|---|---:|" \
      "| $only | N=1 | fused | fwd | 1.5 | | | | 2.0 | | |" > "$out/bench-gpu-$only.md" ;;
esac
exit 0
"""


def _executable(path, text):
    path.write_text(textwrap.dedent(text))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(tmp_path, out, *args, env_extra=None, timeout=120):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _executable(bin_dir / "fakepython", FAKE_PYTHON)
    _executable(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\necho 'name, memory.total'\n"
                                        "echo 'Fake GPU, 1 MiB'\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
               PYTHON=str(bin_dir / "fakepython"), FAKE_LOG=str(tmp_path / "calls.log"),
               FAKE_OUT=str(out), FAKE_SNAPSHOT=str(tmp_path / "snapshot.txt"),
               GPU_BOXES="tests_triton=2 bench_elatentlpips=2")
    env.pop("GPU_RERUN", None)
    env.pop("GPU_BENCH", None)
    env.update(env_extra or {})
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _steps(out):
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    return {name: int(rc) for name, rc, _ in rows}


def test_time_boxes_add_up_to_the_budget(tmp_path):
    res = subprocess.run(["bash", SCRIPT, "--budget"], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "GPU_BOXES"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    boxes = {line.split()[0]: int(line.split()[1]) for line in lines[:-1]}
    assert lines[-1] == f"total {sum(boxes.values())} s"
    assert sum(boxes.values()) <= BUDGET_S
    for step in ("build", "tests", "tests_triton", "gpu_days", "bench_train_step"):
        assert step in boxes, f"{step} has no time box"


@pytest.fixture(scope="module")
def first_call(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    out = tmp_path / "out"
    res = _run(tmp_path, out, str(out))
    return tmp_path, out, res


def test_dry_run_records_every_step_and_cut_boxes(first_call):
    tmp_path, out, res = first_call
    assert res.returncode == 0, res.stderr
    plan = (out / "plan.txt").read_text()
    boxes = dict(item.split("=") for item in plan.split("in all:")[1].split(";")[0].split())
    assert boxes["tests_triton"] == "2" and boxes["bench_elatentlpips"] == "2"  # GPU_BOXES
    assert f"time boxes {sum(map(int, boxes.values()))} s in all" in plan  # printed first
    steps = _steps(out)
    steps.pop("wheels", None)  # runs only where .whl/ holds wheels
    assert steps["tests"] == 1
    assert steps["tests_triton"] == 124 and steps["bench_elatentlpips"] == 124  # cut by the box
    for name in ("gpu_info", "build", "build_info", "gpu_days", "bench_paired_augment",
                 "bench_train_step"):
        assert steps[name] == 0, name
    summary = (out / "summary.txt").read_text()
    assert "tests/test_a.py::test_bad[x]" in summary          # failures named
    assert "(cut short or not finished) 1 passed, 0 failed so far" in summary
    assert "whole distillation, ours" in summary and "hidden row" not in summary
    assert "bench_paired_augment" in summary and "Fake GPU" in summary
    assert summary == res.stdout[res.stdout.index("====================="):]


def test_summary_is_written_before_the_run_ends(first_call):
    tmp_path, _, _ = first_call
    snapshot = (tmp_path / "snapshot.txt").read_text()   # taken while build_info ran
    build = next(line for line in snapshot.splitlines() if line.startswith("build "))
    assert build.split()[2] == "0"
    tests = next(line for line in snapshot.splitlines() if line.startswith("tests "))
    assert tests.split()[2] == "pending"


def test_rerun_runs_only_what_failed(first_call):
    tmp_path, out, _ = first_call
    log = tmp_path / "calls.log"
    log.write_text("")
    out2 = tmp_path / "out2"
    res = _run(tmp_path, out2, str(out2), env_extra={"GPU_RERUN": str(out)})
    assert res.returncode == 0, res.stderr
    steps = _steps(out2)
    steps.pop("wheels", None)
    assert steps == {"gpu_info": 0, "build": 0, "build_info": 0, "tests": 0,
                     "tests_triton": 0, "bench_elatentlpips": 124}
    calls = log.read_text().splitlines()
    pytest_calls = [c for c in calls if "-m pytest" in c]
    assert len(pytest_calls) == 2
    assert pytest_calls[0].endswith("tests/test_a.py::test_bad[x]")      # only the failure
    assert "-m cuda" not in pytest_calls[0]
    assert "--deselect tests/test_t.py::test_one -m triton tests" in pytest_calls[1]
    assert not any("gpu-days" in c for c in calls)                      # passed the first time
    assert not any("--only bench_paired_augment" in c for c in calls)
