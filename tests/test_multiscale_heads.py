"""Fused multi-scale discriminator heads: every backend against the reference, gradients,
double backward (R1), bad input."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from d2g_asserts import assert_close
from d2g_fast import _ext
from d2g_fast.ops import multiscale_heads
from d2g_fast.ref.multiscale_heads import multiscale_heads as heads_ref

# The package exports the function under the module's name: fetch the module itself.
msh_mod = importlib.import_module("d2g_fast.ops.multiscale_heads")

needs_ext = pytest.mark.skipif(not _ext.ext_loaded(), reason=f"no extension: {_ext.ext_error()}")

# Odd sizes, a 1x1 map, one channel count above the CPU tile, channels not a power of two.
SHAPES = [(5, 7, 9), (16, 4, 4), (33, 1, 3), (3, 1, 1), (70, 9, 8)]
HEAD_WEIGHTS = [0.5, 1.0, 0.25, 2.0, 0.75]


def make_inputs(n=3, shapes=SHAPES, dtype=torch.float32, device="cpu", layout="contiguous",
                offset=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for c, h, w in shapes:
        # A per-channel offset and scale: the LayerNorm sees non-zero means (cancellation test).
        f = torch.randn(n, c, h, w, generator=g) * (1 + torch.rand(1, c, 1, 1, generator=g)) + offset
        if layout == "channels_last":
            f = f.to(memory_format=torch.channels_last)
        if layout == "noncontiguous":
            # Every other column of a wider map: a strided view (the view is taken last, after
            # the offset and the move, which would otherwise make it contiguous again).
            wide = torch.randn(n, c, h, 2 * w, generator=g) + offset
            f = wide.to(device=device, dtype=dtype)[..., ::2]
            assert not f.is_contiguous()
        else:
            f = f.to(device=device, dtype=dtype)
        feats.append(f)
    ws = [(torch.randn(c, generator=g) / c ** 0.5).to(device=device, dtype=torch.float32
                                                     if dtype != torch.float64 else dtype)
          for c, _, _ in shapes]
    bias = (0.3 * torch.randn(len(shapes), generator=g)).to(device=device, dtype=ws[0].dtype)
    target = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0][:n] + [1.0] * max(0, n - 5)).to(device)
    return feats, ws, bias, target, HEAD_WEIGHTS[:len(shapes)]


def test_reference_matches_the_formula_written_out():
    feats, ws, bias, target, hw = make_inputs(n=2, shapes=[(6, 3, 2), (4, 2, 5)])
    loss, scores = heads_ref(feats, ws, bias, target, hw)
    expect_loss = 0.0
    expect_scores = torch.zeros(2, 2)
    for k, (f, w) in enumerate(zip(feats, ws)):
        mu = f.mean(1, keepdim=True)
        var = ((f - mu) ** 2).mean(1, keepdim=True)
        a = F.silu((f - mu) / torch.sqrt(var + 1e-5))
        logit = (a * w.view(1, -1, 1, 1)).sum(1) + bias[k]
        expect_loss = expect_loss + hw[k] * torch.log1p(torch.exp(-target.view(-1, 1, 1) * logit)).mean()
        expect_scores[k] = logit.mean(dim=(1, 2))
    assert_close(loss, expect_loss, atol=1e-6, name="ref loss")
    assert_close(scores, expect_scores, atol=1e-6, name="ref scores")


def _check_against_reference(impl, dtype, layout, device="cpu", atol=1e-5, grad_atol=1e-5):
    feats, ws, bias, target, hw = make_inputs(dtype=dtype, device=device, layout=layout)
    leaves = feats + ws + [bias]
    for t in leaves:
        t.requires_grad_(True)
    loss, scores = multiscale_heads(feats, ws, bias, target, hw, impl=impl)
    ref_in = [f.detach().double().requires_grad_(True) for f in feats]
    ref_w = [w.detach().double().requires_grad_(True) for w in ws]
    ref_b = bias.detach().double().requires_grad_(True)
    rloss, rscores = heads_ref(ref_in, ref_w, ref_b, target.double(), hw)
    assert_close(loss, rloss, atol=atol, name=f"{impl} loss")
    assert_close(scores, rscores, atol=atol, name=f"{impl} scores")
    g_loss = torch.tensor(0.8, device=device)
    g_scores = torch.randn(scores.shape, generator=torch.Generator().manual_seed(3)).to(device)
    grads = torch.autograd.grad((loss, scores), leaves, (g_loss, g_scores))
    rgrads = torch.autograd.grad((rloss, rscores), ref_in + ref_w + [ref_b],
                                 (g_loss.double(), g_scores.double()))
    names = [f"grad features[{i}]" for i in range(len(feats))] + \
            [f"grad weights[{i}]" for i in range(len(ws))] + ["grad bias"]
    for g, r, name in zip(grads, rgrads, names):
        assert g.dtype == (feats[0].dtype if "features" in name else ws[0].dtype), name
        assert_close(g, r, atol=grad_atol, rtol=grad_atol, name=f"{impl} {name}")


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_cpu_matches_reference_fp32(layout):
    _check_against_reference("cpu", torch.float32, layout)


@needs_ext
def test_cpu_matches_reference_fp64():
    _check_against_reference("cpu", torch.float64, "contiguous", atol=1e-12, grad_atol=1e-12)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_features(dtype):
    # Features in bf16/fp16 are read as they are and accumulated in float32: the result must
    # equal the reference on the same (rounded) features to float32 accuracy.
    _check_against_reference("cpu", dtype, "contiguous", atol=1e-5, grad_atol=2e-2)


@needs_ext
def test_cpu_gradcheck_float64():
    feats, ws, bias, target, hw = make_inputs(n=2, shapes=[(5, 3, 2), (3, 2, 3)], dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in feats + ws + [bias]]

    def fn(*xs):
        return multiscale_heads(list(xs[:2]), list(xs[2:4]), xs[4], target, hw[:2], impl="cpu")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@needs_ext
def test_cpu_gradgradcheck_float64_uses_reference_double_backward():
    feats, ws, bias, target, hw = make_inputs(n=2, shapes=[(4, 2, 3), (3, 2, 2)], dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in feats + ws + [bias]]

    def fn(*xs):
        return multiscale_heads(list(xs[:2]), list(xs[2:4]), xs[4], target, hw[:2], impl="cpu")

    assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@needs_ext
def test_backward_switches_to_reference_only_when_a_graph_is_built(monkeypatch):
    calls = []
    real = msh_mod._reference_backward

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(msh_mod, "_reference_backward", spy)
    feats, ws, bias, target, hw = make_inputs(n=2, shapes=[(5, 3, 4)])
    x = feats[0].requires_grad_(True)
    loss, scores = multiscale_heads([x], ws, bias, target, hw, impl="cpu")
    torch.autograd.grad(loss, x)
    assert calls == [], "a plain backward must use the fused kernel"
    # R1-style: gradient of the scores with a graph, then its squared norm differentiated.
    loss, scores = multiscale_heads([x], ws, bias, target, hw, impl="cpu")
    (g,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    assert calls == [1]
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    # Same second derivative as the reference all the way.
    xr = x.detach().double().requires_grad_(True)
    _, rscores = heads_ref([xr], [ws[0].double()], bias.double(), target.double(), hw)
    (gr,) = torch.autograd.grad(rscores.sum(), xr, create_graph=True)
    (ggr,) = torch.autograd.grad(gr.square().sum(), xr)
    assert_close(g, gr, atol=1e-5, name="first derivative")
    assert_close(gg, ggr, atol=1e-4, rtol=1e-4, name="second derivative")


@needs_ext
def test_double_backward_with_features_that_depend_on_each_other():
    # In the discriminator a skip tap is cat([before tap, encoder skip]): the gradient of each
    # head must count only its own path (a bug here doubled R1 gradients once).
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    bias = torch.randn(2, generator=g, dtype=torch.float64)
    target = torch.tensor([1.0, -1.0], dtype=torch.float64)
    results = []
    for impl in ("cpu", "ref"):
        a = torch.tanh(x) * 2
        b = torch.cat([a, x.square() + 1], dim=1)[:, 1:]  # depends on a; non-contiguous
        loss, scores = multiscale_heads([a, b], ws, bias, target, [0.5, 1.5], impl=impl)
        (gx,) = torch.autograd.grad(loss + scores.sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), x)
        results.append((gx.detach(), ggx))
    assert_close(results[0][0], results[1][0], atol=1e-12, name="first derivative")
    assert_close(results[0][1], results[1][1], atol=1e-10, name="second derivative")


@needs_ext
def test_opcheck_registrations():
    feats, ws, bias, target, hw = make_inputs(n=2, shapes=[(5, 3, 2), (3, 2, 3)])
    for t in feats + ws + [bias]:
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.d2g_fast.multiscale_heads.default,
                          (feats, ws, bias, target, hw[:2], 1e-5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_ext
def test_cpu_under_torch_compile():
    feats, ws, bias, target, hw = make_inputs(n=2, shapes=[(5, 3, 2), (3, 2, 3)])

    def fn(f0, f1):
        loss, scores = multiscale_heads([f0, f1], ws, bias, target, hw[:2], impl="cpu")
        return loss + scores.sum()

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*feats)
    assert_close(out, fn(*feats), atol=1e-6, name="compiled")


@needs_ext
def test_cpu_is_deterministic():
    feats, ws, bias, target, hw = make_inputs()
    a = multiscale_heads(feats, ws, bias, target, hw, impl="cpu")
    b = multiscale_heads(feats, ws, bias, target, hw, impl="cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("impl", ["ref"] + (["cpu"] if _ext.ext_loaded() else []))
def test_bad_input_raises_naming_the_argument(impl):
    feats, ws, bias, target, hw = make_inputs(n=3, shapes=[(5, 3, 2), (3, 2, 3)])
    hw = hw[:2]
    cases = [
        (dict(features=feats[0]), "features"),
        (dict(features=[]), "features"),
        (dict(weights=ws[:1]), "weights"),
        (dict(head_weights=[1.0]), "head_weights"),
        (dict(weights=[ws[0], torch.randn(4)]), "weights[1]"),
        (dict(features=[feats[0], feats[1][:2]]), "features[1]"),
        (dict(features=[feats[0], feats[1][0]]), "features[1]"),
        (dict(features=[feats[0], feats[1].long()]), "features[1]"),
        (dict(features=[feats[0], feats[1].double()]), "features[1]"),
        (dict(bias=torch.zeros(3)), "bias"),
        (dict(target=torch.ones(3, 1)), "target"),
        (dict(target=torch.ones(3, dtype=torch.long)), "target"),
        (dict(eps=0.0), "eps"),
    ]
    base = dict(features=feats, weights=ws, bias=bias, target=target, head_weights=hw)
    for change, name in cases:
        args = {**base, **change}
        with pytest.raises((ValueError, TypeError), match=name.replace("[", r"\[").replace("]", r"\]")):
            multiscale_heads(args["features"], args["weights"], args["bias"], args["target"],
                             args["head_weights"], args.get("eps", 1e-5), impl=impl)


@needs_ext
def test_cpp_boundary_checks_name_the_argument():
    """Direct torch.ops calls skip the Python checks: the C++ ones that memory safety needs
    still hold and name the argument."""
    feats, ws, bias, target, hw = make_inputs(n=3, shapes=[(5, 3, 2), (3, 2, 3)])
    op = torch.ops.d2g_fast.multiscale_heads
    with pytest.raises(RuntimeError, match="invalid argument 'weights'"):
        op(feats, ws[:1], bias, target, hw[:2], 1e-5)
    with pytest.raises(RuntimeError, match="invalid argument 'bias'"):
        op(feats, ws, torch.zeros(5), target, hw[:2], 1e-5)
    with pytest.raises(RuntimeError, match=r"invalid argument 'features\[0\]'"):
        op(feats, ws, bias, target[:2], hw[:2], 1e-5)
    loss, scores, stats = op(feats, ws, bias, target, hw[:2], 1e-5)
    with pytest.raises(RuntimeError, match="invalid argument 'stats'"):
        torch.ops.d2g_fast.multiscale_heads_backward(loss.new_ones(()), torch.ones_like(scores), feats,
                                                     ws, target, hw[:2], 1e-5, stats[:1])
    with pytest.raises(RuntimeError, match="invalid argument 'grad_scores'"):
        torch.ops.d2g_fast.multiscale_heads_backward(loss.new_ones(()), torch.ones(3), feats, ws,
                                                     target, hw[:2], 1e-5, stats)


@needs_ext
def test_traced_direct_call_runs_the_python_checks():
    """The fake kernel applies the op's own checks (eps is not a C++ memory check)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    feats, ws, bias, target, hw = make_inputs(n=3, shapes=[(5, 3, 2), (3, 2, 3)])
    with FakeTensorMode() as mode:
        args = [[mode.from_tensor(t) for t in feats], [mode.from_tensor(t) for t in ws],
                mode.from_tensor(bias), mode.from_tensor(target)]
        with pytest.raises(ValueError, match="'eps' must be positive"):
            torch.ops.d2g_fast.multiscale_heads(*args, hw[:2], 0.0)


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_triton_matches_reference_fp32(layout):
    # On a machine without a GPU this runs under the Triton interpreter (conftest).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_against_reference("triton", torch.float32, layout, device=device)


@pytest.mark.triton
def test_triton_gradcheck_float64():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    feats, ws, bias, target, hw = make_inputs(n=2, shapes=[(5, 3, 2), (3, 2, 3)], dtype=torch.float64,
                                              device=device)
    leaves = [t.requires_grad_(True) for t in feats + ws + [bias]]

    def fn(*xs):
        return multiscale_heads(list(xs[:2]), list(xs[2:4]), xs[4], target, hw[:2], impl="triton")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_cuda_matches_reference_fp32(layout):
    _check_against_reference("cuda", torch.float32, layout, device="cuda")


@pytest.mark.cuda
def test_cuda_matches_reference_fp64():
    _check_against_reference("cuda", torch.float64, "contiguous", device="cuda", atol=1e-12,
                             grad_atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_features(dtype):
    _check_against_reference("cuda", dtype, "contiguous", device="cuda", atol=1e-5, grad_atol=2e-2)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_triton_on_gpu_other_dtypes(dtype):
    atol, gatol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 2e-2)
    _check_against_reference("triton", dtype, "contiguous", device="cuda", atol=atol, grad_atol=gatol)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_large_heads_sd15_like(impl):
    # Many pixels and channels: several blocks per sample, partial-sum buffers of many warps.
    shapes = [(1280, 8, 8), (2560, 8, 8), (640, 32, 32), (960, 64, 64), (4, 64, 64)]
    feats, ws, bias, target, hw = make_inputs(n=2, shapes=shapes, device="cuda")
    for t in feats + ws + [bias]:
        t.requires_grad_(True)
    loss, scores = multiscale_heads(feats, ws, bias, target, hw, impl=impl)
    rloss, rscores = heads_ref(feats, ws, bias, target, hw)
    assert_close(loss, rloss, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(scores, rscores, atol=1e-5, rtol=1e-5, name="scores")
    g = torch.autograd.grad(loss + scores.sum(), feats + ws + [bias])
    r = torch.autograd.grad(rloss + rscores.sum(), feats + ws + [bias])
    for i, (a, b) in enumerate(zip(g, r)):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=f"grad {i}")


@pytest.mark.cuda
def test_cuda_gradcheck_and_gradgradcheck_float64():
    feats, ws, bias, target, hw = make_inputs(n=2, shapes=[(4, 2, 3), (3, 2, 2)], dtype=torch.float64,
                                              device="cuda")
    leaves = [t.requires_grad_(True) for t in feats + ws + [bias]]

    def fn(*xs):
        return multiscale_heads(list(xs[:2]), list(xs[2:4]), xs[4], target, hw[:2], impl="cuda")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@needs_ext
def test_more_channels_than_the_kernels_support_fall_back_or_raise():
    f = torch.randn(2, 7001, 1, 2)
    w = torch.randn(7001) / 80
    args = ([f], [w], torch.zeros(1), torch.tensor([1.0, -1.0]), [1.0])
    loss, _ = multiscale_heads(*args)  # auto: the reference
    assert_close(loss, heads_ref(*args)[0], atol=1e-6, name="auto with C > 7000")
    with pytest.raises(ValueError, match=r"'features\[0\]' has 7001 channels"):
        multiscale_heads(*args, impl="cpu")
    with pytest.raises(RuntimeError, match=r"invalid argument 'features\[0\]': requires f.size\(1\) <= kMaxChannelsCpu"):
        torch.ops.d2g_fast.multiscale_heads(*args, 1e-5)
