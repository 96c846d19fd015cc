"""Every case of every benchmarks/bench_*.py as a pytest-benchmark item.

    pytest benchmarks/ --benchmark-only                          # quick shapes, CPU (+ GPU if any)
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json
    pytest benchmarks/ --benchmark-only --benchmark-autosave      # .benchmarks/, then:
    pytest benchmarks/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%
    pytest-benchmark compare 0001 0002 [--histogram=hist: pip install "pytest-benchmark[histogram]"]
    pytest benchmarks/ --benchmark-only --bench-full -k "elatentlpips and fast-bf16"

One item per case and mode, named device:file:op:config:provider:mode (benchmarks.harness
.case_id), grouped by device, op, config and mode so that pytest-benchmark's table compares the
providers of one configuration. The cases are the ones benchmarks/run.py times (the same
``cases(device, quick)`` functions). Each item makes its case (once for all its modes: the
items of one case run one after another), then ``benchmark.pedantic``: --bench-warmup-rounds
untimed calls, --benchmark-min-rounds timed rounds of one call each. CUDA items are timed with
benchmarks.harness.cuda_synchronized_timer. A case that cannot run here (SkipCase: a package,
backend or GPU missing) is skipped with its reason. extra_info holds the case's op, config,
provider, mode, device, note and, where the case states its work, GB/s and TFLOP/s at the
median.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch

from benchmarks.harness import Case, SkipCase, bench_names, case_id, cuda_synchronized_timer, load_cases


@dataclass
class Entry:
    device: str
    name: str                      # the bench_*.py module
    case: Case | None = None
    mode: str = ""
    error: Exception | None = None  # cases() itself failed


_ENTRIES: dict[str, Entry] = {}   # item parameter (its case_id) -> what it runs
_BUILT: dict = {}                 # the case last made: {"case", "fns", "error"}


def _devices(config) -> list[str]:
    choice = config.getoption("--bench-device")
    return ["cpu", "cuda"] if choice == "all" else [choice]


def _params(device: str, name: str, quick: bool) -> list:
    """pytest params of one bench file on one device: one per case and mode."""
    no_gpu = device.startswith("cuda") and not torch.cuda.is_available()
    skip = [pytest.mark.skip(reason="needs a CUDA GPU")] if no_gpu else []
    try:
        cases = load_cases(name, device, quick)
    except Exception as exc:  # an item that fails with the error, rather than a missing file
        key = f"{device}:{name.removeprefix('bench_')}:cases()"
        _ENTRIES[key] = Entry(device, name, error=exc)
        return [pytest.param(key, id=key, marks=skip)]
    params = []
    for case in cases:
        for mode in case.modes:
            key = case_id(device, name, case, mode)
            if key in _ENTRIES:
                raise ValueError(f"benchmarks/{name}.py: two cases named {key}")
            _ENTRIES[key] = Entry(device, name, case, mode)
            settings = {"group": f"{device} {case.op} {case.config} {mode}"}
            if device.startswith("cuda"):
                settings["timer"] = cuda_synchronized_timer
            params.append(pytest.param(key, id=key, marks=[pytest.mark.benchmark(**settings)] + skip))
    return params


def pytest_generate_tests(metafunc):
    if "bench_id" not in metafunc.fixturenames:
        return
    quick = not metafunc.config.getoption("--bench-full")
    params = [p for device in _devices(metafunc.config) for name in bench_names()
              for p in _params(device, name, quick)]
    metafunc.parametrize("bench_id", params)


def _release() -> None:
    cuda = _BUILT.get("case") is not None and torch.cuda.is_available()
    _BUILT.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


@pytest.fixture(scope="module", autouse=True)
def _release_last_case():
    yield
    _release()


def _functions(entry: Entry) -> dict:
    """The case's callables per mode, made once for all its modes (its items are adjacent)."""
    if _BUILT.get("case") is not entry.case:
        _release()
        _BUILT["case"] = entry.case
        try:
            _BUILT["fns"] = entry.case.build()
        except Exception as exc:  # noqa: BLE001 - kept for the case's other modes
            _BUILT["error"] = exc
    error = _BUILT.get("error")
    if isinstance(error, SkipCase):
        pytest.skip(str(error))
    if error is not None:
        raise error
    return _BUILT["fns"]


def _work(case: Case, mode: str) -> tuple[float | None, float | None]:
    """Bytes and FLOPs the case states for one call of ``mode`` (None where it states none)."""
    fwd, bwd = (case.bytes, case.flops), (case.bwd_bytes, case.bwd_flops)
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    return tuple(f + b if f and b else None for f, b in zip(fwd, bwd))


def test_case(benchmark, bench_id, request):
    entry = _ENTRIES[bench_id]
    if entry.error is not None:
        raise entry.error
    case, mode = entry.case, entry.mode
    fn = _functions(entry)[mode]
    warmup = request.config.getoption("--bench-warmup-rounds")
    benchmark.extra_info.update(file=f"benchmarks/{entry.name}.py", op=case.op, config=case.config,
                                provider=case.provider, mode=mode, device=entry.device, note=case.note,
                                warmup_rounds=warmup)
    benchmark.pedantic(fn, rounds=request.config.getoption("benchmark_min_rounds"), warmup_rounds=warmup,
                       iterations=1)
    if benchmark.enabled and benchmark.stats:
        seconds = benchmark.stats.stats.median
        nbytes, nflops = _work(case, mode)
        if nbytes:
            benchmark.extra_info["gb_s"] = nbytes / seconds / 1e9
        if nflops:
            benchmark.extra_info["tflop_s"] = nflops / seconds / 1e12
