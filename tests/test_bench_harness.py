"""benchmarks/harness.py: the peak-memory measure and the compiled-reference provider that
every benchmark table reports (issue 17)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import COMPILE_KWARGS, compiled, peak_memory_mb, time_callable  # noqa: E402

MIB = 2**20


def test_cpu_peak_memory_counts_live_tensors_only():
    def one_at_a_time():
        for _ in range(3):
            torch.empty(MIB // 4)  # 1 MiB, freed at once

    def three_alive():
        keep = [torch.empty(MIB // 4) for _ in range(3)]
        return len(keep)

    one, three = peak_memory_mb(one_at_a_time, "cpu"), peak_memory_mb(three_alive, "cpu")
    assert 1.0 <= one < 1.1, one
    assert 3.0 <= three < 3.1, three


def test_cpu_peak_memory_is_relative_to_the_start():
    held = torch.empty(4 * MIB // 4)  # allocated before the call: not part of its peak
    assert peak_memory_mb(lambda: held.add_(1), "cpu") < 0.1


def test_compiled_is_one_compiled_function_per_reference():
    def ref(x):
        return (x * 2).sum()

    assert compiled(ref) is compiled(ref)
    assert COMPILE_KWARGS["mode"] is None and COMPILE_KWARGS["backend"] == "inductor"


def test_time_callable_reports_the_first_call_separately():
    calls = []
    r = time_callable(lambda: calls.append(1), "cpu", min_time_s=0.0, min_reps=3, warmup=2)
    assert r["reps"] == 3 and len(calls) == 5
    assert r["first_ms"] >= 0 and r["median_ms"] >= 0


def test_case_build_checks_the_declared_modes():
    from benchmarks.harness import Case
    ok = Case(op="op", config="c", provider="p", modes=("fwd",), make=lambda: {"fwd": lambda: None})
    assert list(ok.build()) == ["fwd"]
    bad = Case(op="op", config="c", provider="p", modes=("fwd",),
               make=lambda: {"fwd": lambda: None, "fwd+bwd": lambda: None})
    try:
        bad.build()
    except ValueError as exc:
        assert "modes=('fwd',)" in str(exc) and "fwd+bwd" in str(exc)
    else:
        raise AssertionError("a case returning undeclared modes must not build")


def test_case_id_names_device_file_op_config_provider_mode():
    from benchmarks.harness import Case, case_id
    case = Case(op="lpips_distance", config="N=2 64x64x64 float32", provider="cpu", make=dict)
    assert case_id("cpu", "bench_lpips_distance", case, "bwd") == \
        "cpu:lpips_distance:lpips_distance:N=2_64x64x64_float32:cpu:bwd"


def test_markdown_table_aligns_numbers_right_and_refuses_a_bad_align():
    from benchmarks.harness import markdown_table
    assert markdown_table(["lever", "ms"], [["full", "12"], ["lora", ""]], align="lr") == [
        "| lever | ms |", "|---|---:|", "| full | 12 |", "| lora |  |"]
    with pytest.raises(ValueError, match="align"):
        markdown_table(["lever", "ms"], [], align="l")


def test_markdown_table_lines_give_each_row_as_it_is_measured():
    from benchmarks.harness import markdown_table_lines
    measured = []

    def rows():
        for name in ("ref", "ours"):
            measured.append(name)
            yield [name, str(len(measured))]

    lines = markdown_table_lines(["provider", "n"], rows(), align="lr")
    assert [next(lines), next(lines)] == ["| provider | n |", "|---|---:|"] and measured == []
    assert next(lines) == "| ref | 1 |" and measured == ["ref"]
    assert list(lines) == ["| ours | 2 |"]
    bad = markdown_table_lines(["provider", "n"], rows(), align="lx")
    with pytest.raises(ValueError, match="align"):   # before any row is measured
        next(bad)
    assert measured == ["ref", "ours"]


def test_cpu_flags_name_the_bf16_hardware_and_torch_capability():
    from benchmarks.harness import CPU_FLAGS, cpu_flags
    from d2g_fast.cpu_features import bf16_hardware
    text = cpu_flags()
    assert text.endswith(f"(torch: {torch.backends.cpu.get_cpu_capability()}; bf16 hardware: "
                         f"{bf16_hardware() or 'none'})"), text
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            have = set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
        listed = text.split(" (torch:")[0]
        present = [f for f in CPU_FLAGS if f in have]
        assert listed == (" ".join(present) if present else "none of " + ",".join(CPU_FLAGS))


@pytest.mark.cuda
def test_cuda_timer_waits_for_the_gpu():
    """pytest-benchmark's timer for GPU cases: a kernel queued between two readings counts."""
    from benchmarks.harness import cuda_synchronized_timer
    torch.cuda.synchronize()
    t0 = cuda_synchronized_timer()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles, returns at once on the host
    t1 = cuda_synchronized_timer()
    assert t1 - t0 > 0.02, t1 - t0
