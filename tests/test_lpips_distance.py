"""The LatentLPIPS per-layer distance op: every backend against the reference."""
import pytest
import torch

from d2g_asserts import assert_close
from d2g_fast import _dispatch, _ext
from d2g_fast.ops import lpips_distance
from d2g_fast.ref.lpips_distance import lpips_distance as reference

needs_ext = pytest.mark.skipif(not _ext.ext_loaded(), reason=f"extension missing: {_ext.ext_error()}")

# Triton on CPU tensors runs only under the interpreter (set by conftest on GPU-less machines).
triton_on_cpu = [pytest.mark.triton, pytest.mark.skipif(
    not _dispatch.triton_interpreted(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")]
CPU_IMPLS = [pytest.param("cpu", marks=needs_ext), pytest.param("triton", marks=triton_on_cpu)]


def make_inputs(shape, dtype=torch.float32, device="cpu", layout="contiguous", close=False):
    """Random features in one of several memory layouts; ``close`` makes f1 a small perturbation
    of f0 (the regime a converging loss lives in)."""
    N, C, H, W = shape
    if layout == "noncontiguous":  # a strided slice of a larger tensor, every stride odd
        base0 = torch.randn(N, 2 * C, H + 1, 2 * W, dtype=dtype, device=device)
        base1 = torch.randn(N, 2 * C, H + 1, 2 * W, dtype=dtype, device=device)
        f0, f1 = base0[:, ::2, 1:, ::2], base1[:, ::2, 1:, ::2]
    else:
        f0 = torch.randn(shape, dtype=dtype, device=device)
        f1 = torch.randn(shape, dtype=dtype, device=device)
    if close:
        f1 = (f0 + 0.05 * f1).contiguous()
    if layout == "channels_last":
        f0 = f0.contiguous(memory_format=torch.channels_last)
        f1 = f1.contiguous(memory_format=torch.channels_last)
    if layout == "mixed":  # one of each
        f1 = f1.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(C, dtype=dtype, device=device) + 0.05
    return f0, f1, weight


def run(impl, f0, f1, weight, spatial, upstream_seed=1):
    f0 = f0.detach().requires_grad_(True)
    f1 = f1.detach().requires_grad_(True)
    out = lpips_distance(f0, f1, weight, spatial=spatial, impl=impl)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(out) + 0.5
    g0, g1 = torch.autograd.grad(out, (f0, f1), g)
    return out, g0, g1


SHAPES = [(3, 67, 13, 13), (2, 5, 7, 3), (1, 1, 1, 1), (4, 64, 8, 9)]
LAYOUTS = ["contiguous", "noncontiguous", "channels_last", "mixed"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spatial", [False, True])
def test_matches_reference_float32(impl, shape, layout, spatial):
    f0, f1, w = make_inputs(shape, layout=layout)
    out, g0, g1 = run(impl, f0, f1, w, spatial)
    r_out, r_g0, r_g1 = run("ref", f0, f1, w, spatial)
    assert_close(out, r_out, atol=1e-5, rtol=1e-5, name="distance")
    assert_close(g0, r_g0, atol=1e-5, rtol=1e-5, name="grad f0")
    assert_close(g1, r_g1, atol=1e-5, rtol=1e-5, name="grad f1")
    assert out.dtype == r_out.dtype == torch.float32


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_close_inputs_keep_precision(impl):
    """f1 near f0: the one-pass expansion cancels; the error must stay far below the value."""
    f0, f1, w = make_inputs((2, 512, 6, 5), close=True)
    out, g0, g1 = run(impl, f0, f1, w, spatial=False)
    r_out, r_g0, r_g1 = run("ref", f0.double(), f1.double(), w.double(), spatial=False)
    assert r_out.min() > 1e-4
    assert_close(out, r_out, atol=2e-7, rtol=1e-4, name="distance")
    assert_close(g0, r_g0, atol=1e-6, rtol=1e-4, name="grad f0")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradient_gates(impl):
    """Only the inputs that need a gradient get one; the other is never computed."""
    f0, f1, w = make_inputs((2, 9, 4, 5))
    a = f0.clone().requires_grad_(True)
    out = lpips_distance(a, f1, w, impl=impl)
    (ga,) = torch.autograd.grad(out.sum(), (a,))
    r = reference(a, f1, w)
    (r_ga,) = torch.autograd.grad(r.sum(), (a,))
    assert_close(ga, r_ga, atol=1e-5, rtol=1e-5, name="grad f0")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_weight_gradient(impl):
    f0, f1, w = make_inputs((2, 9, 4, 5))
    for spatial in (False, True):
        w_ = w.clone().requires_grad_(True)
        out = lpips_distance(f0, f1, w_, spatial=spatial, impl=impl)
        (gw,) = torch.autograd.grad(out.sum(), (w_,))
        w_r = w.clone().requires_grad_(True)
        (r_gw,) = torch.autograd.grad(reference(f0, f1, w_r, spatial=spatial).sum(), (w_r,))
        assert_close(gw, r_gw, atol=1e-5, rtol=1e-5, name=f"grad weight (spatial={spatial})")


@needs_ext
@pytest.mark.parametrize("spatial", [False, True])
def test_gradcheck_cpu_kernel_float64(spatial):
    for seed in range(3):
        torch.manual_seed(seed)
        f0, f1, w = make_inputs((2, 5, 3, 4), dtype=torch.float64,
                                layout=["contiguous", "channels_last", "noncontiguous"][seed])
        f0.requires_grad_(True)
        f1.requires_grad_(True)
        w.requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda a, b, c: lpips_distance(a, b, c, spatial=spatial, impl="cpu"), (f0, f1, w))


@pytest.mark.triton
@pytest.mark.skipif(not _dispatch.triton_interpreted(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_gradcheck_triton_float64():
    f0, f1, w = make_inputs((2, 5, 3, 4), dtype=torch.float64)
    f0.requires_grad_(True)
    f1.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: lpips_distance(a, b, w, impl="triton"), (f0, f1))


@needs_ext
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_cpu(dtype, atol):
    f0, f1, w = make_inputs((2, 33, 5, 7), dtype=dtype)
    out, g0, _ = run("cpu", f0, f1, w, spatial=True)
    r_out, r_g0, _ = run("ref", f0.float(), f1.float(), w.float(), spatial=True)
    assert out.dtype == torch.float32 and g0.dtype == dtype
    assert_close(out, r_out, atol=atol, rtol=atol, name="distance")
    assert_close(g0, r_g0, atol=atol, rtol=5e-2, name="grad f0")


def test_identical_inputs_give_zero():
    f0, _, w = make_inputs((2, 16, 5, 5))
    for impl in ["ref"] + (["cpu"] if _ext.ext_loaded() else []):
        out = lpips_distance(f0, f0.clone(), w, impl=impl)
        assert out.abs().max() < 1e-6, impl


@pytest.mark.parametrize("impl", ["ref", pytest.param("cpu", marks=needs_ext)])
def test_bad_input_names_the_argument(impl):
    f0, f1, w = make_inputs((2, 4, 3, 3))
    cases = [
        ((f0, f1[:, :3], w), "'f0' and 'f1' must have the same shape"),
        ((f0.long(), f1, w), "'f0' must be a floating-point"),
        ((f0, f1, w.int()), "'weight' must be a floating-point"),
        ((f0, f1, w[:3]), "'weight' must have shape"),
        ((f0[:0], f1[:0], w), "empty batch"),
        ((f0, f1.double(), w), "same dtype"),
        ((f0[0], f1[0], w), "'f0' must have shape (N, C, H, W)"),
        ((f0, f1, w.to("meta")), "'weight' is on meta"),
    ]
    for args, message in cases:
        with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
            lpips_distance(*args, impl=impl)


@needs_ext
def test_cpp_boundary_checks_name_the_argument():
    """Direct torch.ops calls skip the Python checks: the C++ ones that memory safety needs
    still hold, name the argument and quote the violated condition."""
    f0, f1, w = make_inputs((2, 4, 3, 3))
    with pytest.raises(RuntimeError, match=r"invalid argument 'weight': requires weight.dim\(\) == 1"):
        torch.ops.d2g_fast.lpips_distance(f0, f1, w[:3], False)
    with pytest.raises(RuntimeError, match="invalid argument 'f1'"):
        torch.ops.d2g_fast.lpips_distance(f0, f1.long(), w, False)
    with pytest.raises(RuntimeError, match="invalid argument 'f1'"):
        torch.ops.d2g_fast.lpips_distance(f0, f1[:, :3], w, False)
    with pytest.raises(RuntimeError, match=r"invalid argument 'f0': requires .*numel\(\) > 0"):
        torch.ops.d2g_fast.lpips_distance(f0[:0], f1[:0], w, False)
    _, stats = torch.ops.d2g_fast.lpips_distance(f0, f1, w, False)
    with pytest.raises(RuntimeError, match="invalid argument 'grad'"):
        torch.ops.d2g_fast.lpips_distance_backward(torch.ones(3), f0, f1, w, stats, False, True, True)
    with pytest.raises(RuntimeError, match="invalid argument 'stats'"):
        torch.ops.d2g_fast.lpips_distance_backward(torch.ones(2), f0, f1, w, stats[:4], False, True, True)


@needs_ext
def test_traced_direct_call_runs_the_python_checks():
    """The fake kernel (what torch.compile and FakeTensor tracing run) applies the op's own
    checks, with the same messages as the public op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    f0, f1, w = make_inputs((2, 4, 3, 3))
    mode = FakeTensorMode()
    a, b, bad_w = (mode.from_tensor(t) for t in (f0, f1, w[:3]))
    with mode:
        with pytest.raises(ValueError, match=r"'weight' must have shape \(C,\) or \(1, C, 1, 1\)"):
            torch.ops.d2g_fast.lpips_distance(a, b, bad_w, False)


@needs_ext
def test_opcheck_cpp_op():
    """Schema, fake kernel and autograd registration agree with the real kernel."""
    f0, f1, w = make_inputs((2, 6, 4, 5))
    for spatial in (False, True):
        torch.library.opcheck(torch.ops.d2g_fast.lpips_distance.default,
                              (f0.requires_grad_(True), f1.requires_grad_(True), w, spatial))


@needs_ext
def test_torch_compile_cpu():
    f0, f1, w = make_inputs((2, 8, 5, 6))

    def loss(a, b):
        return lpips_distance(a, b, w, impl="cpu").sum() * 2.0

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    a = f0.clone().requires_grad_(True)
    out = compiled(a, f1)
    (ga,) = torch.autograd.grad(out, (a,))
    a_r = f0.clone().requires_grad_(True)
    r = loss(a_r, f1)
    (ga_r,) = torch.autograd.grad(r, (a_r,))
    assert_close(out, r, atol=1e-6, name="compiled loss")
    assert_close(ga, ga_r, atol=1e-6, name="compiled grad")


@pytest.mark.slow
@needs_ext
def test_torch_compile_inductor_cpu():
    f0, f1, w = make_inputs((2, 8, 5, 6))
    fn = torch.compile(lambda a, b: lpips_distance(a, b, w, spatial=True, impl="cpu") * 3.0,
                       fullgraph=True)
    assert_close(fn(f0, f1), reference(f0, f1, w, spatial=True) * 3.0, atol=1e-5, name="inductor")


# ---- GPU ------------------------------------------------------------------------------------

GPU_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtype", list(GPU_TOL))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_matches_reference(impl, dtype, layout):
    tol = GPU_TOL[dtype]
    for shape, spatial in [((3, 67, 13, 13), False), ((2, 512, 16, 16), True), ((1, 1, 1, 1), True),
                           ((2, 300, 7, 5), True)]:
        f0, f1, w = make_inputs(shape, dtype=dtype, device="cuda", layout=layout)
        out, g0, g1 = run(impl, f0, f1, w, spatial)
        r_out, r_g0, r_g1 = run("ref", f0.float(), f1.float(), w.float(), spatial)
        assert g0.dtype == dtype
        assert_close(out, r_out, atol=tol, rtol=tol, name=f"distance {shape}")
        assert_close(g0, r_g0, atol=tol, rtol=max(tol, 5e-2 if dtype != torch.float32 else tol), name=f"grad f0 {shape}")
        assert_close(g1, r_g1, atol=tol, rtol=max(tol, 5e-2 if dtype != torch.float32 else tol), name=f"grad f1 {shape}")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
def test_gpu_gradcheck_float64(impl):
    f0, f1, w = make_inputs((2, 5, 3, 4), dtype=torch.float64, device="cuda")
    f0.requires_grad_(True)
    f1.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: lpips_distance(a, b, w, spatial=True, impl=impl), (f0, f1))


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
def test_gpu_torch_compile(impl):
    f0, f1, w = make_inputs((4, 64, 16, 16), device="cuda")
    fn = torch.compile(lambda a, b: lpips_distance(a, b, w, impl=impl) * 2.0, fullgraph=True)
    assert_close(fn(f0, f1), reference(f0, f1, w) * 2.0, atol=1e-5, name="compiled")
