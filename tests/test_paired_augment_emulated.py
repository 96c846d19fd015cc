"""The CUDA kernels of the paired augmentation (csrc/paired_augment/cuda/), run on the CPU through
tools/cuda_emu (one thread per CUDA thread, real barriers, atomics through std::atomic_ref):
their tiling, halo and shared-memory window logic, per-sample margins read from the parameter
tensor and host launch code, against the C++ CPU kernel (itself tested against the reference),
on machines without a GPU. Builds a small extension first (about 30 s on 2 cores)."""
import pytest
import torch
from d2g_helpers import emulated_ops

from d2g_fast import _ext
from d2g_fast.augment_params import AugmentParams
from test_paired_augment_kernels import _zoom_params

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _ext.ext_loaded(), reason="needs the compiled CPU kernel")]


@pytest.fixture(scope="module")
def augment_ops(tmp_path_factory):
    return emulated_ops(tmp_path_factory, "paired_augment/cuda/paired_augment_kernel.cu",
                        "d2g_emu_augment", ["paired_augment/paired_augment.cpp"])


def _pair(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))


def _max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _compare(ops, params, shape, dtype, seed, tol):
    x, y = _pair(shape, dtype, seed)
    packed, flags = params.packed("cpu", torch.float64), params.flags()
    ex, ey = ops.paired_augment(x, y, packed, flags)
    cx, cy = torch.ops.d2g_fast.paired_augment(x, y, packed, flags)
    for got, want, what in ((ex, cx, "x"), (ey, cy, "y")):
        err = _max_rel(got, want)
        assert err < tol, f"emulated CUDA forward {what} vs CPU kernel: max rel err {err:.3g}"
    gx, gy = _pair(shape, dtype, seed + 1)
    ebx, eby = ops.paired_augment_backward(gx, gy, packed, flags)
    cbx, cby = torch.ops.d2g_fast.paired_augment_backward(gx, gy, packed, flags)
    for got, want, what in ((ebx, cbx, "x"), (eby, cby, "y")):
        assert got.dtype == want.dtype
        err = _max_rel(got, want)
        assert err < tol, f"emulated CUDA backward {what} vs CPU kernel: max rel err {err:.3g}"


# every official preset, plus geometry with cutout only: colour + cutout + geometry in the backward
# is where the cut-out pixels' share of the colour mean was once dropped on the GPU
@pytest.mark.parametrize("preset", ["b", "g", "c", "o", "co", "bg", "bgc", "bgco", "go"])
def test_emulated_cuda_matches_cpu_kernel(augment_ops, preset):
    n, c, h, w = 2, 5, 37, 29  # odd sizes: partial tiles; C = 5: a partial channel chunk
    params = AugmentParams.sample(preset, n, h, w, num_channels=c,
                                  generator=torch.Generator().manual_seed(3))
    _compare(augment_ops, params, (n, c, h, w), torch.float64, 4, 1e-12)


def test_emulated_cuda_window_and_fallback(augment_ops):
    """Zoom-in, none, zoom-out within the shared window, and zoom-out beyond it (global atomics)."""
    n, c, h, w = 4, 3, 40, 36
    params = _zoom_params(n, h, w, [0.6, 1.0, 2.0, 3.5])
    _compare(augment_ops, params, (n, c, h, w), torch.float64, 5, 1e-12)


def test_emulated_cuda_float32_and_device_drawn_params(augment_ops):
    n, c, h, w = 3, 4, 20, 23
    params = AugmentParams.sample_on_device("bgco", n, h, w, num_channels=c, device="cpu", seed=11)
    _compare(augment_ops, params, (n, c, h, w), torch.float32, 6, 2e-6)


def test_emulated_cuda_half_precision(augment_ops):
    n, c, h, w = 2, 4, 18, 17
    params = AugmentParams.sample("bgco", n, h, w, num_channels=c,
                                  generator=torch.Generator().manual_seed(8))
    _compare(augment_ops, params, (n, c, h, w), torch.bfloat16, 9, 2e-2)


# The sampler's CUDA kernel with an explicit seed (the CUDA generator cannot be linked here: its
# host branch is replaced by a check, the Philox state type by a stub).
SAMPLER_REPLACEMENTS = [
    (r'#include <ATen/cuda/[^>]*>\n', ''),
    (r'if \(!seed\.has_value\(\)\) \{.*?philox_cuda_state\([^;]*;\s*\}',
     'TORCH_CHECK(seed.has_value(), "emulated sampler: seed= only");'),
]
SAMPLER_PRELUDE = """
#include <tuple>
namespace at { struct PhiloxCudaState {};
namespace cuda { namespace philox {
inline std::tuple<uint64_t, uint64_t> unpack(PhiloxCudaState) { return {0, 0}; } } } }
"""


@pytest.fixture(scope="module")
def emulated_sampler(tmp_path_factory):
    return emulated_ops(tmp_path_factory, "paired_augment/cuda/augment_params_sample_on_device_kernel.cu",
                        "d2g_emu_sampler", ["paired_augment/paired_augment.cpp"],
                        replacements=SAMPLER_REPLACEMENTS, prelude=SAMPLER_PRELUDE)


@pytest.mark.parametrize("preset_flags,n", [(1 | 2 | 4 | 8, 5), (1 | 2, 300), (2 | 8, 1)])
def test_emulated_cuda_sampler_matches_cpu_kernel(emulated_sampler, preset_flags, n):
    """One block looping over the samples (N = 300 > 256 threads), the warp-shuffle and shared
    reduction of the batch margins, the rows finished from them: equal to the CPU kernel for the
    same seed (draws bitwise; the float64 affine columns to rounding)."""
    c, h, w = 4, 29, 37
    got = torch.full((n, 17), float("nan"), dtype=torch.float64)
    want = torch.full((n, 17), float("nan"), dtype=torch.float64)
    emulated_sampler.augment_params_sample_on_device_(got, c, h, w, preset_flags, 0.8, None, 1234)
    torch.ops.d2g_fast.augment_params_sample_on_device_(want, c, h, w, preset_flags, 0.8, None, 1234)
    assert torch.isfinite(got).all(), "emulated sampler left unwritten (NaN) entries"
    assert torch.equal(got[:, 6:], want[:, 6:]), \
        f"colour/cutout/margin columns differ: {(got[:, 6:] - want[:, 6:]).abs().max():.3g}"
    err = ((got[:, :6] - want[:, :6]).abs().max() / want[:, :6].abs().max()).item()
    assert err < 1e-12, f"affine columns: max rel err {err:.3g}"
