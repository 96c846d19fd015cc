"""The CUDA kernels of the LatentLPIPS distance (single layer and all layers in one launch,
csrc/lpips_distance/cuda/), run on the CPU through tools/cuda_emu: their block shapes (pixels x
channel groups, warp per pixel), shared-memory merges, warp shuffles, layer tables and launch
code, against the C++ CPU kernels (themselves tested against the reference), on machines
without a GPU. Builds small extensions first (about 30 s each on 2 cores)."""
import pytest
import torch
from d2g_helpers import emulated_ops

from d2g_fast import _ext

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _ext.ext_loaded(), reason="needs the compiled CPU kernel")]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return emulated_ops(tmp_path_factory, "lpips_distance/cuda/lpips_distance_kernel.cu",
                        "d2g_emu_lpips", ["lpips_distance/lpips_distance.cpp"])


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    return emulated_ops(tmp_path_factory, "lpips_distance/cuda/lpips_distance_multi_kernel.cu",
                        "d2g_emu_lpips_multi", ["lpips_distance/lpips_distance_multi.cpp"])


def _feature(n, c, h, w, layout, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.randn(n, c, h, 2 * w, generator=g, dtype=torch.float64).to(dtype)[..., ::2]
    return t


def _close(got, want, tol, what):
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert err < tol, f"{what}: emulated CUDA vs CPU kernel max rel err {err:.3g}"


SHAPES = [(2, 5, 7, 9), (1, 64, 6, 5), (2, 37, 3, 11), (1, 3, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("spatial", [False, True])
def test_emulated_single_layer(single, shape, layout, spatial):
    n, c, h, w = shape
    f0, f1 = _feature(n, c, h, w, layout, 1), _feature(n, c, h, w, layout, 2)
    weight = torch.rand(c, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dist, stats = single.lpips_distance(f0, f1, weight, spatial)
    want, want_stats = torch.ops.d2g_fast.lpips_distance(f0, f1, weight, spatial)
    _close(dist, want, 1e-12, "distance")
    _close(stats, want_stats, 1e-12, "stats")
    grad = torch.randn(dist.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g0, g1 = single.lpips_distance_backward(grad, f0, f1, weight, stats, spatial, True, True)
    w0, w1 = torch.ops.d2g_fast.lpips_distance_backward(grad, f0, f1, weight, want_stats, spatial, True, True)
    _close(g0, w0, 1e-12, "grad f0")
    _close(g1, w1, 1e-12, "grad f1")


@pytest.mark.parametrize("layouts", [("contiguous",) * 3, ("channels_last",) * 3,
                                     ("strided", "channels_last", "contiguous")], ids=str)
def test_emulated_multi_layer(multi, layouts):
    layers = [(2, 6, 9, 7), (2, 40, 5, 4), (2, 3, 2, 3)]
    f0 = [_feature(*s, lay, 10 + i) for i, (s, lay) in enumerate(zip(layers, layouts))]
    f1 = [_feature(*s, lay, 20 + i) for i, (s, lay) in enumerate(zip(layers, layouts))]
    ws = [torch.rand(s[1], generator=torch.Generator().manual_seed(30 + i), dtype=torch.float64)
          for i, s in enumerate(layers)]
    dist, stats = multi.lpips_distance_multi(f0, f1, ws)
    want, want_stats = torch.ops.d2g_fast.lpips_distance_multi(f0, f1, ws)
    _close(dist, want, 1e-12, "distances")
    _close(stats, want_stats, 1e-12, "stats")
    grad = torch.randn(dist.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g0, g1 = multi.lpips_distance_multi_backward(grad, f0, f1, ws, stats, True, True)
    w0, w1 = torch.ops.d2g_fast.lpips_distance_multi_backward(grad, f0, f1, ws, want_stats, True, True)
    for k in range(len(layers)):
        _close(g0[k], w0[k], 1e-12, f"grad f0[{k}]")
        _close(g1[k], w1[k], 1e-12, f"grad f1[{k}]")


def test_emulated_multi_layer_float32(multi):
    layers = [(3, 64, 8, 8), (3, 128, 4, 4)]
    f0 = [_feature(*s, "channels_last", 40 + i, torch.float32) for i, s in enumerate(layers)]
    f1 = [_feature(*s, "contiguous", 50 + i, torch.float32) for i, s in enumerate(layers)]
    ws = [torch.rand(s[1], generator=torch.Generator().manual_seed(60 + i)) for i, s in enumerate(layers)]
    dist, _ = multi.lpips_distance_multi(f0, f1, ws)
    want, _ = torch.ops.d2g_fast.lpips_distance_multi(f0, f1, ws)
    _close(dist, want, 1e-5, "float32 distances")
