"""Paired latent augmentation kernels (C++ CPU, CUDA, Triton) against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from d2g_fast import _ext
from d2g_fast.augment_params import AugmentParams
from d2g_fast.ops.paired_augment import paired_augment

needs_ext = pytest.mark.skipif(not (_ext.ext_loaded() and hasattr(torch.ops.d2g_fast, "paired_augment")),
                               reason="compiled extension without paired_augment")
needs_triton_op = pytest.mark.skipif(not hasattr(torch.ops.d2g_fast, "paired_augment_triton"),
                                     reason="no Triton paired_augment kernel registered")

PRESETS = ("b", "g", "c", "o", "co", "bg", "bgc", "bgco")
# max abs error against the float64 reference, per dtype (inputs ~N(0, 1))
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check(actual, expected, tol, what):
    """Shapes equal and values within ``tol``; the dtypes may differ (``expected`` is usually
    the float64 reference): callers check ``actual``'s dtype themselves."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = _max_err(actual, expected)
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.1e}"


def _inputs(shape, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    out = []
    for _ in range(2):
        if layout == "noncontig":  # a strided view: every other column of a wider tensor
            t = torch.randn(n, c, h, 2 * w, generator=g)[..., ::2]
        else:
            t = torch.randn(shape, generator=g)
        t = t.to(device=device, dtype=dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out


def _reference(x, y, params):
    rx, ry = paired_augment(x.detach().cpu().double(), y.detach().cpu().double(), params, impl="ref")
    return rx, ry


def _compare_forward(impl, preset, shape, dtype, device, layout, seed=0):
    x, y = _inputs(shape, dtype, device, layout, seed)
    n, c, h, w = shape
    params = AugmentParams.sample(preset, n, h, w, num_channels=c,
                                  generator=torch.Generator().manual_seed(seed + 1))
    ax, ay = paired_augment(x, y, params, impl=impl)
    assert ax.dtype == dtype and ax.device == x.device
    rx, ry = _reference(x, y, params)
    what = f"{impl} {preset} {shape} {dtype} {layout}"
    _check(ax.cpu(), rx, TOL[dtype], "x_aug " + what)
    _check(ay.cpu(), ry, TOL[dtype], "y_aug " + what)


def _compare_backward(impl, preset, shape, dtype, device, seed=0, tol=1e-5):
    x, y = _inputs(shape, dtype, device, "contiguous", seed)
    n, c, h, w = shape
    params = AugmentParams.sample(preset, n, h, w, num_channels=c,
                                  generator=torch.Generator().manual_seed(seed + 1))
    x.requires_grad_(True)
    y.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed + 2)
    gx_out = torch.randn(shape, generator=gen)
    gy_out = torch.randn(shape, generator=gen)
    ax, ay = paired_augment(x, y, params, impl=impl)
    torch.autograd.backward([ax, ay], [gx_out.to(device, dtype), gy_out.to(device, dtype)])
    assert x.grad.dtype == y.grad.dtype == dtype, (x.grad.dtype, y.grad.dtype, dtype)
    xr = x.detach().cpu().double().requires_grad_(True)
    yr = y.detach().cpu().double().requires_grad_(True)
    rx, ry = paired_augment(xr, yr, params, impl="ref")
    torch.autograd.backward([rx, ry], [gx_out.double(), gy_out.double()])
    _check(x.grad.cpu(), xr.grad, tol, f"grad x {impl} {preset} {shape} {dtype}")
    _check(y.grad.cpu(), yr.grad, tol, f"grad y {impl} {preset} {shape} {dtype}")


# ------------------------------------------------------------------------------------- C++ CPU

@needs_ext
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_cpu_forward_matches_reference(preset, layout):
    _compare_forward("cpu", preset, (3, 5, 13, 11), torch.float32, "cpu", layout)


@needs_ext
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 16, 37, 29), (2, 1, 7, 9), (1, 3, 1, 5)])
def test_cpu_forward_shapes(shape):
    _compare_forward("cpu", "bgco", shape, torch.float32, "cpu", "contiguous", seed=4)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_cpu_forward_dtypes(dtype):
    _compare_forward("cpu", "bgco", (2, 4, 12, 10), dtype, "cpu", "contiguous")


@needs_ext
@pytest.mark.parametrize("preset", ["b", "g", "c", "o", "bgco"])
def test_cpu_backward_matches_reference(preset):
    _compare_backward("cpu", preset, (2, 4, 15, 12), torch.float32, "cpu")


@needs_ext
@pytest.mark.parametrize("preset", ["bg", "co", "bgco"])
def test_cpu_gradcheck_float64(preset):
    for seed in range(2):
        x, y = _inputs((2, 2, 6, 5), torch.float64, "cpu", "contiguous", seed)
        x.requires_grad_(True)
        y.requires_grad_(True)
        params = AugmentParams.sample(preset, 2, 6, 5, num_channels=2,
                                      generator=torch.Generator().manual_seed(seed))
        fn = lambda a, b: paired_augment(a, b, params, impl="cpu")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, y), fast_mode=seed == 1)
        if seed == 0:
            assert torch.autograd.gradgradcheck(fn, (x, y), fast_mode=True)


@needs_ext
def test_cpu_gradient_to_one_input_only():
    x, y = _inputs((2, 4, 10, 9), torch.float32, "cpu", "contiguous")
    params = AugmentParams.sample("bgco", 2, 10, 9, generator=torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    ax, _ = paired_augment(x, y, params, impl="cpu")
    ax.square().sum().backward()
    xr = x.detach().double().requires_grad_(True)
    rx, _ = paired_augment(xr, y.double(), params, impl="ref")
    rx.square().sum().backward()
    _check(x.grad, xr.grad, 1e-4, "grad x only")
    # and only y
    x2, y2 = _inputs((2, 4, 10, 9), torch.float32, "cpu", "contiguous", seed=5)
    y2.requires_grad_(True)
    paired_augment(x2, y2, params, impl="cpu")[1].sum().backward()
    yr = y2.detach().double().requires_grad_(True)
    paired_augment(x2.double(), yr, params, impl="ref")[1].sum().backward()
    _check(y2.grad, yr.grad, 1e-5, "grad y only")


@needs_ext
def test_cpu_same_seed_bitwise():
    x, y = _inputs((4, 4, 16, 16), torch.float32, "cpu", "contiguous")
    outs = [paired_augment(x, y, AugmentParams.sample("bgco", 4, 16, 16,
                                                      generator=torch.Generator().manual_seed(11)),
                           impl="cpu") for _ in range(2)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@needs_ext
def test_cpu_opcheck():
    """Schema, fake kernel and autograd registration agree with the real kernel."""
    x, y = _inputs((2, 3, 9, 8), torch.float32, "cpu", "contiguous")
    params = AugmentParams.sample("bgco", 2, 9, 8, num_channels=3, generator=torch.Generator().manual_seed(0))
    args = (x.requires_grad_(True), y.requires_grad_(True), params.packed("cpu", torch.float64),
            params.flags())
    torch.library.opcheck(torch.ops.d2g_fast.paired_augment.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_ext
def test_cpu_bad_arguments_name_them():
    x, y = _inputs((2, 3, 9, 8), torch.float32, "cpu", "contiguous")
    params = AugmentParams.sample("bg", 2, 9, 8, generator=torch.Generator().manual_seed(0))
    packed = params.packed("cpu", torch.float64)
    op = torch.ops.d2g_fast.paired_augment
    with pytest.raises(RuntimeError, match="'params'"):
        op(x, y, packed.float(), params.flags())
    with pytest.raises(RuntimeError, match="'params'"):
        op(x, y, packed[:, :13].contiguous(), params.flags())
    bad = packed.clone()
    bad[1, 15] = 100  # margin x1 beyond W - 1
    with pytest.raises(RuntimeError, match=r"'params'\[1, 15\] \(margin x1\)"):
        op(x, y, bad, params.flags())
    bad = packed.clone()
    bad[0, 13] = 0.5  # not a whole number of pixels
    with pytest.raises(RuntimeError, match=r"'params'\[0, 13\]"):
        op(x, y, bad, params.flags())
    with pytest.raises(RuntimeError, match="'x' and 'y'"):
        op(x, y[:, :2], packed, params.flags())
    with pytest.raises(RuntimeError, match="'flags'"):
        op(x, y, packed, 99)


# ------------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_cuda_forward_matches_reference(preset, layout):
    _compare_forward("cuda", preset, (3, 5, 37, 29), torch.float32, "cuda", layout)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("shape", [(16, 4, 64, 64), (2, 4, 128, 128), (1, 16, 37, 29), (2, 1, 7, 9),
                                   (1, 3, 1, 5), (2, 4, 16, 16), (2, 4, 17, 33)])
@pytest.mark.parametrize("preset", ["bg", "bgco", "co", "o"])
def test_cuda_forward_shapes(shape, preset):
    _compare_forward("cuda", preset, shape, torch.float32, "cuda", "contiguous", seed=4)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preset", ["bg", "bgco"])
def test_cuda_forward_dtypes(dtype, preset):
    _compare_forward("cuda", preset, (2, 4, 40, 36), dtype, "cuda", "contiguous")


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shape", [(2, 4, 37, 29), (4, 4, 64, 64), (1, 6, 5, 70)])
def test_cuda_backward_matches_reference(preset, shape):
    _compare_backward("cuda", preset, shape, torch.float32, "cuda", tol=2e-5)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backward_half(dtype):
    _compare_backward("cuda", "bgco", (2, 4, 24, 20), dtype, "cuda", tol=TOL[dtype] * 2)


@pytest.mark.cuda
@needs_ext
def test_cuda_gradcheck_float64():
    x, y = _inputs((2, 3, 8, 7), torch.float64, "cuda", "contiguous")
    x.requires_grad_(True)
    y.requires_grad_(True)
    params = AugmentParams.sample("bgco", 2, 8, 7, num_channels=3, generator=torch.Generator().manual_seed(0))
    fn = lambda a, b: paired_augment(a, b, params, impl="cuda")  # noqa: E731
    # atomics make the float64 backward order-dependent only at ~1e-16
    assert torch.autograd.gradcheck(fn, (x, y), nondet_tol=1e-12)
    assert torch.autograd.gradgradcheck(fn, (x, y), nondet_tol=1e-12, fast_mode=True)


@pytest.mark.cuda
@needs_ext
def test_cuda_matches_cpu_kernel_and_compiles():
    x, y = _inputs((4, 4, 64, 64), torch.float32, "cpu", "contiguous")
    params = AugmentParams.sample("bgco", 4, 64, 64, generator=torch.Generator().manual_seed(2))
    cx, cy = paired_augment(x, y, params, impl="cpu")
    gx, gy = paired_augment(x.cuda(), y.cuda(), params, impl="cuda")
    _check(gx.cpu(), cx, 1e-5, "cuda vs cpu x")
    _check(gy.cpu(), cy, 1e-5, "cuda vs cpu y")
    packed, flags = params.packed("cuda", torch.float64), params.flags()
    fn = torch.compile(lambda a, b: torch.ops.d2g_fast.paired_augment(a, b, packed, flags),
                       fullgraph=True)
    cx2, _ = fn(x.cuda(), y.cuda())
    _check(cx2.cpu(), cx, 1e-5, "compiled cuda vs cpu")


@pytest.mark.cuda
@needs_ext
def test_cuda_module_end_to_end():
    from d2g_fast.nn import PairedAugment
    x, y = _inputs((16, 4, 64, 64), torch.float32, "cuda", "contiguous")
    x.requires_grad_(True)
    mod = PairedAugment("bg")
    ax, ay = mod(x, y, generator=torch.Generator().manual_seed(0))
    (ax - ay).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- Triton

@pytest.mark.triton
@needs_triton_op
@pytest.mark.parametrize("preset,layout", [("bgco", "channels_last"), ("co", "noncontig")])
def test_triton_interpreted_matches_reference(preset, layout):
    """Tiny shapes: the interpreter runs every program in Python (~10 s for a geometric case)."""
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU test covers Triton on CUDA")
    _compare_forward("triton", preset, (2, 3, 7, 6), torch.float32, "cpu", layout)
    _compare_backward("triton", preset, (1, 2, 6, 5), torch.float32, "cpu")


@pytest.mark.triton
@needs_triton_op
def test_triton_interpreted_float64_computes_in_float64():
    """Float64 inputs accumulate in float64, as the C++ kernels do: the float64 tolerance of the
    reference comparison (1e-10) is four orders below what float32 arithmetic reaches."""
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU test covers Triton on CUDA")
    _compare_forward("triton", "bgco", (1, 2, 6, 5), torch.float64, "cpu", "contiguous")
    _compare_backward("triton", "bgco", (1, 2, 6, 5), torch.float64, "cpu", tol=TOL[torch.float64])


@pytest.mark.cuda
@pytest.mark.triton
@needs_triton_op
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_gpu_matches_reference(preset, layout):
    _compare_forward("triton", preset, (3, 5, 37, 29), torch.float32, "cuda", layout)
    _compare_backward("triton", preset, (2, 4, 37, 29), torch.float32, "cuda", tol=2e-5)


def _zoom_params(n, h, w, zooms, angle=0.6):
    """Geometric parameters with a chosen zoom per sample: g_inv = rotation * zoom (an output
    pixel reads an input area `zoom` times larger), so the footprint of a tile grows with it."""
    from d2g_fast.augment_params import compute_margins
    c, s = math.cos(angle), math.sin(angle)
    g_inv = torch.stack([torch.tensor([[z * c, -z * s, 0.3], [z * s, z * c, -0.7], [0.0, 0.0, 1.0]])
                         for z in zooms]).float()
    return AugmentParams(n, h, w, g_inv=g_inv, margins=compute_margins(g_inv, h, w))


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_backward_shared_window_and_fallback(dtype):
    """The CUDA backward accumulates each tile's footprint in a shared-memory window and falls
    back to global atomics where the footprint exceeds it (strong zoom-out): a batch mixing
    zoom-in, none and zoom-out (the 3.5x rotated footprint of a 16-pixel tile is ~85 pixels wide,
    beyond the 44-pixel window) must match the reference either way."""
    n, c, h, w = 4, 5, 53, 47
    params = _zoom_params(n, h, w, [0.6, 1.0, 2.0, 3.5])
    x, y = _inputs((n, c, h, w), dtype, "cuda", "contiguous", seed=5)
    x.requires_grad_(True)
    y.requires_grad_(True)
    gen = torch.Generator().manual_seed(6)
    gx_out, gy_out = torch.randn(n, c, h, w, generator=gen), torch.randn(n, c, h, w, generator=gen)
    ax, ay = paired_augment(x, y, params, impl="cuda")
    torch.autograd.backward([ax, ay], [gx_out.to("cuda", dtype), gy_out.to("cuda", dtype)])
    xr = x.detach().cpu().double().requires_grad_(True)
    yr = y.detach().cpu().double().requires_grad_(True)
    rx, ry = paired_augment(xr, yr, params, impl="ref")
    torch.autograd.backward([rx, ry], [gx_out.double(), gy_out.double()])
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    _check(ax.detach().cpu(), rx.detach(), tol, f"forward, zooms, {dtype}")
    _check(x.grad.cpu(), xr.grad, tol, f"grad x, zooms, {dtype}")
    _check(y.grad.cpu(), yr.grad, tol, f"grad y, zooms, {dtype}")


@needs_ext
def test_cpu_zoom_params_match_reference():
    """The same hand-made zooms through the CPU kernel (so the parameters themselves are sane)."""
    n, c, h, w = 4, 3, 21, 18
    params = _zoom_params(n, h, w, [0.6, 1.0, 2.0, 3.5])
    x, y = _inputs((n, c, h, w), torch.float64, "cpu", "contiguous", seed=5)
    ax, _ = paired_augment(x, y, params, impl="cpu")
    rx, _ = paired_augment(x, y, params, impl="ref")
    _check(ax, rx, 1e-10, "cpu forward, zooms")
    assert ax[3].abs().sum() > 0 and not torch.equal(ax[1], x[1])
