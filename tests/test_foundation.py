"""The package plumbing: extension build, schemas, dispatch rule, fallbacks, build_info."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import d2g_fast
from d2g_fast import _dispatch, _ext
from d2g_fast.ops import lpips_distance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, cwd=REPO, timeout=300)


def test_extension_is_built_and_loaded():
    assert _ext.ext_loaded(), f"d2g_fast._C failed to load: {_ext.ext_error()}"


def test_schemas_registered():
    for name in ("lpips_distance", "lpips_distance_backward"):
        op = getattr(torch.ops.d2g_fast, name)
        assert op.default._schema.name == f"d2g_fast::{name}"
    for key in ("CPU",):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("d2g_fast::lpips_distance", key)


def test_cuda_kernels_compiled_when_toolkit_present():
    """CI machines have nvcc and a CUDA build of torch: the .cu files must have been compiled
    (D2G_NO_CUDA=1 opts out)."""
    if os.environ.get("D2G_NO_CUDA", "") not in ("", "0") or torch.version.cuda is None:
        pytest.skip("CUDA build disabled or CPU-only torch")
    import setup_probe  # noqa: F401  (tests/setup_probe.py: the same toolkit search as setup.py)
    if setup_probe.cuda_home() is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert _ext.cuda_kernels_compiled()
    assert _ext.cuda_archs()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("d2g_fast::lpips_distance", "CUDA")


def test_build_info_reports_everything(capsys):
    info = d2g_fast.build_info()
    printed = capsys.readouterr().out
    for key in ("cpu_extension", "cuda_extension", "cuda_archs", "triton", "triton_interpreted"):
        assert key in info and key in printed
    assert info["cpu_extension"] is True
    assert info["triton"]  # triton ships with torch on Linux


def test_dispatch_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert _dispatch.resolve_impl("op", "auto", cpu) == "cpu"
    assert _dispatch.resolve_impl("op", "ref", cpu) == "ref"
    monkeypatch.setenv("D2G_IMPL", "ref")
    assert _dispatch.resolve_impl("op", "auto", cpu) == "ref"
    assert _dispatch.resolve_impl("op", "cpu", cpu) == "cpu", "an explicit impl beats D2G_IMPL"
    monkeypatch.setenv("D2G_IMPL", "fastest")
    with pytest.raises(ValueError, match="D2G_IMPL"):
        _dispatch.resolve_impl("op", "auto", cpu)
    monkeypatch.delenv("D2G_IMPL")
    with pytest.raises(ValueError, match="impl must be one of"):
        _dispatch.resolve_impl("op", "fast", cpu)
    with pytest.raises(RuntimeError, match="impl='cuda' needs CUDA tensors"):
        _dispatch.resolve_impl("op", "cuda", cpu)


def _d2g_ops_run(fn) -> set[str]:
    """Names of the d2g_fast custom ops that ``fn()`` dispatched (recorded by the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("d2g_fast::")}


@pytest.mark.parametrize("env,expected", [("", {"d2g_fast::lpips_distance"}),
                                          ("cpu", {"d2g_fast::lpips_distance"}), ("ref", set())])
def test_env_selects_the_backend_that_runs(monkeypatch, env, expected):
    """D2G_IMPL decides which backend runs 'auto' calls: the C++ op is dispatched for "" (auto
    on the CPU) and "cpu", and no d2g_fast op at all for "ref"; every backend gives the same
    result."""
    f0, f1 = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    w = torch.rand(3)
    monkeypatch.setenv("D2G_IMPL", env)
    out = {}
    ran = _d2g_ops_run(lambda: out.setdefault("value", lpips_distance(f0, f1, w)))
    assert ran == expected, f"D2G_IMPL={env!r}: dispatched {sorted(ran)}, expected {sorted(expected)}"
    monkeypatch.delenv("D2G_IMPL")
    reference = lpips_distance(f0, f1, w, impl="ref")
    assert torch.allclose(out["value"], reference, rtol=1e-5, atol=1e-6)


def test_triton_requested_without_gpu_or_interpreter_fails_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="impl='triton' needs CUDA tensors"):
        _dispatch.resolve_impl("op", "triton", torch.device("cpu"))


def test_reference_fallback_with_extension_disabled():
    """With the extension disabled the ops still work (reference path) and the user is told why,
    once, loudly."""
    proc = _run_python("""
        import warnings, torch
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import d2g_fast
            from d2g_fast.ops import lpips_distance
            f0, f1, w = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.rand(3)
            a = lpips_distance(f0, f1, w)
            b = lpips_distance(f0, f1, w)
        from d2g_fast.ref.lpips_distance import lpips_distance as ref
        assert torch.equal(a, ref(f0, f1, w))
        msgs = [str(c.message) for c in caught if "d2g_fast._C" in str(c.message)]
        assert len(msgs) == 1, msgs
        assert "D2G_NO_EXT" in msgs[0], msgs[0]
        info = d2g_fast.build_info(print_it=False)
        assert info["cpu_extension"] is False and "D2G_NO_EXT" in info["extension_error"]
        try:
            lpips_distance(f0, f1, w, impl="cpu")
        except RuntimeError as e:
            assert "extension is not available" in str(e)
        else:
            raise AssertionError("impl='cpu' ran without the extension")
        print("OK")
    """, D2G_NO_EXT="1")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_import_does_not_touch_the_network():
    proc = _run_python("""
        import socket
        def refuse(*a, **k):
            raise AssertionError("network access at import")
        socket.socket.connect = refuse
        import d2g_fast, d2g_fast.ops
        print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_auto_on_a_device_without_fast_backend_warns_once(monkeypatch):
    """'auto' on a CUDA device with neither CUDA kernels nor Triton: the reference, said once."""
    monkeypatch.setitem(_ext._STATE, "cuda", False)
    monkeypatch.setattr(_dispatch, "triton_status", lambda: (False, "ImportError: no triton"))
    monkeypatch.setattr(_dispatch, "_WARNED_DEVICES", set())
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="no fast backend for 'op' on cuda.*built without CUDA kernels"):
        assert _dispatch.resolve_impl("op", "auto", cuda) == "ref"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.resolve_impl("op", "auto", cuda) == "ref"
