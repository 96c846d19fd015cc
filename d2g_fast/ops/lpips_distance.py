"""LatentLPIPS per-layer feature distance: the public op.

``lpips_distance(f0, f1, weight, spatial=False, impl="auto")`` returns per sample
``mean_hw sum_c w_c (f0/|f0| - f1/|f1|)^2`` (|f| = sqrt(sum_c f^2 + 1e-8)), shape (N,), or the
(N, 1, H, W) map with ``spatial=True``. Gradients flow to f0 and f1 (one elementwise pass each,
from per-pixel statistics saved by the forward) and to ``weight`` when it requires one.

Backends: "ref" (d2g_fast/ref), "cpu" and "cuda" (C++ op torch.ops.d2g_fast.lpips_distance),
"triton" (torch.ops.d2g_fast.lpips_distance_triton). All are registered with torch.library
(autograd + fake kernels) so they trace under torch.compile.
"""
from __future__ import annotations

import torch

from d2g_fast import _dispatch, _ext
from d2g_fast.ref.lpips_distance import lpips_distance as lpips_distance_ref

OP = "lpips_distance"


def _check_args(f0, f1, weight) -> torch.Tensor:
    """Validate arguments (naming each one) and return ``weight`` as a (C,) vector."""
    for name, t in (("f0", f0), ("f1", f1), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{OP}: '{name}' must be a floating-point tensor, got {t.dtype}")
    if f0.dim() != 4:
        raise ValueError(f"{OP}: 'f0' must have shape (N, C, H, W), got {tuple(f0.shape)}")
    if f1.shape != f0.shape:
        raise ValueError(f"{OP}: 'f0' and 'f1' must have the same shape, got "
                         f"{tuple(f0.shape)} and {tuple(f1.shape)}")
    if f1.dtype != f0.dtype:
        raise TypeError(f"{OP}: 'f0' and 'f1' must have the same dtype, got {f0.dtype} and {f1.dtype}")
    for name, t in (("f1", f1), ("weight", weight)):
        if t.device != f0.device:
            raise ValueError(f"{OP}: 'f0' is on {f0.device} but '{name}' is on {t.device}")
    if f0.shape[0] == 0:
        raise ValueError(f"{OP}: 'f0' has an empty batch (N = 0)")
    if min(f0.shape[1:]) == 0:
        raise ValueError(f"{OP}: 'f0' must have C, H, W > 0, got {tuple(f0.shape)}")
    C = f0.shape[1]
    if weight.numel() != C or weight.dim() not in (1, 4) or (
            weight.dim() == 4 and tuple(weight.shape) != (1, C, 1, 1)):
        raise ValueError(f"{OP}: 'weight' must have shape (C,) or (1, C, 1, 1) with C = {C}, "
                         f"got {tuple(weight.shape)}")
    return weight.reshape(C)


def lpips_distance(f0: torch.Tensor, f1: torch.Tensor, weight: torch.Tensor, *,
                   spatial: bool = False, impl: str = "auto") -> torch.Tensor:
    weight = _check_args(f0, f1, weight)
    backend = _dispatch.resolve_impl(OP, impl, f0.device)
    if backend == "ref":
        return lpips_distance_ref(f0, f1, weight, spatial=spatial)
    if backend == "triton":
        return torch.ops.d2g_fast.lpips_distance_triton(f0, f1, weight, bool(spatial))[0]
    return torch.ops.d2g_fast.lpips_distance(f0, f1, weight, bool(spatial))[0]


# ---------------------------------------------------------------------------------------------
# torch.library registrations: shared autograd formula, fake kernels for the C++ ops.

def _setup_context(ctx, inputs, output):
    f0, f1, weight, spatial = inputs
    ctx.save_for_backward(f0, f1, weight, output[1])
    ctx.spatial = spatial


def _weight_grad(grad, f0, f1, stats, spatial):
    # Only when the channel weights are trained (e.g. calibrating heads): one extra pass.
    N, _, H, W = f0.shape
    acc = stats.dtype
    i0, i1 = stats[0].unsqueeze(1), stats[1].unsqueeze(1)
    diff2 = (f0.to(acc) * i0 - f1.to(acc) * i1) ** 2
    g = grad.to(acc).reshape(N, 1, H, W) if spatial else (grad.to(acc) / (H * W)).view(N, 1, 1, 1)
    return (diff2 * g).sum(dim=(0, 2, 3))


def _make_backward(backward_op):
    def backward(ctx, grad_dist, _grad_stats):
        f0, f1, weight, stats = ctx.saved_tensors
        need_f0, need_f1, need_w = ctx.needs_input_grad[:3]
        g0 = g1 = gw = None
        if need_f0 or need_f1:
            g0, g1 = backward_op(grad_dist, f0, f1, weight, stats, ctx.spatial, need_f0, need_f1)
        if need_w:
            gw = _weight_grad(grad_dist, f0, f1, stats, ctx.spatial).to(weight.dtype)
        return (g0 if need_f0 else None), (g1 if need_f1 else None), gw, None
    return backward


def _fake_forward(f0, f1, weight, spatial):
    N, _, H, W = f0.shape
    acc = torch.float64 if f0.dtype == torch.float64 else torch.float32
    dist = f0.new_empty((N, 1, H, W) if spatial else (N,), dtype=acc)
    return dist, f0.new_empty((4, N, H, W), dtype=acc)


def _fake_backward(grad, f0, f1, weight, stats, spatial, need_f0, need_f1):
    g0 = torch.empty_like(f0) if need_f0 else f0.new_empty((0,))
    g1 = torch.empty_like(f1) if need_f1 else f1.new_empty((0,))
    return g0, g1


if _ext.ext_loaded():
    torch.library.register_fake("d2g_fast::lpips_distance")(_fake_forward)
    torch.library.register_fake("d2g_fast::lpips_distance_backward")(_fake_backward)
    torch.library.register_autograd(
        "d2g_fast::lpips_distance",
        _make_backward(lambda *a: torch.ops.d2g_fast.lpips_distance_backward(*a)),
        setup_context=_setup_context)

if _dispatch.triton_status()[0]:
    from d2g_fast.triton import lpips_distance as _triton_impl  # noqa: F401  (registers the ops)

    torch.library.register_autograd(
        "d2g_fast::lpips_distance_triton",
        _make_backward(lambda *a: torch.ops.d2g_fast.lpips_distance_backward_triton(*a)),
        setup_context=_setup_context)
