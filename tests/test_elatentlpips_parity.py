"""Parity with the official ``elatentlpips`` package (skipped when it is not installed).

The official module is built offline with random weights (environment.md): its
``pnet_rand=True`` trunk has 3 input channels by mistake, so the layers of
``elatentlpips.vgg16.LatentVGG16BN(C).model.features[0:44]`` are copied into
``net.slice1..5``. BatchNorm statistics are randomised (so folding is exercised) and the heads
made non-negative (ours clamp negative heads at load); then the official state dict is loaded
into ours.

Tolerances. In float64 both implementations compute the same function: loss and input gradient
agree to 1e-12 (measured: 0 to 2.4e-15). In float32 the losses agree to 1e-5 (max relative) and
the input gradients to 1e-5 in relative L2 norm (measured: 4e-8 .. 9e-7). An elementwise max-relative gradient bound
is not used: float32 rounding in the unit normalisation of near-zero feature vectors makes
single elements of EITHER implementation differ from the float64 value by more (up to 1e-3 of
the largest element with some random trunks). So the float32 gradients are also compared with
the float64 official gradient: ours within 1e-4 and no worse than the official's own error.
"""
from __future__ import annotations

import copy
import functools
import warnings
from collections import OrderedDict

import pytest
import torch

from d2g_fast import ELatentLPIPS

pytestmark = pytest.mark.compare
elatentlpips = pytest.importorskip("elatentlpips")
from elatentlpips.ada_aug import AdaAugment  # noqa: E402
from elatentlpips.elatentlpips import ada_augpipe  # noqa: E402
from elatentlpips.vgg16 import LatentVGG16BN as OfficialLatentVGG16BN  # noqa: E402

from d2g_fast.nn import PairedAugment  # noqa: E402

SLICE_BOUNDS = (0, 7, 14, 24, 34, 44)


def build_official(encoder: str, seed: int = 0, augment=None, spatial=False):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = elatentlpips.ELatentLPIPS(pretrained=False, pnet_rand=True, encoder=encoder,
                                          augment=augment, spatial=spatial, verbose=False)
        channels = 16 if encoder in ("sd3", "flux") else 4
        features = OfficialLatentVGG16BN(channels).model.features
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in features:
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
        for lin in model.lins:
            lin.model[1].weight.abs_()
    for k in range(5):
        block = torch.nn.Sequential(OrderedDict(
            (str(i), features[i]) for i in range(SLICE_BOUNDS[k], SLICE_BOUNDS[k + 1])))
        setattr(model.net, f"slice{k + 1}", block)
    model.net.requires_grad_(False)
    return model.eval()


def build_ours(official, encoder, **kwargs):
    ours = ELatentLPIPS(pretrained=False, pnet_rand=True, encoder=encoder, verbose=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no negative heads to clamp
        ours.load_official_state_dict(official.state_dict())
    return ours


@pytest.fixture(scope="module")
def pair4():
    official = build_official("sd15")
    return official, build_ours(official, "sd15", augment=None)


@pytest.fixture(scope="module")
def pair16():
    official = build_official("sd3", seed=1)
    return official, build_ours(official, "sd3", augment=None)


def latents(c, n=2, h=11, w=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.randn(n, c, h, w, generator=g)


def loss_and_grad(model, x, y, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = model(x, y, ensembling=False, **kw)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def norm_rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = [
    ("4ch", {}),
    ("4ch", {"normalize": True}),
    ("4ch", {"add_l1_loss": False}),
    ("16ch", {"normalize": True, "add_l1_loss": False}),
    ("16ch", {}),
]


@pytest.mark.parametrize("which,kw", CASES)
def test_loss_and_input_gradient_match_official(which, kw, pair4, pair16):
    official, ours = pair4 if which == "4ch" else pair16
    x, y = latents(ours.latent_channels, seed=len(kw))
    off32, g_off32 = loss_and_grad(official, x, y, **kw)
    our32, g_our32 = loss_and_grad(ours, x, y, **kw)
    assert max_rel(our32, off32) < 1e-5, f"fp32 loss max rel err {max_rel(our32, off32):.3g}"

    official64, ours64 = copy.deepcopy(official).double(), copy.deepcopy(ours).double()
    off64, g_off64 = loss_and_grad(official64, x.double(), y.double(), **kw)
    our64, g_our64 = loss_and_grad(ours64, x.double(), y.double(), **kw)
    assert max_rel(our64, off64) < 1e-12, f"fp64 loss max rel err {max_rel(our64, off64):.3g}"
    assert max_rel(g_our64, g_off64) < 1e-12, f"fp64 grad max rel err {max_rel(g_our64, g_off64):.3g}"

    direct = norm_rel(g_our32, g_off32)
    assert direct < 1e-5, f"fp32 grad rel L2 err vs official fp32 {direct:.3g}"
    ours_err, official_err = norm_rel(g_our32, g_off64), norm_rel(g_off32, g_off64)
    assert ours_err < 1e-4, f"fp32 grad rel L2 err {ours_err:.3g} (official fp32: {official_err:.3g})"
    assert ours_err <= max(official_err, 1e-5), (ours_err, official_err)


@pytest.mark.parametrize("kw", [{}, {"retPerLayer": True, "add_l1_loss": False}])
def test_spatial_maps_match_official(kw, pair4):
    """Per-pixel maps agree to 1e-5 relative. Per-layer maps also get the absolute error the
    fused distance op documents (about 1e-7 * sum(w): it expands |A - B|^2 into three sums in
    float32), which matters only for the tiny values of the deep layers on random weights."""
    official, ours = pair4
    x, y = latents(4, n=1, h=13, w=9, seed=5)
    official.spatial = ours.spatial = True
    try:
        with torch.no_grad():
            a = official(x, y, ensembling=False, **kw)
            b = ours(x, y, ensembling=False, **kw)
    finally:
        official.spatial = ours.spatial = False
    if kw.get("retPerLayer"):
        for k, (la, lb) in enumerate(zip(a[1], b[1])):
            assert la.shape == lb.shape == (1, 1, 13, 9)
            atol = 1e-5 * la.abs().max().item() + 1e-7 * ours.lins[k].weight.sum().item()
            err = (lb - la).abs().max().item()
            assert err <= atol, f"layer {k}: max abs err {err:.3g} > {atol:.3g}"
        a, b = a[0], b[0]
    assert a.shape == b.shape == (1, 1, 13, 9)
    assert max_rel(b, a) < 1e-5, f"spatial map max rel err {max_rel(b, a):.3g}"


def test_baseline_without_heads_matches_official(pair4):
    official, _ = pair4
    ours = ELatentLPIPS(pretrained=False, pnet_rand=True, encoder="sd15", augment=None,
                        elatentlpips=False, verbose=False)
    ours.load_official_state_dict({k: v for k, v in official.state_dict().items() if k.startswith("net.")})
    x, y = latents(4, seed=6)
    official.elatentlpips = False  # the official forward reads the flag at call time
    try:
        with torch.no_grad():
            a, b = official(x, y, ensembling=False), ours(x, y, ensembling=False)
    finally:
        official.elatentlpips = True
    assert max_rel(b, a) < 1e-5, f"max rel err {max_rel(b, a):.3g}"


def test_state_dict_round_trips_official_ours_official(pair4):
    official, _ = pair4
    ours = ELatentLPIPS(pretrained=False, pnet_rand=True, encoder="sd15", augment=None, verbose=False)
    ours.load_state_dict(official.state_dict(), strict=True)  # the very same layout
    back = copy.deepcopy(official)
    with torch.no_grad():
        for t in back.state_dict().values():
            t.add_(1)  # different weights, same layout
    back.load_state_dict(ours.state_dict(), strict=True)
    ref = official.state_dict()
    got = back.state_dict()
    assert list(got) == list(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_official_state_dict_with_augmentation_buffers_loads(pair4):
    official = copy.deepcopy(pair4[0])
    official.augment = AdaAugment(**ada_augpipe["bg"])
    assert any(k.startswith("augment.") for k in official.state_dict())
    ours = ELatentLPIPS(pretrained=False, pnet_rand=True, encoder="sd15", augment="bg", verbose=False)
    ours.load_official_state_dict(official.state_dict())
    assert set(ours.official_state_dict()) == {k for k in official.state_dict() if not k.startswith("augment.")}


class _PinnedRand:
    """Replaces torch.rand while the official augmentation runs: its colour draws ignore
    debug_percentile, so every uniform draw is pinned to the percentile (as ours does)."""

    def __init__(self, value):
        self.value = value
        self.original = torch.rand

    def __enter__(self):
        def pinned(*size, **kwargs):
            return torch.full_like(self.original(*size, **kwargs), self.value)
        torch.rand = pinned

    def __exit__(self, *exc):
        torch.rand = self.original


@pytest.mark.parametrize("preset", ["b", "g", "c", "o", "co", "bg", "bgc", "bgco"])
def test_augmentation_presets_match_official_in_debug_percentile_mode(preset, pair4):
    pct = 0.3
    official, ours = pair4
    official_augment = AdaAugment(**ada_augpipe[preset]).requires_grad_(False)
    # The official forward calls self.augment(in0, in1): bind the percentile to that call.
    official_augment.forward = functools.partial(official_augment.forward, debug_percentile=pct)
    official.augment, ours.augment = official_augment, PairedAugment(preset)
    x, y = latents(4, n=2, h=16, w=16, seed=8)
    try:
        with torch.no_grad(), _PinnedRand(pct):
            a = official(x, y)
        with torch.no_grad():
            b = ours(x, y, debug_percentile=pct)
    finally:
        official.augment = ours.augment = None
    assert max_rel(b, a) < 1e-4, f"preset {preset!r}: max rel err {max_rel(b, a):.3g}"
