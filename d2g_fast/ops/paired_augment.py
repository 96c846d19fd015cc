"""Public op: the paired latent augmentation (one per-sample transform applied to x and y).

``paired_augment(x, y, params, *, impl="auto") -> (x_aug, y_aug)`` applies the transform described
by an :class:`~d2g_fast.augment_params.AugmentParams` identically to ``x`` and ``y``
(N, C, H, W; float32 / float64 / float16 / bfloat16; any strides).  Gradients flow to x and y.
Every kernel reads the parameters, the reflect-padding margins included, from the packed
(N, 17) float64 tensor, so device-drawn parameters (AugmentParams.sample_on_device) never
cause a host synchronisation.

Backends: "ref" (d2g_fast/ref/paired_augment.py), "cpu" and "cuda" (C++ op
``torch.ops.d2g_fast.paired_augment``), "triton" (``torch.ops.d2g_fast.paired_augment_triton``,
when registered).  For fixed parameters the op is linear in x, so the backward op applies the
transposed operator; its own backward is the forward without the brightness offset (flag 8), so
double backward works too.  Everything is registered with torch.library (autograd + fake).
"""
from __future__ import annotations

import torch

from d2g_fast import _dispatch, _ext
from d2g_fast.augment_params import AugmentParams
from d2g_fast.ref import paired_augment as _ref

OP = "paired_augment"
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LINEAR_FLAG = 8


def _check_inputs(x, y, params) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{OP}: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{OP}: {name} must be float32/float64/float16/bfloat16, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{OP}: {name} must not be empty, got shape {tuple(t.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"{OP}: x and y must have the same shape, got x {tuple(x.shape)} and "
                         f"y {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"{OP}: x and y must have the same dtype, got x {x.dtype} and y {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{OP}: x and y must be on the same device, got x on {x.device} and y on "
                         f"{y.device}")
    if not isinstance(params, AugmentParams):
        raise TypeError(f"{OP}: params must be an AugmentParams, got {type(params).__name__}")
    params.check(x, "x")


def _has_cpp_op() -> bool:
    return _ext.ext_loaded() and hasattr(torch.ops.d2g_fast, OP)


def paired_augment(x: torch.Tensor, y: torch.Tensor, params: AugmentParams, *,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the per-sample transform ``params`` identically to ``x`` and ``y``.

    Args:
        x, y: latents (N, C, H, W) of one floating dtype and device (any memory layout);
            differentiable in both.
        params: the N per-sample transforms (:class:`d2g_fast.AugmentParams`, drawn on the host
            or on the device), for this N, H, W.
        impl: "auto" | "ref" | "cpu" | "cuda" | "triton" (keyword-only).

    Returns:
        (x_aug, y_aug), each (N, C, H, W) in the input's dtype; an output requires grad only
        where its own input does. Identity parameters return copies of the inputs.
    """
    _check_inputs(x, y, params)
    backend = _dispatch.resolve_impl(OP, impl, x.device)
    if backend in ("cpu", "cuda") and not _has_cpp_op():
        raise RuntimeError(f"{OP}: impl={backend!r} cannot run: the compiled extension has no "
                           f"'{OP}' op (rebuild it: make build)")
    if params.is_identity:
        return x.clone(), y.clone()
    if backend == "ref":
        x_aug, y_aug = _ref.paired_augment(x, y, params)  # rebuilds host fields of device-drawn params
    else:
        packed = params.packed(x.device, torch.float64)
        op = (torch.ops.d2g_fast.paired_augment_triton if backend == "triton"
              else torch.ops.d2g_fast.paired_augment)
        x_aug, y_aug = op(x, y, packed, params.flags())
    # Autograd marks every output of a custom op as requiring grad when any input does, but each
    # output depends on its own input only: without this, the target branch of a loss (y needs no
    # gradient) would run through autograd, with a whole backward pass through the trunk, for
    # nothing.
    if x_aug.requires_grad and not x.requires_grad:
        x_aug = x_aug.detach()
    if y_aug.requires_grad and not y.requires_grad:
        y_aug = y_aug.detach()
    return x_aug, y_aug


# ---------------------------------------------------------------------------------------------
# torch.library registrations: autograd (the transposed operator), fake kernels.

def _fake_apply(x, y, params, flags):
    x_out = torch.empty_like(x, memory_format=torch.preserve_format)
    y_out = torch.empty_like(y, memory_format=torch.preserve_format) if y is not None else x.new_empty((0,))
    return x_out, y_out


def _setup_context(ctx, inputs, output):
    _, y, params, flags = inputs
    ctx.save_for_backward(params)
    ctx.flags, ctx.has_y = int(flags), y is not None


def _make_backward(apply_transposed):
    """Backward of a linear op applied to (a, b?): apply_transposed(ga, gb?, params, flags)
    applies the transposed operator to one or two gradients in one launch."""
    def backward(ctx, grad_a, grad_b):
        (params,) = ctx.saved_tensors
        need_a = ctx.needs_input_grad[0]
        need_b = ctx.has_y and ctx.needs_input_grad[1]
        ga = gb = None
        if need_a and need_b:
            ga, gb = apply_transposed(grad_a, grad_b, params, ctx.flags)
        elif need_a:
            ga = apply_transposed(grad_a, None, params, ctx.flags)[0]
        elif need_b:
            gb = apply_transposed(grad_b, None, params, ctx.flags)[0]
        return ga, gb, None, None
    return backward


def _register(prefix: str, suffix: str) -> None:
    fwd = getattr(torch.ops.d2g_fast, prefix + suffix)
    bwd = getattr(torch.ops.d2g_fast, prefix + "_backward" + suffix)
    if suffix == "":  # triton_op registers its own fake kernel
        torch.library.register_fake(f"d2g_fast::{prefix}")(_fake_apply)
        torch.library.register_fake(f"d2g_fast::{prefix}_backward")(_fake_apply)
    torch.library.register_autograd(
        f"d2g_fast::{prefix}{suffix}",
        _make_backward(lambda ga, gb, p, f: bwd(ga, gb, p, f)),
        setup_context=_setup_context)
    # The backward is linear in the gradients; its transpose is the forward's linear part.
    torch.library.register_autograd(
        f"d2g_fast::{prefix}_backward{suffix}",
        _make_backward(lambda ga, gb, p, f: fwd(ga, gb, p, f | LINEAR_FLAG)),
        setup_context=_setup_context)


if _has_cpp_op():
    _register(OP, "")

if _ext.ext_loaded() and hasattr(torch.ops.d2g_fast, "augment_params_sample_on_device_"):
    @torch.library.register_fake("d2g_fast::augment_params_sample_on_device_")
    def _fake_sample(out, C, H, W, preset_flags, p, generator=None, seed=None):
        return None

if _dispatch.triton_status()[0]:
    from d2g_fast.triton import paired_augment as _triton_impl  # noqa: F401  (registers ops)
    _register(OP, "_triton")
