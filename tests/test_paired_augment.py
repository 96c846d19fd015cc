"""Paired latent augmentation: parameters, reference vs the official AdaAugment, kernels vs the
reference, gradients, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from d2g_fast import _ext
from d2g_fast.augment_params import AugmentParams, compute_margins
from d2g_fast.ops.paired_augment import paired_augment
from d2g_fast.ref import paired_augment as ref_module
from d2g_fast.ref.paired_augment import paired_augment as ref_paired_augment

PRESETS = ("b", "g", "c", "o", "co", "bg", "bgc", "bgco")


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_close(actual, expected, tol, what):
    err = _max_err(actual, expected)
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.1e}"


def _assert_close_official(actual, official, what):
    """1e-4, relative to the output's magnitude when it exceeds 1: colour presets scale values up
    to ~9, where the official float32 pipeline itself is 1.4e-4 away from a float64 evaluation
    of the same math (its sampling grid is computed in float32 at coordinates up to ~760)."""
    scale = max(1.0, official.abs().max().item())
    _assert_close(actual, official, 1e-4 * scale, what + f" (tolerance 1e-4 x {scale:.2f})")


def _pair(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))


# ---------------------------------------------------------------- parity with the official code

def _official(preset, x, y, percentile, seed=None, dtype=torch.float32):
    """The official AdaAugment on (x, y) with every probability at 1.  ``dtype`` is torch's
    default dtype while it runs: the pipeline builds its matrices, grids and draws in it, so
    float64 is the official pipeline run in float64."""
    ada = pytest.importorskip("elatentlpips.ada_aug")
    pipes = pytest.importorskip("elatentlpips.elatentlpips").ada_augpipe
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _run_official(ada.AdaAugment(**pipes[preset]), x, y, percentile, seed)
    finally:
        torch.set_default_dtype(default_dtype)


def _run_official(aug, x, y, percentile, seed):
    aug.p = torch.tensor(1.0)
    if seed is not None:
        torch.manual_seed(seed)
    if percentile is None or not _has_colour(aug):
        return aug(x, y, debug_percentile=percentile)
    # The official colour draws ignore debug_percentile: pin its torch.rand to the percentile.
    real_rand = torch.rand

    def pinned_rand(*args, **kwargs):
        return torch.full_like(real_rand(*args, **kwargs), percentile)

    torch.rand = pinned_rand
    try:
        return aug(x, y, debug_percentile=percentile)
    finally:
        torch.rand = real_rand


def _has_colour(aug) -> bool:
    return aug.brightness > 0 or aug.contrast > 0 or aug.saturation > 0


@pytest.mark.compare
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (2, 4, 128, 128), (2, 16, 37, 29)],
                         ids=["sd15", "sdxl", "odd"])
@pytest.mark.parametrize("percentile", [0.1, 0.55, 0.93])
def test_matches_official_debug_percentile(preset, shape, percentile):
    x, y = _pair(shape)
    ox, oy = _official(preset, x, y, percentile)
    n, c, h, w = shape
    params = AugmentParams.sample(preset, n, h, w, num_channels=c, debug_percentile=percentile)
    ax, ay = paired_augment(x, y, params)
    _assert_close_official(ax, ox, f"x, preset {preset}, {shape}, pct {percentile}")
    _assert_close_official(ay, oy, f"y, preset {preset}, {shape}, pct {percentile}")


@pytest.mark.compare
@pytest.mark.parametrize("preset", ["b", "g", "bgco"])
def test_reference_matches_official(preset):
    """The tests above run the default backend (the C++ kernel when built); this pins the
    pure-PyTorch reference itself to the official pipeline."""
    x, y = _pair((2, 4, 37, 29), seed=2)
    ox, oy = _official(preset, x, y, 0.3)
    params = AugmentParams.sample(preset, 2, 37, 29, num_channels=4, debug_percentile=0.3)
    ax, ay = paired_augment(x, y, params, impl="ref")
    _assert_close_official(ax, ox, f"ref x, preset {preset}")
    _assert_close_official(ay, oy, f"ref y, preset {preset}")


@pytest.mark.compare
@pytest.mark.parametrize("preset", ["bg", "bgco", "co"])
def test_matches_official_same_seed(preset):
    """Our draw order is the official one: the same global seed gives the same transform."""
    x, y = _pair((3, 4, 40, 24), seed=3)
    ox, oy = _official(preset, x, y, None, seed=1234)
    torch.manual_seed(1234)
    params = AugmentParams.sample(preset, 3, 40, 24, num_channels=4)
    ax, ay = paired_augment(x, y, params)
    _assert_close_official(ax, ox, f"x, preset {preset}")
    _assert_close_official(ay, oy, f"y, preset {preset}")


# Float64: the official pipeline run in float64 reproduced to 1e-9.  Its resampling filter is the
# one thing that stays float32 there (StyleGAN's setup_filter builds it in float32 and its
# upfirdn2d asserts float32), a 6e-8 relative rounding of the taps that moves outputs by ~5e-7.
# So the comparison runs our reference with the official's float32-rounded taps, and a second
# check pins the default backend (the C++ kernel when built) to our reference with the exact
# float64 taps; together they compare every other step (matrices, margins, grids, colour,
# cutout) in float64.
F64_OFFICIAL_TOL = 1e-9
F64_KERNEL_TOL = 1e-12


def _official_filter(monkeypatch):
    """Make the reference use the official pipeline's float32-rounded filter taps."""
    upfirdn2d = pytest.importorskip("elatentlpips.style_ops.upfirdn2d")
    from elatentlpips.ada_aug import wavelets
    taps = upfirdn2d.setup_filter(wavelets["sym6"])
    monkeypatch.setattr(ref_module, "resampling_filter",
                        lambda dtype=torch.float64, device="cpu": taps.to(dtype=dtype, device=device))


def _assert_float64_parity(x, y, params, official, monkeypatch, what):
    default_x, default_y = paired_augment(x, y, params)
    exact_x, exact_y = paired_augment(x, y, params, impl="ref")
    _assert_close(default_x, exact_x, F64_KERNEL_TOL, f"{what}: default backend vs reference, x")
    _assert_close(default_y, exact_y, F64_KERNEL_TOL, f"{what}: default backend vs reference, y")
    with monkeypatch.context() as m:
        _official_filter(m)
        ax, ay = paired_augment(x, y, params, impl="ref")
    _assert_close(ax, official[0], F64_OFFICIAL_TOL, f"{what}: reference vs official float64, x")
    _assert_close(ay, official[1], F64_OFFICIAL_TOL, f"{what}: reference vs official float64, y")


@pytest.mark.compare
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("percentile", [0.1, 0.93])
def test_float64_matches_official_float64_debug_percentile(preset, percentile, monkeypatch):
    shape = (2, 4, 37, 29)
    x, y = _pair(shape, torch.float64, seed=5)
    official = _official(preset, x, y, percentile, dtype=torch.float64)
    params = AugmentParams.sample(preset, 2, 37, 29, num_channels=4, debug_percentile=percentile,
                                  dtype=torch.float64)
    _assert_float64_parity(x, y, params, official, monkeypatch, f"preset {preset}, pct {percentile}")


@pytest.mark.compare
@pytest.mark.parametrize("preset", ["bg", "bgco", "co"])
def test_float64_module_matches_official_float64_same_seed(preset, monkeypatch):
    """PairedAugment draws float64 parameters for float64 latents, in the official order: the
    same seed gives the transform of the official pipeline run in float64."""
    from d2g_fast.nn import PairedAugment
    x, y = _pair((3, 4, 40, 24), torch.float64, seed=3)
    official = _official(preset, x, y, None, seed=1234, dtype=torch.float64)
    torch.manual_seed(1234)
    params = PairedAugment(preset).sample_params(x)
    drawn = [t for t in (params.g_inv, params.brightness, params.cutout_center) if t is not None]
    assert drawn and all(t.dtype == torch.float64 for t in drawn)
    _assert_float64_parity(x, y, params, official, monkeypatch, f"preset {preset}")


def test_sample_dtype_sets_the_precision_of_every_field():
    for dtype in (torch.float32, torch.float64):
        p = AugmentParams.sample("bgco", 3, 9, 7, dtype=dtype, generator=torch.Generator().manual_seed(2))
        for name in ("g_inv", "brightness", "contrast", "saturation", "cutout_center", "cutout_size"):
            assert getattr(p, name).dtype == dtype, (name, dtype)
    with pytest.raises(ValueError, match="dtype"):
        AugmentParams.sample("bg", 2, 8, 8, dtype=torch.float16)


# ------------------------------------------------------------------------ parameters and identity

def test_same_generator_seed_is_bitwise_reproducible():
    x, y = _pair((3, 4, 21, 18))
    outs = []
    for _ in range(2):
        params = AugmentParams.sample("bgco", 3, 21, 18, generator=torch.Generator().manual_seed(7))
        outs.append(paired_augment(x, y, params))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    other = AugmentParams.sample("bgco", 3, 21, 18, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(paired_augment(x, y, other)[0], outs[0][0])


@pytest.mark.parametrize("impl", ["auto", "ref"])
def test_identity_params_return_input_exactly(impl):
    x, y = _pair((2, 3, 11, 9))
    ax, ay = paired_augment(x, y, AugmentParams.identity(2, 11, 9), impl=impl)
    assert torch.equal(ax, x) and torch.equal(ay, y)


def test_identity_geometry_reconstructs_input():
    """Up- then down-sampling with the orthogonal sym6 filter at an identity matrix is the
    identity (perfect reconstruction): this pins the filter alignment and the grid offsets."""
    x, y = _pair((2, 3, 16, 13), torch.float64)
    params = AugmentParams.identity(2, 16, 13)
    params.g_inv = torch.eye(3).expand(2, 3, 3).contiguous()
    params.margins = compute_margins(params.g_inv, 16, 13)
    ax, _ = ref_paired_augment(x, y, params)
    _assert_close(ax, x, 1e-9, "identity geometry")


def test_debug_percentile_values():
    p = AugmentParams.sample("bgco", 2, 8, 8, debug_percentile=0.75)
    # flip (floor(1.5) = 1), rotate by 90 degrees * floor(3) ...: every sample identical
    assert torch.equal(p.g_inv[0], p.g_inv[1])
    assert torch.allclose(p.brightness, torch.full((2,), 0.25))
    assert torch.allclose(p.contrast, torch.full((2,), 1.25))
    assert torch.allclose(p.saturation, torch.full((2,), 1.5))
    assert torch.allclose(p.cutout_center, torch.full((2, 2), 0.75))


def test_module_uses_generator_and_preset():
    from d2g_fast.nn import PairedAugment
    x, y = _pair((2, 4, 16, 16))
    mod = PairedAugment("gb")
    assert mod.preset == "bg"
    a = mod(x, y, generator=torch.Generator().manual_seed(1))
    b = mod(x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert _max_err(a[0], x) > 1e-2  # it did transform


# ------------------------------------------------------------------------------------ bad input

def test_bad_input_raises_naming_argument():
    x, y = _pair((2, 4, 8, 8))
    params = AugmentParams.sample("bg", 2, 8, 8)
    with pytest.raises(ValueError, match="x and y"):
        paired_augment(x, y[:, :3], params)
    with pytest.raises(ValueError, match="params.*batch size"):
        paired_augment(x, y, AugmentParams.sample("bg", 3, 8, 8))
    with pytest.raises(ValueError, match="params.*8x8"):
        paired_augment(x, y, AugmentParams.sample("bg", 2, 9, 8))
    with pytest.raises(TypeError, match="x must be"):
        paired_augment(x.to(torch.int32), y.to(torch.int32), params)
    with pytest.raises(ValueError, match="y must be 4-D"):
        paired_augment(x, y[0], params)
    with pytest.raises(TypeError, match="params"):
        paired_augment(x, y, {"preset": "bg"})
    with pytest.raises(ValueError, match="preset.*unknown letters"):
        AugmentParams.sample("bgx", 2, 8, 8)
    with pytest.raises(ValueError, match="debug_percentile"):
        AugmentParams.sample("bg", 2, 8, 8, debug_percentile=1.5)
    with pytest.raises(ValueError, match="impl"):
        paired_augment(x, y, params, impl="fast")


@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_output_needs_grad_only_where_its_input_does(impl):
    """Each output depends on its own input only: with y not requiring grad (the target branch of
    a loss) y_aug must not require grad either, or the loss would backpropagate through the whole
    target branch for nothing; x's gradient is unchanged."""
    if impl == "cpu" and not _ext.ext_loaded():
        pytest.skip("needs the compiled CPU kernel")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 10, generator=g, requires_grad=True)
    y = torch.randn(2, 4, 12, 10, generator=g)
    params = AugmentParams.sample("bgco", 2, 12, 10, generator=torch.Generator().manual_seed(1))
    x_aug, y_aug = paired_augment(x, y, params, impl=impl)
    assert x_aug.requires_grad and not y_aug.requires_grad
    (x_aug * y_aug).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = y.clone().requires_grad_(True)
    x2_aug, y2_aug = paired_augment(x2, y2, params, impl=impl)
    assert x2_aug.requires_grad and y2_aug.requires_grad
    (x2_aug * y2_aug).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert y2.grad is not None and y2.grad.abs().sum() > 0
    x_aug, y_aug = paired_augment(x.detach(), y2, params, impl=impl)
    assert not x_aug.requires_grad and y_aug.requires_grad
