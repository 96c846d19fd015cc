"""Device-side drawing of the paired-augmentation parameters (op augment_params_sample_on_device_).

Oracle: the numpy Philox4x32-10 reference d2g_fast/ref/augment_params_sample_on_device.py (itself checked
against the Random123 known answers).  Distributions: against the host sampler
AugmentParams.sample (two-sample KS statistics and categorical frequencies over 20000 draws).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from d2g_fast import _ext
from d2g_fast.augment_params import (AugmentParams, compute_margins, device_sampler_available,
                                     g_inv_from_packed)
from d2g_fast.ops.paired_augment import paired_augment
from d2g_fast.ref import augment_params_sample_on_device as ref

needs_sampler = pytest.mark.skipif(not device_sampler_available(),
                                   reason="compiled extension without augment_params_sample_on_device_")

PRESETS = ("b", "g", "c", "o", "co", "bg", "bgc", "bgco", "go")


def _draw(preset, n, h, w, c=4, p=1.0, device="cpu", seed=None, generator=None):
    return AugmentParams.sample_on_device(preset, n, h, w, num_channels=c, p=p, device=device,
                                          seed=seed, generator=generator)


def _max_err(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _assert_matches_reference(got: np.ndarray, want: np.ndarray, what: str, affine_tol=1e-12):
    # Colour, cutout and margin columns are exact functions of the integers: bitwise equal.
    assert np.array_equal(got[:, 6:], want[:, 6:]), (
        f"{what}: columns 6..16 differ, max abs error {_max_err(got[:, 6:], want[:, 6:]):.3e}")
    err = _max_err(got[:, :6], want[:, :6])
    scale = max(1.0, float(np.abs(want[:, :6]).max()))
    assert err <= affine_tol * scale, f"{what}: affine max abs error {err:.3e} > {affine_tol * scale:.1e}"


# ---------------------------------------------------------------------------- the reference RNG

def test_reference_philox_known_answers():
    """Random123's known-answer vectors for philox4x32_10."""
    zero = ref.philox4x32_10(np.zeros(4, np.uint64), np.zeros(2, np.uint64))
    assert [int(v) for v in zero] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = ref.philox4x32_10(np.full(4, 0xFFFFFFFF, np.uint64), np.full(2, 0xFFFFFFFF, np.uint64))
    assert [int(v) for v in ones] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = ref.philox4x32_10(np.array([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], np.uint64),
                           np.array([0xA4093822, 0x299F31D0], np.uint64))
    assert [int(v) for v in pi] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_reference_stream_layout():
    """Sample n's numbers: blocks at counters (offset + b, n); offset skips whole blocks."""
    s = ref.philox_stream(seed=(7 << 32) | 3, samples=3, offset=5, blocks=2)
    block = ref.philox4x32_10(np.array([6, 0, 2, 0], np.uint64), np.array([3, 7], np.uint64))
    assert np.array_equal(s[2, 4:8], block)
    assert np.array_equal(ref.philox_stream(1, 2, offset=1, blocks=3)[:, :8],
                          ref.philox_stream(1, 2, offset=0, blocks=4)[:, 4:12])


# --------------------------------------------------------------------------- CPU kernel vs oracle

@needs_sampler
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("p", [1.0, 0.35])
def test_cpu_sampler_matches_reference(preset, p):
    for (n, c, h, w), seed in (((7, 4, 13, 11), 5), ((300, 1, 32, 24), 2**40 + 17), ((1, 3, 1, 6), 0)):
        got = _draw(preset, n, h, w, c, p, seed=seed).packed_params.numpy()
        want = ref.sample_packed(preset, n, h, w, c, p, seed=seed)
        _assert_matches_reference(got, want, f"{preset} p={p} {(n, c, h, w)} seed={seed}")


@needs_sampler
def test_one_channel_draws_no_saturation():
    one = _draw("c", 64, 8, 8, c=1, seed=3).packed_params
    assert torch.all(one[:, 8] == 1.0)
    many = _draw("c", 64, 8, 8, c=2, seed=3).packed_params
    assert torch.equal(one[:, 6:8], many[:, 6:8]) and not torch.all(many[:, 8] == 1.0)


@needs_sampler
def test_seed_generator_and_manual_seed_reproducibility():
    a = _draw("bgco", 9, 16, 16, seed=11).packed_params
    assert torch.equal(a, _draw("bgco", 9, 16, 16, seed=11).packed_params)
    assert not torch.equal(a[:, 6:13], _draw("bgco", 9, 16, 16, seed=12).packed_params[:, 6:13])
    # the default CPU generator: successive calls differ, torch.manual_seed reproduces them
    torch.manual_seed(123)
    first, second = (_draw("bgco", 9, 16, 16).packed_params for _ in range(2))
    assert not torch.equal(first[:, 6:13], second[:, 6:13])
    torch.manual_seed(123)
    assert torch.equal(first, _draw("bgco", 9, 16, 16).packed_params)
    assert torch.equal(second, _draw("bgco", 9, 16, 16).packed_params)
    # an explicit generator, independent of the default one
    g = torch.Generator().manual_seed(5)
    x = _draw("bgco", 9, 16, 16, generator=g).packed_params
    torch.manual_seed(0)
    assert torch.equal(x, _draw("bgco", 9, 16, 16, generator=torch.Generator().manual_seed(5)).packed_params)
    # samples of one call differ from each other (subsequence = sample index)
    assert len(set(x[:, 6].tolist())) == 9


# ----------------------------------------------------------------- same distributions as the host

def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b| (atoms allowed)."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _columns(params: AugmentParams, preset: str) -> dict[str, np.ndarray]:
    """Per-sample parameters, rounded to 1e-5 so that float32 rounding of exact values (the
    host's cos(pi/2) = -4e-8) lands on the same atom as the device's exact ones."""
    host = params.to_host()
    cols = {}
    if "b" in preset or "g" in preset:
        g = host.g_inv.numpy().astype(np.float64)
        for i in range(2):
            for j in range(3):
                cols[f"g_inv[{i},{j}]"] = g[:, i, j]
    if "c" in preset:
        cols.update(brightness=host.brightness.numpy(), contrast=host.contrast.numpy(),
                    saturation=host.saturation.numpy())
    if "o" in preset:
        cols.update(cutout_x=host.cutout_center[:, 0].numpy(), cutout_y=host.cutout_center[:, 1].numpy(),
                    cutout_size=host.cutout_size[:, 0].numpy())
    return {k: np.round(v.astype(np.float64), 5) + 0.0 for k, v in cols.items()}


def _blit_categories(params: AugmentParams) -> np.ndarray:
    """(N,) category 0..7 = 4 * x-flip + quarter turns, read off g_inv of preset 'b': its second
    row is (sin, cos) of the rotation and the x-flip negates the determinant."""
    g = params.to_host().g_inv.numpy().astype(np.float64)
    s, c = np.round(g[:, 1, 0]), np.round(g[:, 1, 1])
    quarter = np.select([(c == 1) & (s == 0), (c == 0) & (s == 1), (c == -1) & (s == 0), (c == 0) & (s == -1)],
                        [0, 1, 2, 3], -1)
    assert (quarter >= 0).all()
    flip = np.linalg.det(g[:, :2, :2]) < 0
    return 4 * flip + quarter


N_DIST = 20000
KS_LIMIT = 0.025  # ~2.5x the 1% critical value 1.63 * sqrt(2 / 20000) = 0.016


@needs_sampler
@pytest.mark.parametrize("preset,p", [("bgco", 1.0), ("bgco", 0.5), ("g", 0.2), ("bgc", 0.8)])
def test_distributions_match_host_sampler(preset, p):
    h, w = 32, 24
    device = _draw(preset, N_DIST, h, w, p=p, seed=2024)
    host = AugmentParams.sample(preset, N_DIST, h, w, p=p, generator=torch.Generator().manual_seed(2024))
    dev_cols, host_cols = _columns(device, preset), _columns(host, preset)
    worst = {k: _ks_statistic(dev_cols[k], host_cols[k]) for k in dev_cols}
    bad = {k: round(v, 4) for k, v in worst.items() if v > KS_LIMIT}
    assert not bad, f"{preset} p={p}: KS statistics above {KS_LIMIT}: {bad} (all: {worst})"
    if "o" in preset:  # the cutout fires with probability p
        for cols in (dev_cols, host_cols):
            assert abs((cols["cutout_size"] > 0).mean() - p) < 0.015


@needs_sampler
@pytest.mark.parametrize("p", [1.0, 0.5])
def test_blit_flip_and_rotation_frequencies(p):
    device = _blit_categories(_draw("b", N_DIST, 16, 16, p=p, seed=99))
    host = _blit_categories(AugmentParams.sample("b", N_DIST, 16, 16, p=p,
                                                 generator=torch.Generator().manual_seed(99)))
    # expected: flip with p / 2, quarter turn k != 0 with p / 4 each
    flip = np.array([1 - p / 2, p / 2])
    turn = np.array([1 - 3 * p / 4, p / 4, p / 4, p / 4])
    expected = (flip[:, None] * turn[None, :]).reshape(-1)
    f_dev = np.bincount(device, minlength=8) / N_DIST
    f_host = np.bincount(host, minlength=8) / N_DIST
    assert np.abs(f_dev - expected).max() < 0.012, f"device {f_dev} vs expected {expected}"
    assert np.abs(f_host - expected).max() < 0.012, f"host {f_host} vs expected {expected}"
    assert np.abs(f_dev - f_host).max() < 0.015, f"device {f_dev} vs host {f_host}"


# ------------------------------------------------------------------------- margins and round trip

@needs_sampler
@pytest.mark.parametrize("preset", ["b", "g", "bg", "bgco"])
def test_margins_are_compute_margins_of_the_drawn_matrices(preset):
    for seed, (n, h, w) in enumerate([(5, 13, 11), (16, 64, 64), (2, 7, 40), (40, 9, 9)]):
        packed = _draw(preset, n, h, w, seed=seed).packed_params.numpy()
        assert (packed[:, 13:17] == packed[0, 13:17]).all(), "margins differ between rows"
        g = g_inv_from_packed(packed, h, w)
        want = compute_margins(g, h, w, dtype=np.float64)
        assert tuple(int(v) for v in packed[0, 13:17]) == want, f"{preset} seed {seed} {(n, h, w)}"


@needs_sampler
def test_colour_or_cutout_only_has_no_geometry():
    packed = _draw("co", 6, 10, 12, seed=1).packed_params
    assert torch.all(packed[:, :6] == 0) and torch.all(packed[:, 13:] == 0)
    params = _draw("co", 6, 10, 12, seed=1)
    assert not params.has_geometry and params.has_colour and params.has_cutout and params.flags() == 6


@needs_sampler
def test_to_host_round_trip():
    params = _draw("bgco", 6, 19, 17, c=3, seed=8)
    assert params.device_drawn and not params.is_identity and params.flags() == 7
    host = params.to_host()
    assert not host.device_drawn and host.to_host() is host
    assert torch.equal(host.packed(), params.packed_params)  # the exact values are kept
    assert host.margins == tuple(int(v) for v in params.packed_params[0, 13:17])
    assert torch.allclose(host.brightness.double(), params.packed_params[:, 6], atol=1e-7)
    assert torch.allclose(host.cutout_size.double(), 2 * params.packed_params[:, 11:13], atol=1e-7)
    # host-drawn parameters survive packed() -> from_packed()
    drawn = AugmentParams.sample("bgco", 4, 19, 17, generator=torch.Generator().manual_seed(0))
    packed = drawn.packed()
    assert tuple(int(v) for v in packed[0, 13:17]) == drawn.margins
    back = AugmentParams.from_packed(packed, "bgco", 19, 17)
    assert back.margins == drawn.margins
    err = (back.g_inv - drawn.g_inv).abs().max().item()
    assert err < 1e-5, f"g_inv round trip max abs error {err:.3e}"
    assert torch.equal(back.cutout_center, drawn.cutout_center)


# ------------------------------------------------------------------- augmentation with the draws

@needs_sampler
@pytest.mark.parametrize("impl", ["cpu", "ref"])
@pytest.mark.parametrize("preset", ["bg", "bgco", "co"])
def test_augment_with_device_params_equals_reference(preset, impl):
    if impl == "cpu" and not hasattr(torch.ops.d2g_fast, "paired_augment"):
        pytest.skip("no compiled paired_augment")
    n, c, h, w = 5, 3, 17, 14
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64), torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    params = _draw(preset, n, h, w, c, p=0.7, seed=31)
    ax, ay = paired_augment(x, y, params, impl=impl)
    rx, ry = paired_augment(x, y, params.to_host(), impl="ref")
    for got, want, name in ((ax, rx, "x"), (ay, ry, "y")):
        err = (got - want).abs().max().item()
        assert err < 1e-10, f"{impl} {preset} {name}: max abs error {err:.3e}"
    assert (ax - x).abs().max().item() > 1e-2  # it did transform


@needs_sampler
def test_gradcheck_with_device_params():
    if not hasattr(torch.ops.d2g_fast, "paired_augment"):
        pytest.skip("no compiled paired_augment")
    params = _draw("bgco", 2, 6, 5, c=2, seed=4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: paired_augment(a, b, params, impl="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y), fast_mode=True)


@needs_sampler
def test_module_sampler_choice():
    from d2g_fast.nn import PairedAugment
    x = torch.randn(3, 4, 12, 12)
    y = torch.randn(3, 4, 12, 12)
    assert PairedAugment("bg").resolve_sampler(x) == "host"  # CPU keeps the official draws
    dev = PairedAugment("bgco", sampler="device")
    assert dev.resolve_sampler(x) == "device"
    torch.manual_seed(3)
    ax, ay = dev(x, y)
    torch.manual_seed(3)
    params = dev.sample_params(x)
    assert params.device_drawn
    rx, ry = paired_augment(x.double(), y.double(), params, impl="ref")
    err = max((ax.double() - rx).abs().max().item(), (ay.double() - ry).abs().max().item())
    assert err < 1e-5, f"module with device sampler vs reference: max abs error {err:.3e}"
    with pytest.raises(ValueError, match="debug_percentile"):
        dev(x, y, debug_percentile=0.5)
    with pytest.raises(ValueError, match="sampler must be one of"):
        PairedAugment("bg", sampler="gpu")
    if torch.cuda.is_available():
        xc = x.cuda()
        assert PairedAugment("bg").resolve_sampler(xc) == "device"
        assert PairedAugment("bg").resolve_sampler(xc, torch.Generator()) == "host"
        assert PairedAugment("bg").resolve_sampler(xc, debug_percentile=0.3) == "host"
        assert PairedAugment("bg", impl="ref").resolve_sampler(xc) == "host"


@needs_sampler
def test_torch_compile_through_the_sampler():
    """aot_eager traces the sampler's fake registration and the op (fullgraph: no break)."""
    from d2g_fast.nn import PairedAugment
    if not hasattr(torch.ops.d2g_fast, "paired_augment"):
        pytest.skip("no compiled paired_augment")
    mod = PairedAugment("bgco", impl="cpu", sampler="device")
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 4, 12, 12, generator=gen), torch.randn(3, 4, 12, 12, generator=gen)

    def loss(a, b):
        ax, ay = mod(a, b)
        return (ax - ay).square().mean()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    got = compiled(x, y)
    torch.manual_seed(0)
    want = loss(x, y)
    assert torch.equal(got, want), f"compiled {got.item()} vs eager {want.item()}"


@pytest.mark.triton
@needs_sampler
def test_triton_interpreted_with_device_params():
    """The Triton kernels read the margins from the packed rows (tiny shape: interpreter)."""
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU tests cover Triton on CUDA")
    if not hasattr(torch.ops.d2g_fast, "paired_augment_triton"):
        pytest.skip("no Triton paired_augment kernel registered")
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 2, 7, 6, generator=gen), torch.randn(2, 2, 7, 6, generator=gen)
    params = _draw("bgco", 2, 7, 6, c=2, seed=9)
    assert max(int(v) for v in params.packed_params[0, 13:17]) > 0
    ax, ay = paired_augment(x, y, params, impl="triton")
    rx, ry = paired_augment(x.double(), y.double(), params, impl="ref")
    err = max((ax.double() - rx).abs().max().item(), (ay.double() - ry).abs().max().item())
    assert err < 1e-5, f"triton with device-drawn params: max abs error {err:.3e}"


# ------------------------------------------------------------------------------------- bad input

@needs_sampler
def test_bad_input_names_the_argument():
    op = torch.ops.d2g_fast.augment_params_sample_on_device_
    good = torch.empty(4, 17, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="'out'"):
        op(torch.empty(4, 17), 4, 8, 8, 15, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="'out'"):
        op(torch.empty(4, 13, dtype=torch.float64), 4, 8, 8, 15, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="'H'"):
        op(good, 4, 0, 8, 15, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="'C'"):
        op(good, 0, 8, 8, 15, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="'preset_flags'"):
        op(good, 4, 8, 8, 16, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="'p'"):
        op(good, 4, 8, 8, 15, 1.5, None, 0)
    with pytest.raises(RuntimeError, match="'seed'"):
        op(good, 4, 8, 8, 15, 1.0, None, -1)
    with pytest.raises(ValueError, match="batch_size"):
        AugmentParams.sample_on_device("bg", 0, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="preset"):
        AugmentParams.sample_on_device("bx", 2, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="p must be"):
        AugmentParams.sample_on_device("bg", 2, 8, 8, p=-0.1, device="cpu")
    with pytest.raises(ValueError, match="seed"):
        AugmentParams.sample_on_device("bg", 2, 8, 8, device="cpu", seed=-3)
    with pytest.raises(ValueError, match="generator"):
        AugmentParams.sample_on_device("bg", 2, 8, 8, device="meta", generator=torch.Generator())


@needs_sampler
def test_sampler_opcheck():
    out = torch.empty(5, 17, dtype=torch.float64)
    torch.library.opcheck(torch.ops.d2g_fast.augment_params_sample_on_device_.default, (out, 4, 9, 8, 15, 0.5, None, 3),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------ CUDA

@pytest.mark.cuda
@needs_sampler
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("p", [1.0, 0.35])
def test_cuda_sampler_matches_cpu_for_seed(preset, p):
    for (n, c, h, w), seed in (((7, 4, 13, 11), 5), ((1000, 1, 64, 48), 2**40 + 17), ((1, 3, 1, 6), 0)):
        cpu = _draw(preset, n, h, w, c, p, seed=seed).packed_params.numpy()
        gpu = _draw(preset, n, h, w, c, p, device="cuda", seed=seed).packed_params.cpu().numpy()
        # nvcc contracts multiply-adds (FMA): the affine may differ in the last bits
        _assert_matches_reference(gpu, cpu, f"cuda vs cpu {preset} p={p} {(n, c, h, w)}")


@pytest.mark.cuda
@needs_sampler
def test_cuda_generator_offsets_and_manual_seed():
    torch.cuda.manual_seed(7)
    a, b = (_draw("bgco", 33, 16, 16, device="cuda").packed_params.cpu() for _ in range(2))
    assert not torch.equal(a[:, 6:13], b[:, 6:13])
    torch.cuda.manual_seed(7)
    assert torch.equal(a, _draw("bgco", 33, 16, 16, device="cuda").packed_params.cpu())
    g = torch.Generator(device="cuda").manual_seed(7)
    c = _draw("bgco", 33, 16, 16, device="cuda", generator=g).packed_params.cpu()
    assert torch.equal(c, a)  # same seed, same starting offset as the default generator above


def _cuda_pair(shape=(8, 4, 32, 32), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=gen).to("cuda", dtype), torch.randn(shape, generator=gen).to("cuda", dtype))


def _impls():
    out = ["cuda"]
    if hasattr(torch.ops.d2g_fast, "paired_augment_triton"):
        out.append("triton")
    return out


@pytest.mark.cuda
@needs_sampler
@pytest.mark.parametrize("impl", _impls())
def test_cuda_no_host_synchronisation(impl):
    from d2g_fast.nn import PairedAugment
    x, y = _cuda_pair()
    x.requires_grad_(True)
    mod = PairedAugment("bgco", impl=impl)
    ax, ay = mod(x, y)  # warm-up (Triton compiles, caches fill)
    (ax * ay).sum().backward()
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ax, ay = mod(x, y)
        (ax * ay).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


@pytest.mark.cuda
@needs_sampler
def test_cuda_graph_capture_draws_anew_each_replay():
    from d2g_fast.nn import PairedAugment
    n, c, h, w = 6, 4, 24, 20
    x, y = _cuda_pair((n, c, h, w))
    mod = PairedAugment("bgco", impl="cuda")

    def step():
        params = mod.sample_params(x)
        return (params.packed_params, *paired_augment(x, y, params, impl="cuda"))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        packed, ox, oy = step()
    results = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        results.append((packed.clone().cpu(), ox.clone().cpu(), oy.clone().cpu()))
    assert not torch.equal(results[0][0], results[1][0]), "two replays drew the same parameters"
    assert not torch.equal(results[0][1], results[1][1])
    for packed_cpu, gx, gy in results:
        params = AugmentParams.from_packed(packed_cpu, "bgco", h, w)
        rx, ry = paired_augment(x.cpu().double(), y.cpu().double(), params, impl="ref")
        err = max((gx.double() - rx).abs().max().item(), (gy.double() - ry).abs().max().item())
        assert err < 1e-5, f"replayed augmentation vs reference on its parameters: {err:.3e}"


@pytest.mark.cuda
@needs_sampler
@pytest.mark.parametrize("preset,max_launches", [("bg", 2), ("bgco", 3)])
def test_cuda_launch_count(preset, max_launches):
    """Forward with device-drawn parameters: sampler + geometry (+ colour/cutout) kernels.
    Fill kernels of the test suite's NaN poisoning (D2G_POISON=1) are not counted."""
    from torch.profiler import ProfilerActivity, profile

    from d2g_fast.nn import PairedAugment
    x, y = _cuda_pair((16, 4, 64, 64))
    mod = PairedAugment(preset, impl="cuda")
    with torch.no_grad():
        mod(x, y)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            mod(x, y)
            torch.cuda.synchronize()
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and "Fill" not in e.name
               and "memset" not in e.name.lower() and "memcpy" not in e.name.lower()]
    copies = [e.name for e in prof.events() if "memcpy" in e.name.lower()]
    print(f"{preset}: {len(kernels)} kernel launches: {kernels}")
    assert not copies, f"host<->device copies during the forward: {copies}"
    assert 1 <= len(kernels) <= max_launches, f"{len(kernels)} launches > {max_launches}: {kernels}"


@pytest.mark.cuda
@needs_sampler
def test_cuda_torch_compile_auto_sampler():
    """PairedAugment with the default sampler on CUDA traces in one graph (aot_eager: the
    registrations; inductor is exercised by the ELatentLPIPS GPU tests)."""
    from d2g_fast.nn import PairedAugment
    mod = PairedAugment("bgco", impl="cuda")
    x, y = _cuda_pair((4, 4, 16, 16))
    assert mod.resolve_sampler(x) == "device"
    fn = lambda a, b: mod(a, b)  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.cuda.manual_seed(5)
    got = compiled(x, y)
    torch.cuda.manual_seed(5)
    want = fn(x, y)
    err = max((got[0] - want[0]).abs().max().item(), (got[1] - want[1]).abs().max().item())
    assert err == 0.0, f"compiled vs eager with the same CUDA seed: max abs error {err:.3e}"
