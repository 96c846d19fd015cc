"""lpips_distance_multi: every layer in one call, cancellation-free. Every backend against the
reference (d2g_fast/ref/lpips_distance.py), gradients, precision when f1 ~ f0, bad input."""
import importlib
import re

import pytest
import torch

from d2g_asserts import assert_close
from d2g_fast import _dispatch, _ext
from d2g_fast.ops import lpips_distance, lpips_distance_multi
from d2g_fast.ref.lpips_distance import lpips_distance_multi as reference

needs_ext = pytest.mark.skipif(not _ext.ext_loaded(), reason=f"extension missing: {_ext.ext_error()}")
triton_on_cpu = [pytest.mark.triton, pytest.mark.skipif(
    not _dispatch.triton_interpreted(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")]
CPU_IMPLS = [pytest.param("cpu", marks=needs_ext), pytest.param("triton", marks=triton_on_cpu)]

# The five LatentLPIPS taps of an 8x8 latent (pools 4 and 5 kept), and odd shapes.
LPIPS_SMALL = [(2, 64, 8, 8), (2, 128, 8, 8), (2, 256, 8, 8), (2, 512, 4, 4), (2, 512, 2, 2)]
ODD = [(3, 67, 13, 11), (3, 5, 7, 3), (3, 1, 1, 1), (3, 33, 2, 9), (3, 300, 3, 5),
       (3, 300, 13, 9), (3, 64, 40, 16)]  # the last two: several CPU row blocks per sample, a short last one
LAYOUTS = ["contiguous", "noncontiguous", "channels_last", "mixed"]


def make_layer(shape, layout, dtype=torch.float32, device="cpu", close=None):
    """f0, f1, weight of one layer in a memory layout; ``close`` makes f1 = f0 (1 + close * noise)."""
    N, C, H, W = shape
    if layout == "noncontiguous":  # a strided slice of a larger tensor, every stride odd
        f0 = torch.randn(N, 2 * C, H + 1, 2 * W, dtype=dtype, device=device)[:, ::2, 1:, ::2]
        f1 = torch.randn(N, 2 * C, H + 1, 2 * W, dtype=dtype, device=device)[:, ::2, 1:, ::2]
    else:
        f0 = torch.randn(shape, dtype=dtype, device=device)
        f1 = torch.randn(shape, dtype=dtype, device=device)
    if close is not None:
        f1 = f0 * (1 + close * torch.randn_like(f0))
    if layout == "channels_last":
        f0 = f0.contiguous(memory_format=torch.channels_last)
        f1 = f1.contiguous(memory_format=torch.channels_last)
    if layout == "mixed":  # one of each within the layer
        f1 = f1.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(C, dtype=dtype, device=device) + 0.05
    return f0, f1, weight


def make_layers(shapes, layouts, **kw):
    """Layers of the given shapes; ``layouts`` is one layout for all, or cycled per layer."""
    if isinstance(layouts, str):
        layouts = [layouts]
    layers = [make_layer(s, layouts[i % len(layouts)], **kw) for i, s in enumerate(shapes)]
    return [list(t) for t in zip(*layers)]


def run(impl, f0s, f1s, ws, seed=1):
    """Distance and both input gradients under a random upstream gradient."""
    f0s = [f.detach().requires_grad_(True) for f in f0s]
    f1s = [f.detach().requires_grad_(True) for f in f1s]
    out = lpips_distance_multi(f0s, f1s, ws, impl=impl)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed)).to(out) + 0.5
    grads = torch.autograd.grad(out, f0s + f1s, g)
    return out, grads[:len(f0s)], grads[len(f0s):]


def check_against_reference(impl, f0s, f1s, ws, atol=1e-5, rtol=1e-5, grad_rtol=None, ref_dtype=None):
    out, g0, g1 = run(impl, f0s, f1s, ws)
    cast = (lambda ts: [t.to(ref_dtype) for t in ts]) if ref_dtype else (lambda ts: ts)
    r_out, r_g0, r_g1 = run("ref", cast(f0s), cast(f1s), cast(ws))
    assert out.shape == (len(f0s), f0s[0].shape[0])
    assert_close(out, r_out, atol=atol, rtol=rtol, name="distance")
    for k in range(len(f0s)):
        assert g0[k].dtype == f0s[k].dtype and g0[k].shape == f0s[k].shape
        assert_close(g0[k], r_g0[k], atol=atol, rtol=grad_rtol or rtol, name=f"grad f0[{k}] {tuple(f0s[k].shape)}")
        assert_close(g1[k], r_g1[k], atol=atol, rtol=grad_rtol or rtol, name=f"grad f1[{k}] {tuple(f1s[k].shape)}")
    return out


@pytest.mark.parametrize("impl", [pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("layout", LAYOUTS + [LAYOUTS])
@pytest.mark.parametrize("shapes", [LPIPS_SMALL, ODD], ids=["lpips5", "odd"])
def test_cpu_matches_reference_float32(impl, layout, shapes):
    f0s, f1s, ws = make_layers(shapes, layout)
    # Oracle in float64: a 1-channel layer's gradient is ill-conditioned in float32 (the
    # reference's own float32 error there is a few 1e-6).
    out = check_against_reference(impl, f0s, f1s, ws, ref_dtype=torch.float64)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=triton_on_cpu)])
@pytest.mark.parametrize("layout", ["noncontiguous", LAYOUTS])
def test_triton_matches_reference_float32(impl, layout):
    # The interpreter is slow: the odd shapes, small.
    f0s, f1s, ws = make_layers([(2, 67, 5, 3), (2, 5, 7, 3), (2, 1, 1, 1), (2, 33, 2, 9)], layout)
    check_against_reference(impl, f0s, f1s, ws, ref_dtype=torch.float64)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_rows_equal_the_single_layer_op(impl):
    """Row l of the multi-layer op is the single-layer op of layer l (same definition)."""
    f0s, f1s, ws = make_layers([(2, 9, 4, 5), (2, 17, 3, 3)], LAYOUTS)
    out = lpips_distance_multi(f0s, f1s, ws, impl=impl)
    for k in range(2):
        assert_close(out[k], lpips_distance(f0s[k], f1s[k], ws[k], impl="ref"), atol=1e-6, rtol=1e-5,
                     name=f"layer {k}")


def one_pass_expansion(f0, f1, w):
    """The math the kernels used before: five sums in one pass over the channels, then
    d = i0^2 Swaa - 2 i0 i1 Swab + i1^2 Swbb (float32). Kept here to show what it cost."""
    w = w.view(1, -1, 1, 1)
    i0 = torch.rsqrt((f0 * f0).sum(1) + 1e-8)
    i1 = torch.rsqrt((f1 * f1).sum(1) + 1e-8)
    waa, wbb, wab = (w * f0 * f0).sum(1), (w * f1 * f1).sum(1), (w * f0 * f1).sum(1)
    return (i0 * i0 * waa - 2 * i0 * i1 * wab + i1 * i1 * wbb).mean((1, 2))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_close_inputs_keep_precision(impl):
    """f1 = f0 (1 + 1e-4 noise), the regime of a converging loss: the one-pass expansion cancels
    catastrophically; the two-pass math keeps about float32 precision (multi-layer op, and the
    single-layer op, which now uses the same math, with and without spatial)."""
    shapes = [(2, 64, 6, 5), (2, 512, 3, 4)]
    f0s, f1s, ws = make_layers(shapes, "contiguous", close=1e-4)
    exact = reference([f.double() for f in f0s], [f.double() for f in f1s], [w.double() for w in ws])
    assert exact.min() > 0
    new = lpips_distance_multi(f0s, f1s, ws, impl=impl).double()
    new_err = ((new - exact).abs() / exact).max().item()
    old = torch.stack([one_pass_expansion(a, b, w) for a, b, w in zip(f0s, f1s, ws)]).double()
    old_err = ((old - exact).abs() / exact).max().item()
    print(f"relative error: two-pass {new_err:.2e}, one-pass expansion {old_err:.2e}")
    assert new_err < 1e-5, f"relative error {new_err:.3e} (one-pass expansion {old_err:.3e})"
    assert new_err * 1000 < old_err, f"two-pass {new_err:.3e} is not far below the expansion's {old_err:.3e}"
    for k, (a, b, w) in enumerate(zip(f0s, f1s, ws)):
        single = lpips_distance(a, b, w, impl=impl).double()
        err = ((single - exact[k]).abs() / exact[k]).max().item()
        assert err < 1e-5, f"single-layer op, layer {k}: relative error {err:.3e}"
        exact_map = lpips_distance(a.double(), b.double(), w.double(), spatial=True, impl="ref")
        single_map = lpips_distance(a, b, w, spatial=True, impl=impl).double()
        err = ((single_map - exact_map).abs() / exact_map).max().item()
        assert err < 1e-5, f"single-layer op, spatial map of layer {k}: relative error {err:.3e}"
    # The input gradients keep their precision too.
    _, g0, g1 = run(impl, f0s, f1s, ws)
    _, r_g0, r_g1 = run("ref", [f.double() for f in f0s], [f.double() for f in f1s], [w.double() for w in ws])
    for k in range(len(shapes)):
        scale = r_g0[k].abs().max().item()
        assert_close(g0[k], r_g0[k], atol=1e-4 * scale, name=f"grad f0[{k}] (scale {scale:.2e})")
        assert_close(g1[k], r_g1[k], atol=1e-4 * scale, name=f"grad f1[{k}] (scale {scale:.2e})")


@pytest.mark.parametrize("impl", ["ref"] + CPU_IMPLS)
def test_identical_inputs_give_exactly_zero(impl):
    f0s, _, ws = make_layers([(2, 16, 5, 5), (2, 3, 2, 7)], "contiguous")
    out = lpips_distance_multi(f0s, [f.clone() for f in f0s], ws, impl=impl)
    assert out.abs().max().item() == 0.0, out


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradient_gates(impl):
    """Only the inputs that need a gradient get one (need_f0 / need_f1 each alone)."""
    f0s, f1s, ws = make_layers([(2, 9, 4, 5), (2, 4, 3, 3), (2, 7, 2, 3)], ["contiguous", "channels_last", "mixed"])
    for which in (0, 1):
        leaves = [f.clone().requires_grad_(True) for f in (f0s, f1s)[which]]
        args = (leaves, f1s) if which == 0 else (f0s, leaves)
        out = lpips_distance_multi(*args, ws, impl=impl)
        grads = torch.autograd.grad(out.sum(), leaves)
        r_leaves = [f.clone().requires_grad_(True) for f in (f0s, f1s)[which]]
        r_args = (r_leaves, f1s) if which == 0 else (f0s, r_leaves)
        r_grads = torch.autograd.grad(reference(*r_args, ws).sum(), r_leaves)
        for k, (g, r) in enumerate(zip(grads, r_grads)):
            assert_close(g, r, atol=1e-5, rtol=1e-5, name=f"grad of input {which}, layer {k}")


@needs_ext
def test_backward_computes_only_what_is_needed(monkeypatch):
    """Only f0 requires grad (the loss's target branch f1 does not), weights frozen: the kernel
    is asked for the f0 gradients only and no weight gradient is computed."""
    module = importlib.import_module("d2g_fast.ops.lpips_distance")  # the function shadows the module name

    calls = []
    real = module._cpp_multi_backward
    monkeypatch.setattr(module, "_cpp_multi_backward", lambda *a: calls.append(a[-2:]) or real(*a))
    monkeypatch.setattr(module, "_multi_weight_grads", lambda *a: pytest.fail("weight gradient computed"))
    f0s, f1s, ws = make_layers([(2, 9, 4, 5), (2, 4, 3, 3)], "contiguous")
    leaves = [f.clone().requires_grad_(True) for f in f0s]
    lpips_distance_multi(leaves, f1s, ws, impl="cpu").sum().backward()
    assert calls == [(True, False)]
    assert all(f.grad is not None for f in leaves)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_weight_gradient(impl):
    f0s, f1s, ws = make_layers([(2, 9, 4, 5), (2, 4, 3, 3)], ["contiguous", "channels_last"])
    leaves = [w.clone().requires_grad_(True) for w in ws]
    g = torch.rand(2, 2) + 0.5
    grads = torch.autograd.grad(lpips_distance_multi(f0s, f1s, leaves, impl=impl), leaves, g)
    r_leaves = [w.clone().requires_grad_(True) for w in ws]
    r_grads = torch.autograd.grad(reference(f0s, f1s, r_leaves), r_leaves, g)
    for k, (a, b) in enumerate(zip(grads, r_grads)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"grad weights[{k}]")
    # Only one layer's weights train: its gradient is right, the other is not asked for.
    leaf = ws[1].clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(lpips_distance_multi(f0s, f1s, [ws[0], leaf], impl=impl), (leaf,), g)
    assert_close(g1, r_grads[1], atol=1e-5, rtol=1e-5, name="grad weights[1] alone")


@needs_ext
def test_cpu_result_does_not_depend_on_the_thread_count():
    """Per-unit sums reduced in a fixed order: bit-identical with 1 and 2 threads."""
    f0s, f1s, ws = make_layers([(3,) + s[1:] for s in LPIPS_SMALL[:2]] + ODD[-2:], LAYOUTS)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run("cpu", f0s, f1s, ws))
    finally:
        torch.set_num_threads(before)
    (a, a0, a1), (b, b0, b1) = results
    assert torch.equal(a, b), (a - b).abs().max()
    assert all(torch.equal(x, y) for x, y in zip(a0 + a1, b0 + b1))


@needs_ext
def test_gradcheck_cpu_kernel_float64():
    for seed, layouts in enumerate([["contiguous", "channels_last"], ["noncontiguous", "mixed"]]):
        torch.manual_seed(seed)
        f0s, f1s, ws = make_layers([(2, 5, 3, 4), (2, 3, 2, 2)], layouts, dtype=torch.float64)
        inputs = [t.requires_grad_(True) for t in f0s + f1s + ws]

        def fn(*t):
            return lpips_distance_multi(list(t[:2]), list(t[2:4]), list(t[4:]), impl="cpu")
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.triton
@pytest.mark.skipif(not _dispatch.triton_interpreted(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_gradcheck_triton_float64():
    # fast_mode (random projections): the interpreter runs each launch slowly.
    f0s, f1s, ws = make_layers([(2, 5, 3, 4), (2, 3, 2, 2)], ["contiguous", "channels_last"], dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in f0s + f1s]
    assert torch.autograd.gradcheck(
        lambda *t: lpips_distance_multi(list(t[:2]), list(t[2:]), ws, impl="triton"), inputs, fast_mode=True)


@needs_ext
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_cpu(dtype, atol):
    f0s, f1s, ws = make_layers([(2, 33, 5, 7), (2, 64, 3, 3)], ["contiguous", "channels_last"], dtype=dtype)
    out, g0, _ = run("cpu", f0s, f1s, ws)
    r_out, r_g0, _ = run("ref", [f.float() for f in f0s], [f.float() for f in f1s], [w.float() for w in ws])
    assert out.dtype == torch.float32 and g0[0].dtype == dtype
    assert_close(out, r_out, atol=atol, rtol=atol, name="distance")
    for k in range(2):
        assert_close(g0[k], r_g0[k], atol=atol, rtol=5e-2, name=f"grad f0[{k}]")


@needs_ext
def test_float64_accumulates_in_float64():
    f0s, f1s, ws = make_layers(ODD[:3], LAYOUTS, dtype=torch.float64)
    out = check_against_reference("cpu", f0s, f1s, ws, atol=1e-12, rtol=1e-10)
    assert out.dtype == torch.float64


@needs_ext
def test_opcheck_cpp_op():
    """Schema, fake kernel and autograd registration agree with the real kernel."""
    f0s, f1s, ws = make_layers([(2, 6, 4, 5), (2, 3, 2, 3)], ["contiguous", "channels_last"])
    torch.library.opcheck(torch.ops.d2g_fast.lpips_distance_multi.default,
                          ([f.detach().requires_grad_(True) for f in f0s],
                           [f.detach().requires_grad_(True) for f in f1s], ws))
    _, stats = torch.ops.d2g_fast.lpips_distance_multi(f0s, f1s, ws)
    torch.library.opcheck(torch.ops.d2g_fast.lpips_distance_multi_backward.default,
                          (torch.rand(2, 2), f0s, f1s, ws, stats, True, False))


@needs_ext
def test_torch_compile_cpu():
    f0s, f1s, ws = make_layers([(2, 8, 5, 6), (2, 16, 3, 3)], ["contiguous", "channels_last"])

    def loss(a, b):
        return lpips_distance_multi(a, b, ws, impl="cpu").sum() * 2.0

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    a = [f.clone().requires_grad_(True) for f in f0s]
    out = compiled(a, f1s)
    ga = torch.autograd.grad(out, a)
    a_r = [f.clone().requires_grad_(True) for f in f0s]
    r = loss(a_r, f1s)
    ga_r = torch.autograd.grad(r, a_r)
    assert_close(out, r, atol=1e-6, name="compiled loss")
    for k in range(2):
        assert_close(ga[k], ga_r[k], atol=1e-6, name=f"compiled grad f0[{k}]")


@pytest.mark.slow
@needs_ext
def test_torch_compile_inductor_cpu():
    f0s, f1s, ws = make_layers([(2, 8, 5, 6), (2, 16, 3, 3)], ["contiguous", "channels_last"])
    fn = torch.compile(lambda a, b: lpips_distance_multi(a, b, ws, impl="cpu") * 3.0, fullgraph=True)
    assert_close(fn(f0s, f1s), reference(f0s, f1s, ws) * 3.0, atol=1e-5, name="inductor")


@pytest.mark.parametrize("impl", ["ref", pytest.param("cpu", marks=needs_ext)])
def test_bad_input_names_the_argument(impl):
    f0s, f1s, ws = make_layers([(2, 4, 3, 3), (2, 5, 2, 2)], "contiguous")
    a, b = f0s[1], f1s[1]
    cases = [
        ((f0s[0], f1s, ws), "'f0' must be a list of tensors"),
        (([], [], []), "'f0' must hold at least one tensor"),
        ((f0s, f1s[:1], ws), "'f1' must hold one tensor per layer"),
        ((f0s, f1s, ws[:1]), "'weights' must hold one tensor per layer"),
        ((f0s, [f1s[0], b[:, :3]], ws), "'f0[1]' and 'f1[1]' must have the same shape"),
        (([f0s[0], a.long()], f1s, ws), "'f0[1]' must be a floating-point"),
        ((f0s, f1s, [ws[0], ws[1].int()]), "'weights[1]' must be a floating-point"),
        ((f0s, f1s, [ws[0], ws[1][:3]]), "'weights[1]' must have shape"),
        (([f0s[0], a.double()], [f1s[0], b.double()], ws), "'f0[1]' has torch.float64"),
        (([f0s[0], a[:1]], [f1s[0], b[:1]], ws), "'f0[1]' has batch 1"),
        (([f0s[0], a[0]], [f1s[0], b[0]], ws), "'f0[1]' must have shape (N, C, H, W)"),
        (([f0s[0][:0]], [f1s[0][:0]], ws[:1]), "empty batch"),
        ((f0s, f1s, [ws[0], ws[1].to("meta")]), "'weights[1]' is on meta"),
    ]
    for args, message in cases:
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            lpips_distance_multi(*args, impl=impl)


@needs_ext
def test_cpp_boundary_checks_name_the_argument():
    """Direct torch.ops calls skip the Python checks: the C++ ones that memory safety needs
    still hold and name the argument."""
    f0s, f1s, ws = make_layers([(2, 4, 3, 3), (2, 5, 2, 2)], "contiguous")
    op = torch.ops.d2g_fast.lpips_distance_multi
    with pytest.raises(RuntimeError, match=r"invalid argument 'weights\[1\]'"):
        op(f0s, f1s, [ws[0], ws[1][:3]])
    with pytest.raises(RuntimeError, match=r"invalid argument 'f1\[1\]'"):
        op(f0s, [f1s[0], f1s[1].long()], ws)
    with pytest.raises(RuntimeError, match=r"invalid argument 'f1\[1\]'"):
        op(f0s, [f1s[0], f1s[1][:, :2]], ws)
    with pytest.raises(RuntimeError, match=r"invalid argument 'f0\[1\]': requires .*a.size\(0\) == m.N"):
        op([f0s[0], f0s[1][:1]], [f1s[0], f1s[1][:1]], ws)
    _, stats = op(f0s, f1s, ws)
    back = torch.ops.d2g_fast.lpips_distance_multi_backward
    with pytest.raises(RuntimeError, match="invalid argument 'grad'"):
        back(torch.ones(2), f0s, f1s, ws, stats, True, True)
    with pytest.raises(RuntimeError, match="invalid argument 'stats'"):
        back(torch.ones(2, 2), f0s, f1s, ws, stats[:, :-1], True, True)


@needs_ext
def test_traced_direct_call_runs_the_python_checks():
    """The fake kernel applies the op's own checks, with the public op's messages."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    f0s, f1s, ws = make_layers([(2, 4, 3, 3), (2, 5, 2, 2)], "contiguous")
    with FakeTensorMode() as mode:
        a, b, w = ([mode.from_tensor(t) for t in seq] for seq in (f0s, f1s, ws))
        with pytest.raises(ValueError, match=re.escape("'f0[1]' has batch 1 but 'f0[0]' has 2")):
            torch.ops.d2g_fast.lpips_distance_multi([a[0], a[1][:1]], [b[0], b[1][:1]], w)


def test_elatentlpips_uses_one_multi_layer_call(monkeypatch):
    """The loss's fast path (spatial=False) makes one multi-layer call, not five."""
    import d2g_fast.ops as ops
    from d2g_fast import ELatentLPIPS

    calls = []
    real = ops.lpips_distance_multi

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "lpips_distance_multi", counting)
    model = ELatentLPIPS(pretrained=False, pnet_rand=True, encoder="sd15", augment=None, verbose=False)
    x, y = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    total, layers = model(x, y, retPerLayer=True, ensembling=False, add_l1_loss=False)
    assert calls == [5]
    ref_model = ELatentLPIPS(pretrained=False, pnet_rand=True, encoder="sd15", augment=None, verbose=False,
                             impl="ref")
    ref_model.load_state_dict(model.state_dict())
    r_total, r_layers = ref_model(x, y, retPerLayer=True, ensembling=False, add_l1_loss=False)
    assert len(layers) == 5 and all(t.shape == (2, 1, 1, 1) for t in layers)
    assert_close(total, r_total, atol=1e-5, rtol=1e-4, name="loss")


# ---- GPU ------------------------------------------------------------------------------------

GPU_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
GPU_IMPLS = ["cuda", pytest.param("triton", marks=pytest.mark.triton)]
GPU_SHAPES = [(3, 64, 16, 16), (3, 128, 16, 16), (3, 256, 16, 16), (3, 512, 8, 8), (3, 512, 4, 4),
              (3, 67, 13, 11), (3, 5, 7, 3), (3, 1, 1, 1), (3, 300, 3, 5)]


# CUDA: every dtype x layout. Triton (JIT-compiled per stride pattern and dtype, slow to
# compile): every dtype with the layouts cycled over the layers.
GPU_CASES = [("cuda", d, l) for d in GPU_TOL for l in LAYOUTS + ["per-layer"]] + \
    [pytest.param("triton", d, "per-layer", marks=pytest.mark.triton) for d in GPU_TOL]


@pytest.mark.cuda
@pytest.mark.parametrize("impl,dtype,layout", GPU_CASES)
def test_gpu_matches_reference(impl, dtype, layout):
    layout = LAYOUTS if layout == "per-layer" else layout
    tol = GPU_TOL[dtype]
    f0s, f1s, ws = make_layers(GPU_SHAPES, layout, dtype=dtype, device="cuda")
    ws = [w.float() for w in ws]  # the loss passes float32 head weights with half features
    check_against_reference(impl, f0s, f1s, ws, atol=tol, rtol=tol,
                            grad_rtol=tol if dtype == torch.float32 else 5e-2,
                            ref_dtype=torch.float64 if dtype == torch.float32 else torch.float32)


@pytest.mark.cuda
def test_gpu_more_layers_than_one_launch_holds():
    """More than kMaxLayers (8) layers: the CUDA kernel splits them over launches."""
    shapes = [(2, 3 + 7 * i, 5 + i, 4 + (i % 3)) for i in range(11)]
    f0s, f1s, ws = make_layers(shapes, LAYOUTS, device="cuda")
    check_against_reference("cuda", f0s, f1s, ws, ref_dtype=torch.float64)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_close_inputs_keep_precision(impl):
    f0s, f1s, ws = make_layers([(2, 64, 16, 16), (2, 512, 4, 4)], ["contiguous", "channels_last"],
                               device="cuda", close=1e-4)
    exact = reference([f.double() for f in f0s], [f.double() for f in f1s], [w.double() for w in ws])
    new = lpips_distance_multi(f0s, f1s, ws, impl=impl).double()
    err = ((new - exact).abs() / exact).max().item()
    assert err < 1e-5, f"relative error {err:.3e}"
    for k, (a, b, w) in enumerate(zip(f0s, f1s, ws)):  # the single-layer op uses the same math
        exact_map = lpips_distance(a.double(), b.double(), w.double(), spatial=True, impl="ref")
        single_map = lpips_distance(a, b, w, spatial=True, impl=impl).double()
        err = ((single_map - exact_map).abs() / exact_map).max().item()
        assert err < 1e-5, f"single-layer op, spatial map of layer {k}: relative error {err:.3e}"


@pytest.mark.cuda
def test_gpu_deterministic():
    f0s, f1s, ws = make_layers(GPU_SHAPES, LAYOUTS, device="cuda")
    a, ga0, ga1 = run("cuda", f0s, f1s, ws)
    b, gb0, gb1 = run("cuda", f0s, f1s, ws)
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(ga0 + ga1, gb0 + gb1))


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_gradcheck_float64(impl):
    f0s, f1s, ws = make_layers([(2, 5, 3, 4), (2, 40, 2, 3)], ["contiguous", "channels_last"],
                               dtype=torch.float64, device="cuda")
    inputs = [t.requires_grad_(True) for t in f0s + f1s + ws]
    assert torch.autograd.gradcheck(
        lambda *t: lpips_distance_multi(list(t[:2]), list(t[2:4]), list(t[4:]), impl=impl), inputs)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_torch_compile(impl):
    f0s, f1s, ws = make_layers([(4, 64, 16, 16), (4, 512, 4, 4)], ["contiguous", "channels_last"], device="cuda")
    fn = torch.compile(lambda a, b: lpips_distance_multi(a, b, ws, impl=impl) * 2.0, fullgraph=True)
    assert_close(fn(f0s, f1s), reference(f0s, f1s, ws) * 2.0, atol=1e-5, name="compiled")
