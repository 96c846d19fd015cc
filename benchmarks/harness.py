"""Timing harness shared by every benchmark file.

A benchmark file ``benchmarks/bench_<name>.py`` exposes ``cases(device, quick) -> list[Case]``.
Each case builds its inputs lazily (``make``) and returns zero-argument callables per mode:
"fwd", "bwd" (re-runs only the backward, e.g. ``out.backward(g, retain_graph=True)`` or
``torch.autograd.grad(..., retain_graph=True)``) and "fwd+bwd"; ``Case.modes`` names them
before anything is built. These case definitions are the one source of both runners:
run.py (interleaved provider rounds, ratios, markdown tables) and pytest-benchmark
(``pytest benchmarks/ --benchmark-only``: benchmarks/test_cases.py, benchmarks/conftest.py).

Every op's benchmark has a provider COMPILED ("ref-compiled"): ``torch.compile`` of the same
reference the "ref" provider runs eagerly (COMPILE_KWARGS: inductor, default mode, static
shapes), because that, not the eager reference, is the first thing a user would try instead of
our kernels. Its compile time shows in the "first ms" column (the first call of each mode),
never in the steady-state times.
"""
from __future__ import annotations

import importlib
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch


BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
MODES = ("fwd", "bwd", "fwd+bwd")
COMPILED = "ref-compiled"  # provider name of torch.compile(reference) in every benchmark
COMPILE_KWARGS = {"backend": "inductor", "mode": None, "dynamic": False}  # mode None = "default"
_COMPILED_FNS: dict = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, **COMPILE_KWARGS)``, one per function for the whole run, so that
    repeated rounds and cases reuse the compiled code instead of compiling again."""
    if fn not in _COMPILED_FNS:
        _COMPILED_FNS[fn] = torch.compile(fn, **COMPILE_KWARGS)
    return _COMPILED_FNS[fn]


class SkipCase(Exception):
    """Raised by ``Case.make`` when a provider cannot run here (package missing, no GPU...)."""


def require_backend(op: str, impl: str, device: str) -> None:
    """Raise SkipCase (with the reason) when backend ``impl`` of ``op`` cannot run on ``device``."""
    from d2g_fast import _dispatch  # noqa: PLC0415 (the harness imports without the package)
    try:
        _dispatch.resolve_impl(op, impl, torch.device(device))
    except RuntimeError as exc:
        raise SkipCase(str(exc)) from None


@dataclass
class Case:
    op: str
    config: str
    provider: str
    make: Callable[[], dict]
    bytes: float | None = None   # bytes an ideal forward must move (for GB/s and the roofline)
    flops: float | None = None   # floating-point operations of one forward
    bwd_bytes: float | None = None
    bwd_flops: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)
    modes: tuple = MODES          # the keys of the dict ``make`` returns

    def build(self) -> dict:
        """``make()``, checked against ``modes`` (the pytest items are named from ``modes``
        before anything is built)."""
        fns = self.make()
        if set(fns) != set(self.modes):
            raise ValueError(f"case {self.op} / {self.config} / {self.provider}: make() returned modes "
                             f"{tuple(fns)}, the case declares modes={tuple(self.modes)}")
        return fns


def bench_names(only: list[str] | None = None) -> list[str]:
    """Module names of every benchmarks/bench_*.py (sorted), or of those whose name contains one
    of the substrings ``only``."""
    names = sorted(f[:-3] for f in os.listdir(BENCH_DIR) if f.startswith("bench_") and f.endswith(".py"))
    return [n for n in names if not only or any(o in n for o in only)]


def load_cases(name: str, device: str, quick: bool) -> list[Case]:
    """The cases of benchmarks/<name>.py on ``device`` (quick or full shapes)."""
    return importlib.import_module(f"benchmarks.{name}").cases(device, quick)


def case_id(device: str, name: str, case: Case, mode: str) -> str:
    """The pytest-benchmark name of one case's mode: device:file:op:config:provider:mode."""
    return ":".join([device, name.removeprefix("bench_"), case.op, case.config.replace(" ", "_"),
                     case.provider, mode])


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cuda_synchronized_timer() -> float:
    """``time.perf_counter`` after ``torch.cuda.synchronize()``: pytest-benchmark's timer for the
    GPU cases, so that a round ends when the GPU has finished its work, not when the host has
    queued it (and starts with an idle GPU)."""
    torch.cuda.synchronize()
    return time.perf_counter()


def disable_tf32() -> None:
    """fp32 means fp32 in every benchmark (a provider that wants TF32 turns it on itself)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def git_revision() -> str:
    """The checkout's short commit (d2g_fast.bench.machine, the one source with d2g bench)."""
    from d2g_fast.bench import machine  # noqa: PLC0415 (the harness imports without the package)
    return machine.git_revision()


def device_name(device: str) -> str:
    """The GPU's or CPU's name (d2g_fast.bench.machine, the one source with d2g bench)."""
    from d2g_fast.bench import machine  # noqa: PLC0415
    return machine.device_name(device)


# CPU features that decide how fast bf16/fp32 convolutions and matmuls run (oneDNN picks AMX or
# AVX-512 BF16 kernels when the CPU has them): recorded with every result.
CPU_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "amx_fp16", "avx512_bf16", "avx512_fp16",
             "avx512_vnni", "avx512f", "avx2", "fma")


def cpu_flags() -> str:
    """The CPU_FLAGS this CPU has, torch's CPU capability (the vector ISA its kernels were
    dispatched to) and the bf16 hardware d2g_fast.cpu_features finds (the trainer's rule), e.g.
    "amx_bf16 ... avx2 fma (torch: AVX512; bf16 hardware: AMX-BF16)"."""
    from d2g_fast import cpu_features  # noqa: PLC0415 (the harness imports without the package)
    have = cpu_features.cpu_flags()
    flags = " ".join(f for f in CPU_FLAGS if f in have) or "none of " + ",".join(CPU_FLAGS)
    return (f"{flags} (torch: {cpu_features.torch_cpu_capability()}; bf16 hardware: "
            f"{cpu_features.bf16_hardware() or 'none'})")


def machine_tags(device: str) -> dict:
    """What every result records about where it was measured."""
    return {"device": device_name(device), "torch": torch.__version__, "git": git_revision(),
            "threads": torch.get_num_threads(), "cpu_flags": cpu_flags()}


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """The lines of a markdown table of ``rows`` (cells already formatted) under ``header``;
    ``align`` has one letter per column: "l" left, "r" right (numbers)."""
    return list(markdown_table_lines(header, rows, align))


def markdown_table_lines(header: list[str], rows: Iterable[list[str]],
                         align: str) -> Iterator[str]:
    """markdown_table's lines one at a time, each row's as soon as ``rows`` yields it: a
    benchmark that measures its rows one by one prints each when it is measured. ``align`` is
    checked before the first row is asked for."""
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r}: one of l/r per column of {header}")
    yield "| " + " | ".join(header) + " |"
    yield "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    for row in rows:
        yield "| " + " | ".join(row) + " |"


def time_callable(fn: Callable[[], object], device: str, *, min_time_s: float = 0.3,
                  min_reps: int = 5, max_reps: int = 200, warmup: int = 2) -> dict:
    """Median wall time of ``fn`` in milliseconds (CUDA events on a GPU), its spread, and the
    time of the first call ("first_ms": what a compiled provider pays to compile)."""
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup - 1):
        fn()
    synchronize(device)
    cuda = device.startswith("cuda")
    times = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start_all < min_time_s):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "reps": len(times),
        "first_ms": first_ms,
    }


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory of one call of ``fn`` above what was allocated when it started, in MiB:
    everything allocated through torch's allocator (tensors, kernel workspaces, what autograd
    saves for the backward), not the Python heap nor a kernel's own std::vector scratch.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch has no allocator statistics there,
    so the call runs under ``torch.profiler`` with ``profile_memory=True`` and the peak is the
    largest running sum of its allocation events (alloc +bytes, free -bytes) in time order.
    The profiler does not see frees of blocks allocated before it started, so a call that frees
    earlier tensors (``param.grad = None``) reads high by their size on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from d2g_fast.plan.measure import profiler_peak_bytes  # noqa: PLC0415

    return profiler_peak_bytes(fn) / 2**20


def copy_bandwidth_gbs(device: str) -> float:
    """Measured device copy bandwidth (bytes read + written per second): the practical floor
    against which memory-bound kernels are compared."""
    n = (256 if device.startswith("cuda") else 32) * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    r = time_callable(lambda: dst.copy_(src), device, min_time_s=0.2)
    return 2 * n * 4 / (r["median_ms"] * 1e-3) / 1e9


def matmul_tflops(device: str, dtype=torch.bfloat16) -> float:
    """Measured dense matrix throughput: the practical compute peak for conv-bound work."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    r = time_callable(lambda: a @ b, device, min_time_s=0.3)
    return 2 * n**3 / (r["median_ms"] * 1e-3) / 1e12
