"""Rules and constants that C++ and Python both need have one source each side, and agree:
the accumulation dtype (csrc/common/checks.h accumulation_type and
d2g_fast._dispatch.accumulation_dtype), the stats rows and the heads' channel limit (C++
headers, read in Python through d2g_fast._ext.constant), the backends (d2g_fast._dispatch.IMPLS)
and the version (d2g_fast/_version.py)."""
from __future__ import annotations

import importlib
import importlib.metadata

import pytest
import torch

import d2g_fast
from d2g_fast import _dispatch, _ext

needs_ext = pytest.mark.skipif(not _ext.ext_loaded(), reason="needs the compiled extension")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def test_accumulation_dtype_rule():
    assert _dispatch.accumulation_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert _dispatch.accumulation_dtype(dtype) == torch.float32


@needs_ext
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_compiled_ops_follow_the_python_accumulation_rule(dtype):
    acc = _dispatch.accumulation_dtype(dtype)
    f0, f1 = torch.randn(2, 3, 4, 4).to(dtype), torch.randn(2, 3, 4, 4).to(dtype)
    w = torch.rand(3)
    dist, stats = torch.ops.d2g_fast.lpips_distance(f0, f1, w, False)
    assert dist.dtype == stats.dtype == acc
    dist, stats = torch.ops.d2g_fast.lpips_distance_multi([f0], [f1], [w])
    assert dist.dtype == stats.dtype == acc
    loss, scores, head_stats = torch.ops.d2g_fast.multiscale_heads(
        [f0], [w], torch.zeros(1), torch.tensor([1.0, -1.0]), [1.0], 1e-5)
    assert loss.dtype == scores.dtype == head_stats[0].dtype == acc


@needs_ext
def test_stat_rows_come_from_the_kernels():
    f0, f1, w = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.rand(3)
    _, stats = torch.ops.d2g_fast.lpips_distance(f0, f1, w, False)
    assert stats.shape == (_ext.constant("lpips_distance_stat_rows"), 2, 4, 5)
    _, stats = torch.ops.d2g_fast.lpips_distance_multi([f0], [f1], [w])
    assert stats.shape == (_ext.constant("lpips_distance_stat_rows"), 2 * 4 * 5)
    _, _, head_stats = torch.ops.d2g_fast.multiscale_heads(
        [f0], [w], torch.zeros(1), torch.tensor([1.0, -1.0]), [1.0], 1e-5)
    assert head_stats[0].shape == (_ext.constant("multiscale_heads_stat_rows"), 2, 4, 5)


@needs_ext
def test_triton_heads_save_the_same_stats_rows():
    """The Triton heads keep their own copy of the row count (d2g_fast/triton is not built from
    the C++ headers): it must stay equal."""
    if not _dispatch.triton_status()[0]:
        pytest.skip("triton is not importable")
    from d2g_fast.triton import multiscale_heads as triton_heads

    assert triton_heads.STAT_ROWS == _ext.constant("multiscale_heads_stat_rows")


@needs_ext
def test_heads_channel_limit_comes_from_the_kernels():
    heads_module = importlib.import_module("d2g_fast.ops.multiscale_heads")

    limit = _ext.constant("multiscale_heads_max_channels")
    assert heads_module.max_channels_kernel() == limit
    f = torch.randn(2, limit, 1, 1)
    args = ([f], [torch.randn(limit) / 80], torch.zeros(1), torch.tensor([1.0, -1.0]), [1.0])
    heads_module.multiscale_heads(*args, impl="cpu")  # at the limit: allowed


def test_constant_without_the_extension_says_why(monkeypatch):
    monkeypatch.setitem(_ext._STATE, "loaded", False)
    monkeypatch.setitem(_ext._STATE, "error", "disabled for this test")
    with pytest.raises(RuntimeError, match="disabled for this test"):
        _ext.constant("multiscale_heads_stat_rows")


def test_impls_have_one_source():
    from d2g_fast.nn import elatentlpips

    assert elatentlpips.IMPLS is _dispatch.IMPLS  # imported, not copied


def test_installed_version_is_the_package_version():
    """setup.py reads d2g_fast/_version.py, which d2g_fast.__version__ imports."""
    try:
        installed = importlib.metadata.version("d2g_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("d2g_fast is not installed (only on sys.path)")
    assert installed == d2g_fast.__version__


@pytest.mark.parametrize("name", ["lpips_distance", "lpips_distance_multi", "multiscale_heads"])
def test_public_ops_take_impl_keyword_only_and_document_shapes(name):
    import inspect

    from d2g_fast import ops

    op = getattr(ops, name)
    impl = inspect.signature(op).parameters["impl"]
    assert impl.kind is inspect.Parameter.KEYWORD_ONLY and impl.default == "auto"
    doc = inspect.getdoc(op)
    assert "Args:" in doc and "Returns:" in doc and "Tensor[" in doc
