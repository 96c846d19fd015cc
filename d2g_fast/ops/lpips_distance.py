"""LatentLPIPS per-layer feature distance: the public ops.

``lpips_distance(f0, f1, weight, *, spatial=False, impl="auto")`` returns per sample
``mean_hw sum_c w_c (f0/|f0| - f1/|f1|)^2`` (|f| = sqrt(sum_c f^2 + 1e-8)), shape (N,), or the
(N, 1, H, W) map with ``spatial=True``. Gradients flow to f0 and f1 (one elementwise pass each,
from per-pixel statistics saved by the forward) and to ``weight`` when it requires one.
Every backend uses the two-pass, cancellation-free math of csrc/lpips_distance/lpips_distance_math.h
(the result keeps float32 relative precision when f1 is very close to f0).

``lpips_distance_multi(f0s, f1s, weights, *, impl="auto")`` computes the (L, N) distances of several
layers in one call (one kernel launch on the GPU): what E-LatentLPIPS uses for its five taps.

Backends: "ref" (d2g_fast/ref), "cpu" and "cuda" (C++ op torch.ops.d2g_fast.lpips_distance),
"triton" (torch.ops.d2g_fast.lpips_distance_triton). All are registered with torch.library
(autograd + fake kernels) so they trace under torch.compile.

Arguments are validated here, once: the public ops and the fake kernels (which every traced
call passes through) run the same checks, whose messages name the argument; the C++ entry
points keep only the checks that memory safety needs (csrc/common/checks.h).
"""
from __future__ import annotations

from typing import Sequence

import torch

from d2g_fast import _dispatch, _ext
from d2g_fast._dispatch import accumulation_dtype
from d2g_fast.ref.lpips_distance import lpips_distance as lpips_distance_ref
from d2g_fast.ref.lpips_distance import lpips_distance_multi as lpips_distance_multi_ref

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
    """LatentLPIPS distance of one layer: per pixel ``sum_c w_c (f0/|f0| - f1/|f1|)^2`` with
    ``|f| = sqrt(sum_c f^2 + 1e-8)``, averaged over H, W unless ``spatial``.

    Args:
        f0 (Tensor[N, C, H, W]): features of the first image; any floating dtype and layout.
        f1 (Tensor[N, C, H, W]): features of the second image; f0's shape, dtype and device.
        weight (Tensor[C] or Tensor[1, C, 1, 1]): the per-channel weights (LPIPS' linear head).
        spatial (bool): return the per-pixel map instead of its spatial mean.
        impl (str): ``"auto" | "ref" | "cpu" | "cuda" | "triton"`` (see d2g_fast._dispatch).

    Returns:
        Tensor[N], or Tensor[N, 1, H, W] with ``spatial``: float32 (float64 for float64
        inputs). Differentiable w.r.t. f0, f1 and weight.
    """
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
    i0, di = stats[0].unsqueeze(1), stats[2].unsqueeze(1)
    f0, f1 = f0.to(acc), f1.to(acc)
    diff2 = ((f0 - f1) * i0 + f1 * di) ** 2  # the cancellation-free normalised difference
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


def _stat_rows() -> int:
    """Rows of per-pixel statistics the C++ forward saves (kStatRows in lpips_distance_math.h)."""
    return _ext.constant("lpips_distance_stat_rows")


def _fake_forward(f0, f1, weight, spatial):
    _check_args(f0, f1, weight)
    N, _, H, W = f0.shape
    acc = accumulation_dtype(f0.dtype)
    dist = f0.new_empty((N, 1, H, W) if spatial else (N,), dtype=acc)
    return dist, f0.new_empty((_stat_rows(), N, H, W), dtype=acc)


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


# =============================================================================================
# lpips_distance_multi: all layers in one call, cancellation-free.

OP_MULTI = "lpips_distance_multi"


def _check_multi_args(f0s, f1s, weights) -> list[torch.Tensor]:
    """Validate arguments (naming each one, e.g. ``f0[3]``); return the weights as (C,) vectors."""
    for name, seq in (("f0", f0s), ("f1", f1s), ("weights", weights)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{OP_MULTI}: '{name}' must be a list of tensors, got {type(seq).__name__}")
    L = len(f0s)
    if L == 0:
        raise ValueError(f"{OP_MULTI}: 'f0' must hold at least one tensor")
    for name, seq in (("f1", f1s), ("weights", weights)):
        if len(seq) != L:
            raise ValueError(f"{OP_MULTI}: '{name}' must hold one tensor per layer of 'f0' ({L}), "
                             f"got {len(seq)}")
    for name, seq in (("f0", f0s), ("f1", f1s), ("weights", weights)):
        for k, t in enumerate(seq):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{OP_MULTI}: '{name}[{k}]' must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{OP_MULTI}: '{name}[{k}]' must be a floating-point tensor, got {t.dtype}")
    first = f0s[0]
    if first.dim() != 4:
        raise ValueError(f"{OP_MULTI}: 'f0[0]' must have shape (N, C, H, W), got {tuple(first.shape)}")
    N = first.shape[0]
    if N == 0:
        raise ValueError(f"{OP_MULTI}: 'f0[0]' has an empty batch (N = 0)")
    out = []
    for k, (a, b, w) in enumerate(zip(f0s, f1s, weights)):
        if a.dim() != 4:
            raise ValueError(f"{OP_MULTI}: 'f0[{k}]' must have shape (N, C, H, W), got {tuple(a.shape)}")
        if b.shape != a.shape:
            raise ValueError(f"{OP_MULTI}: 'f0[{k}]' and 'f1[{k}]' must have the same shape, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        for name, t in ((f"f0[{k}]", a), (f"f1[{k}]", b)):
            if t.dtype != first.dtype:
                raise TypeError(f"{OP_MULTI}: every feature map must have the dtype of 'f0[0]' "
                                f"({first.dtype}), '{name}' has {t.dtype}")
        if a.shape[0] != N:
            raise ValueError(f"{OP_MULTI}: 'f0[{k}]' has batch {a.shape[0]} but 'f0[0]' has {N}")
        if min(a.shape[1:]) == 0:
            raise ValueError(f"{OP_MULTI}: 'f0[{k}]' must have C, H, W > 0, got {tuple(a.shape)}")
        for name, t in ((f"f0[{k}]", a), (f"f1[{k}]", b), (f"weights[{k}]", w)):
            if t.device != first.device:
                raise ValueError(f"{OP_MULTI}: 'f0[0]' is on {first.device} but '{name}' is on {t.device}")
        C = a.shape[1]
        if w.numel() != C or w.dim() not in (1, 4) or (w.dim() == 4 and tuple(w.shape) != (1, C, 1, 1)):
            raise ValueError(f"{OP_MULTI}: 'weights[{k}]' must have shape (C,) or (1, C, 1, 1) with "
                             f"C = {C}, got {tuple(w.shape)}")
        out.append(w.reshape(C))
    return out


def lpips_distance_multi(f0s: Sequence[torch.Tensor], f1s: Sequence[torch.Tensor],
                         weights: Sequence[torch.Tensor], *, impl: str = "auto") -> torch.Tensor:
    """LatentLPIPS distance of L layers at once.

    Args:
        f0s (list of L Tensor[N, C_l, H_l, W_l]): features of the first image, one per layer.
        f1s (list of L Tensor[N, C_l, H_l, W_l]): features of the second image, shaped as f0s.
        weights (list of L Tensor[C_l] or Tensor[1, C_l, 1, 1]): per-channel weights.
        impl (str): ``"auto" | "ref" | "cpu" | "cuda" | "triton"`` (see d2g_fast._dispatch).

    Returns:
        Tensor[L, N]: float32 (float64 for float64 inputs). Differentiable w.r.t. every input.

    Row l is ``lpips_distance(f0s[l], f1s[l], weights[l])``: per sample the spatial mean of
    ``sum_c w_c (f0/|f0| - f1/|f1|)^2`` with ``|f| = sqrt(sum_c f^2 + 1e-8)``. The layers may
    differ in C, H, W and memory layout (planar, channels_last, strided); they share N and the
    dtype. One parallel loop on the CPU and one kernel launch on the GPU for every layer
    (the Triton backend launches once per layer); the backward writes the gradients of f0 and
    f1 of every layer in one pass.

    Unlike the single-layer op's one-pass expansion, the math is cancellation-free (two passes
    over each pixel's channels, see csrc/lpips_distance/lpips_distance_math.h): the result keeps
    its relative precision when f1 is very close to f0, the regime of a converging loss.
    """
    ws = _check_multi_args(f0s, f1s, weights)
    backend = _dispatch.resolve_impl(OP_MULTI, impl, f0s[0].device)
    if backend == "ref":
        return lpips_distance_multi_ref(list(f0s), list(f1s), ws)
    op = (torch.ops.d2g_fast.lpips_distance_multi_triton if backend == "triton"
          else torch.ops.d2g_fast.lpips_distance_multi)
    return op(list(f0s), list(f1s), ws)[0]


def _multi_setup_context(ctx, inputs, output):
    f0s, f1s, weights = inputs
    ctx.num_layers = len(f0s)
    ctx.save_for_backward(*f0s, *f1s, *weights, output[1])


def _multi_weight_grads(grad, f0s, f1s, stats, needed):
    """d dist / d weights[l] for the layers that need it (None for the others), from the saved
    per-pixel norms (only when the weights train)."""
    acc = stats.dtype
    grads, begin = [], 0
    for k, (a, b) in enumerate(zip(f0s, f1s)):
        N, _, H, W = a.shape
        layer_stats = stats[:, begin:begin + N * H * W].view(stats.shape[0], N, 1, H, W)
        begin += N * H * W
        if not needed[k]:
            grads.append(None)
            continue
        a, b = a.to(acc), b.to(acc)
        D = (a - b) * layer_stats[0] + b * layer_stats[2]  # the cancellation-free normalised difference
        g = (grad[k].to(acc) / (H * W)).view(N, 1, 1, 1)
        grads.append((D * D * g).sum(dim=(0, 2, 3)))
    return grads


def _per_layer(needs, L):
    # For a Tensor[] input, torch.library gives needs_input_grad as one bool per list element
    # (a non-empty list of False is truthy: never test it directly).
    return list(needs) if isinstance(needs, (list, tuple)) else [bool(needs)] * L


def _make_multi_backward(backward_op):
    def backward(ctx, grad_dist, _grad_stats):
        L = ctx.num_layers
        saved = ctx.saved_tensors
        f0s, f1s, weights, stats = list(saved[:L]), list(saved[L:2 * L]), list(saved[2 * L:3 * L]), saved[-1]
        need_f0, need_f1, need_w = (_per_layer(n, L) for n in ctx.needs_input_grad[:3])
        # Lists of one gradient (or None) per layer: the structure of the inputs.
        g0 = g1 = gw = [None] * L
        if any(need_f0) or any(need_f1):
            r0, r1 = backward_op(grad_dist, f0s, f1s, weights, stats, any(need_f0), any(need_f1))
            g0 = [g if need else None for g, need in zip(r0, need_f0)]
            g1 = [g if need else None for g, need in zip(r1, need_f1)]
        if any(need_w):
            gw = [g.to(w.dtype) if need else None
                  for g, w, need in zip(_multi_weight_grads(grad_dist, f0s, f1s, stats, need_w), weights, need_w)]
        return g0, g1, gw
    return backward


def _multi_stats_shape(f0s):
    return (_stat_rows(), sum(a.shape[0] * a.shape[2] * a.shape[3] for a in f0s))


def _fake_multi_forward(f0s, f1s, weights):
    _check_multi_args(f0s, f1s, weights)
    acc = accumulation_dtype(f0s[0].dtype)
    dist = f0s[0].new_empty((len(f0s), f0s[0].shape[0]), dtype=acc)
    return dist, f0s[0].new_empty(_multi_stats_shape(f0s), dtype=acc)


def _fake_multi_backward(grad, f0s, f1s, weights, stats, need_f0, need_f1):
    g0 = [torch.empty_like(a) if need_f0 else a.new_empty((0,)) for a in f0s]
    g1 = [torch.empty_like(b) if need_f1 else b.new_empty((0,)) for b in f1s]
    return g0, g1


def _cpp_multi_backward(*args):
    # A module-level name (looked up per call), so tests can see which gradients were asked for.
    return torch.ops.d2g_fast.lpips_distance_multi_backward(*args)


if _ext.ext_loaded() and hasattr(torch.ops.d2g_fast, "lpips_distance_multi"):
    torch.library.register_fake("d2g_fast::lpips_distance_multi")(_fake_multi_forward)
    torch.library.register_fake("d2g_fast::lpips_distance_multi_backward")(_fake_multi_backward)
    torch.library.register_autograd(
        "d2g_fast::lpips_distance_multi",
        _make_multi_backward(lambda *a: _cpp_multi_backward(*a)),
        setup_context=_multi_setup_context)

if _dispatch.triton_status()[0]:
    torch.library.register_autograd(
        "d2g_fast::lpips_distance_multi_triton",
        _make_multi_backward(lambda *a: torch.ops.d2g_fast.lpips_distance_multi_backward_triton(*a)),
        setup_context=_multi_setup_context)
