"""Fused multi-scale discriminator heads: the public op.

``multiscale_heads(features, weights, bias, target, head_weights, eps=1e-5, *, impl="auto")``
runs K readout heads (per pixel: LayerNorm over channels without affine -> SiLU -> 1x1 conv to
one logit, ``weights[k]`` (C_k,), ``bias`` (K,)) and the non-saturating GAN loss

    loss   = sum_k head_weights[k] * mean_{n,h,w} softplus(-target[n] * logit_k[n, h, w])
    scores = (K, N) spatial mean logit per head and sample

in one call (one parallel loop on the CPU; on the GPU one kernel launch for all heads, up to 24,
plus one small finishing launch, forward and backward alike, and no host synchronisation). The
forward saves five numbers per pixel (logit, mean, rstd and two channel means that do not depend
on the upstream gradient), so the backward reads the features only once. Gradients flow to
``features``, ``weights`` and ``bias``.

Double backward (R1 differentiates D's output w.r.t. its input and then minimises that
gradient): the fused backward kernel is not itself differentiable. When autograd builds a graph
of the gradient (``create_graph=True``, as in ``d2g_fast.losses.r1_penalty``), the backward
switches automatically to the reference math, recomputed from the saved inputs, so the second
derivative is exact; plain training steps keep the fused backward. Tested with gradgradcheck.

Backends: "ref" (d2g_fast/ref), "cpu" and "cuda" (C++ op torch.ops.d2g_fast.multiscale_heads,
all heads in one launch), "triton" (torch.ops.d2g_fast.multiscale_heads_triton, one launch per
head). "auto" on a GPU takes cuda, then triton, then ref.

Arguments are validated here, once: the public op and the fake kernels (which every traced call
passes through) run the same checks, whose messages name the argument; the C++ entry points
keep only the checks that memory safety needs (csrc/common/checks.h).
"""
from __future__ import annotations

from typing import Sequence

import torch

from d2g_fast import _dispatch, _ext
from d2g_fast._dispatch import accumulation_dtype
from d2g_fast.ref.multiscale_heads import multiscale_heads as multiscale_heads_ref

OP = "multiscale_heads"
_CUDA_ORDER = ("cuda", "triton", "ref")
# The backends that run the C++ kernels, and so have their channel limit (max_channels_kernel).
_KERNEL_BACKENDS = ("cpu", "cuda")


def max_channels_kernel() -> int:
    """The most channels a head may have on the C++ kernels (kMaxChannelsCpu in
    csrc/multiscale_heads/multiscale_heads_math.h: their fast SiLU exp has no range clamp and is
    exact only while |LayerNorm output| <= sqrt(C - 1) < 84). Needs the extension."""
    return _ext.constant("multiscale_heads_max_channels")


def _stat_rows() -> int:
    """Per-pixel stats the C++ forward saves for the backward: logit, mean, rstd, and the channel
    means m1, m2 that make the backward one pass (kStatRows in multiscale_heads_math.h)."""
    return _ext.constant("multiscale_heads_stat_rows")


def _check_channels_for_kernels(features) -> None:
    """The C++ kernels' channel limit, for an explicit impl='cpu' / 'cuda' or a traced call."""
    for i, f in enumerate(features):
        if f.shape[1] > max_channels_kernel():
            raise ValueError(
                f"{OP}: 'features[{i}]' has {f.shape[1]} channels; the C++ kernels (impl='cpu', "
                f"'cuda') support at most {max_channels_kernel()} (their SiLU exp is exact only "
                f"for |LayerNorm output| < 84); use impl='auto', 'ref' or 'triton'")


def _check_args(features, weights, bias, target, head_weights, eps):
    if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError(f"{OP}: 'features' must be a list of tensors, got {type(features).__name__}")
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"{OP}: 'weights' must be a list of tensors, got {type(weights).__name__}")
    k = len(features)
    if k == 0:
        raise ValueError(f"{OP}: 'features' must hold at least one tensor")
    if len(weights) != k:
        raise ValueError(f"{OP}: 'weights' must hold one tensor per feature map ({k}), "
                         f"got {len(weights)}")
    if len(head_weights) != k:
        raise ValueError(f"{OP}: 'head_weights' must hold one number per feature map ({k}), "
                         f"got {len(head_weights)}")
    if not eps > 0:
        raise ValueError(f"{OP}: 'eps' must be positive, got {eps}")
    for name, t in [("bias", bias), ("target", target)] + \
            [(f"features[{i}]", f) for i, f in enumerate(features)] + \
            [(f"weights[{i}]", w) for i, w in enumerate(weights)]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{OP}: '{name}' must be a floating-point tensor, got {t.dtype}")
    if target.dim() != 1 or target.shape[0] == 0:
        raise ValueError(f"{OP}: 'target' must have shape (N,) with N > 0, got {tuple(target.shape)}")
    n = target.shape[0]
    dev = features[0].device
    for i, (f, w) in enumerate(zip(features, weights)):
        if f.dim() != 4:
            raise ValueError(f"{OP}: 'features[{i}]' must have shape (N, C, H, W), got "
                             f"{tuple(f.shape)}")
        if f.shape[0] != n:
            raise ValueError(f"{OP}: 'features[{i}]' has batch {f.shape[0]} but 'target' has {n}")
        if min(f.shape[1:]) == 0:
            raise ValueError(f"{OP}: 'features[{i}]' must have C, H, W > 0, got {tuple(f.shape)}")
        if f.dtype != features[0].dtype:
            raise TypeError(f"{OP}: every 'features' tensor must have the dtype of 'features[0]' "
                            f"({features[0].dtype}), 'features[{i}]' has {f.dtype}")
        if tuple(w.shape) != (f.shape[1],):
            raise ValueError(f"{OP}: 'weights[{i}]' must have shape (C,) = ({f.shape[1]},), got "
                             f"{tuple(w.shape)}")
        for name, t in ((f"features[{i}]", f), (f"weights[{i}]", w)):
            if t.device != dev:
                raise ValueError(f"{OP}: 'features[0]' is on {dev} but '{name}' is on {t.device}")
    if tuple(bias.shape) != (k,):
        raise ValueError(f"{OP}: 'bias' must have shape (K,) = ({k},), got {tuple(bias.shape)}")
    for name, t in (("bias", bias), ("target", target)):
        if t.device != dev:
            raise ValueError(f"{OP}: 'features[0]' is on {dev} but '{name}' is on {t.device}")


def multiscale_heads(features: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                     bias: torch.Tensor, target: torch.Tensor, head_weights: Sequence[float],
                     eps: float = 1e-5, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """K discriminator readout heads and their non-saturating loss, in one call.

    Args:
        features (list of K Tensor[N, C_k, H_k, W_k]): the tapped feature maps; one floating
            dtype, any layout.
        weights (list of K Tensor[C_k]): each head's 1x1 logit weights.
        bias (Tensor[K]): each head's logit bias.
        target (Tensor[N]): +1 for real samples, -1 for fake ones.
        head_weights (list of K float): each head's share of the loss.
        eps (float): the LayerNorm epsilon (> 0).
        impl (str): ``"auto" | "ref" | "cpu" | "cuda" | "triton"`` (see d2g_fast._dispatch);
            "auto" takes the reference for heads wider than the C++ kernels support.

    Returns:
        (loss, scores): loss Tensor[] (the weighted sum over heads of the mean softplus
        (-target * logit)) and scores Tensor[K, N] (spatial-mean logits), float32 (float64 for
        float64 features). Differentiable w.r.t. features, weights and bias, twice.
    """
    _check_args(features, weights, bias, target, head_weights, eps)
    head_weights = [float(w) for w in head_weights]
    backend = _dispatch.resolve_impl(OP, impl, features[0].device, cuda_order=_CUDA_ORDER)
    if backend in _KERNEL_BACKENDS:
        if impl == "auto" and max(f.shape[1] for f in features) > max_channels_kernel():
            backend = "ref"
        else:
            _check_channels_for_kernels(features)
    if backend == "ref":
        return multiscale_heads_ref(features, weights, bias, target, head_weights, float(eps))
    op = (torch.ops.d2g_fast.multiscale_heads_triton if backend == "triton"
          else torch.ops.d2g_fast.multiscale_heads)
    loss, scores, _stats = op(
        list(features), list(weights), bias, target, head_weights, float(eps))
    return loss, scores


# ---------------------------------------------------------------------------------------------
# torch.library registrations: autograd formula (with the reference double backward) and fake
# kernels for the C++ op.

def _setup_context(ctx, inputs, output):
    features, weights, bias, target, head_weights, eps = inputs
    k = len(features)
    ctx.k = k
    ctx.head_weights = list(head_weights)
    ctx.eps = eps
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(*features, *weights, bias, target, *output[2])


def _make_backward(backward_op):
    def backward(ctx, grad_loss, grad_scores, _grad_stats):
        k = ctx.k
        saved = ctx.saved_tensors
        features, weights = list(saved[:k]), list(saved[k:2 * k])
        bias, target, stats = saved[2 * k], saved[2 * k + 1], list(saved[2 * k + 2:])
        # For the Tensor[] inputs torch.library gives one bool per element (a list of False is
        # truthy: never test it directly).
        need_f, need_w = (list(n) if isinstance(n, (list, tuple)) else [bool(n)] * k
                          for n in ctx.needs_input_grad[:2])
        need_b = bool(ctx.needs_input_grad[2])
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=stats[0].dtype, device=stats[0].device)
        if grad_scores is None:
            grad_scores = torch.zeros((k, target.shape[0]), dtype=stats[0].dtype,
                                      device=stats[0].device)
        if torch.is_grad_enabled():
            # A graph of this gradient is being built (double backward, e.g. R1): differentiate
            # the reference, which autograd can differentiate again.
            return _reference_backward(features, weights, bias, target, ctx.head_weights,
                                       ctx.eps, grad_loss, grad_scores)
        gf, gw, gb = backward_op(grad_loss, grad_scores, features, weights, target,
                                 ctx.head_weights, ctx.eps, stats)
        return ([g if need else None for g, need in zip(gf, need_f)],
                [g if need else None for g, need in zip(gw, need_w)],
                gb.to(ctx.bias_dtype) if need_b else None, None, None, None)
    return backward


def _reference_backward(features, weights, bias, target, head_weights, eps, grad_loss,
                        grad_scores):
    inputs = list(features) + list(weights) + [bias]
    with torch.enable_grad():
        # Differentiate with respect to fresh aliases, not the inputs themselves: features can
        # depend on one another (a skip tap is the concatenation of another tap), and a gradient
        # taken w.r.t. the inputs would also count the paths from one input into another.
        # Inputs that do not require grad (e.g. frozen heads) get a detached alias.
        leaves = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True)
                  for t in inputs]
        k = len(features)
        loss, scores = multiscale_heads_ref(leaves[:k], leaves[k:2 * k], leaves[2 * k], target,
                                            head_weights, eps)
        grads = torch.autograd.grad((loss, scores), leaves, (grad_loss.to(loss.dtype),
                                                             grad_scores.to(scores.dtype)),
                                    create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(grads, inputs)]
    k = len(features)
    return grads[:k], grads[k:2 * k], grads[2 * k], None, None, None


def _fake_forward(features, weights, bias, target, head_weights, eps):
    _check_args(features, weights, bias, target, head_weights, eps)
    _check_channels_for_kernels(features)
    acc = accumulation_dtype(features[0].dtype)
    n = target.shape[0]
    loss = features[0].new_empty((), dtype=acc)
    scores = features[0].new_empty((len(features), n), dtype=acc)
    stats = [f.new_empty((_stat_rows(), n, f.shape[2], f.shape[3]), dtype=acc) for f in features]
    return loss, scores, stats


def _fake_backward(grad_loss, grad_scores, features, weights, target, head_weights, eps, stats):
    acc = stats[0].dtype
    return ([torch.empty_like(f, memory_format=torch.contiguous_format) for f in features],
            [torch.empty_like(w) for w in weights],
            grad_scores.new_empty((len(features),), dtype=acc))


if _ext.ext_loaded() and hasattr(torch.ops.d2g_fast, "multiscale_heads"):
    torch.library.register_fake("d2g_fast::multiscale_heads")(_fake_forward)
    torch.library.register_fake("d2g_fast::multiscale_heads_backward")(_fake_backward)
    torch.library.register_autograd(
        "d2g_fast::multiscale_heads",
        _make_backward(lambda *a: torch.ops.d2g_fast.multiscale_heads_backward(*a)),
        setup_context=_setup_context)

if _dispatch.triton_status()[0]:
    from d2g_fast.triton import multiscale_heads as _triton_impl  # noqa: F401  (registers the ops)

    torch.library.register_autograd(
        "d2g_fast::multiscale_heads_triton",
        _make_backward(lambda *a: torch.ops.d2g_fast.multiscale_heads_backward_triton(*a)),
        setup_context=_setup_context)
