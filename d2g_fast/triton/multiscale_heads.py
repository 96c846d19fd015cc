"""Triton kernels of the fused multi-scale discriminator heads (same math as
csrc/multiscale_heads/multiscale_heads_math.h; definition in d2g_fast/ref/multiscale_heads.py).

One launch per head and direction (the CUDA kernel runs all heads in one launch). A program
owns BLOCK_P pixels of one sample and walks the channels in BLOCK_C slices: twice in the
forward (moments; then the logits and the backward's channel means m1, m2, see
csrc/multiscale_heads/multiscale_heads_math.h), once in the backward (gradients). Small maps with
many channels get fewer pixels and wider channel slices per program (_blocks), so that they have
more programs and shorter loops. Tiles follow the tensors' strides, so planar, channels_last and
non-contiguous features are read in place. Per-program partial sums (loss, logits, bias and
weight gradients) are reduced by torch ops afterwards: no atomics, results are deterministic.
Nothing is copied to the host: the bias and grad_loss are read by the kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from d2g_fast.triton._common import poisoned_empty, poisoned_empty_like


@triton.jit
def _sigmoid(x):
    s = 1.0 / (1.0 + tl.exp(-x))
    return s


@triton.jit
def _heads_fwd_kernel(
    f_ptr, w_ptr, stats_ptr, loss_part_ptr, logit_part_ptr, target_ptr,
    bias_ptr, head, eps, C, H, W, N, tiles,
    s_n, s_c, s_h, s_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    HW = H * W
    p = tile.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_mask = p < HW
    pix = n * s_n + (p // W) * s_h + (p % W) * s_w
    acc_dtype = tl.float64 if f_ptr.dtype.element_ty == tl.float64 else tl.float32
    shift = tl.load(f_ptr + pix, mask=p_mask, other=0.0).to(acc_dtype)
    s1 = tl.zeros((BLOCK_P,), acc_dtype)
    s2 = tl.zeros((BLOCK_P,), acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (c < C)[:, None] & p_mask[None, :]
        x = tl.load(f_ptr + c[:, None] * s_c + pix[None, :], mask=mask, other=0.0).to(acc_dtype)
        d = tl.where(mask, x - shift[None, :], 0.0)
        s1 += tl.sum(d, axis=0)
        s2 += tl.sum(d * d, axis=0)
    m = s1 / C
    var = tl.maximum(s2 / C - m * m, 0.0)
    mean = shift + m
    rstd = 1.0 / tl.sqrt(var + eps)
    logit = tl.zeros((BLOCK_P,), acc_dtype) + tl.load(bias_ptr + head).to(acc_dtype)
    m1 = tl.zeros((BLOCK_P,), acc_dtype)
    m2 = tl.zeros((BLOCK_P,), acc_dtype)
    # Second pass in reverse slice order: the slices read last are the likeliest still cached.
    slices = tl.cdiv(C, BLOCK_C)
    for i in range(0, slices):
        c = (slices - 1 - i) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        c_mask = c < C
        mask = c_mask[:, None] & p_mask[None, :]
        x = tl.load(f_ptr + c[:, None] * s_c + pix[None, :], mask=mask, other=0.0).to(acc_dtype)
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
        xhat = (x - mean[None, :]) * rstd[None, :]
        s = _sigmoid(xhat)
        w_dsilu = w[:, None] * (s * (1.0 + xhat * (1.0 - s)))  # w silu'(xhat); 0 where masked
        logit += tl.sum(w[:, None] * xhat * s, axis=0)
        m1 += tl.sum(w_dsilu, axis=0)
        m2 += tl.sum(w_dsilu * xhat, axis=0)
    plane = N * HW
    base = n * HW + p
    tl.store(stats_ptr + base, logit, mask=p_mask)
    tl.store(stats_ptr + plane + base, mean, mask=p_mask)
    tl.store(stats_ptr + 2 * plane + base, rstd, mask=p_mask)
    tl.store(stats_ptr + 3 * plane + base, m1 / C, mask=p_mask)
    tl.store(stats_ptr + 4 * plane + base, m2 / C, mask=p_mask)
    t = tl.load(target_ptr + n).to(acc_dtype)
    z = -t * logit
    sp = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
    tl.store(loss_part_ptr + pid, tl.sum(tl.where(p_mask, sp, 0.0), axis=0))
    tl.store(logit_part_ptr + pid, tl.sum(tl.where(p_mask, logit, 0.0), axis=0))


@triton.jit
def _heads_bwd_kernel(
    f_ptr, w_ptr, stats_ptr, target_ptr, grad_ptr, dw_part_ptr, db_part_ptr,
    grad_loss_ptr, loss_scale, score_grad_ptr, C, H, W, N, tiles,
    s_n, s_c, s_h, s_w, g_n, g_c, g_h, g_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    HW = H * W
    p = tile.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_mask = p < HW
    h = p // W
    x_ = p % W
    pix = n * s_n + h * s_h + x_ * s_w
    gpix = n * g_n + h * g_h + x_ * g_w
    acc_dtype = tl.float64 if f_ptr.dtype.element_ty == tl.float64 else tl.float32
    plane = N * HW
    base = n * HW + p
    logit = tl.load(stats_ptr + base, mask=p_mask, other=0.0)
    mean = tl.load(stats_ptr + plane + base, mask=p_mask, other=0.0)
    rstd = tl.load(stats_ptr + 2 * plane + base, mask=p_mask, other=0.0)
    m1 = tl.load(stats_ptr + 3 * plane + base, mask=p_mask, other=0.0)
    m2 = tl.load(stats_ptr + 4 * plane + base, mask=p_mask, other=0.0)
    t = tl.load(target_ptr + n).to(acc_dtype)
    score_grad = tl.load(score_grad_ptr + n).to(acc_dtype)
    grad_loss = tl.load(grad_loss_ptr).to(acc_dtype)
    # d softplus(-t l)/dl = -t sigmoid(-t l)
    g = grad_loss * loss_scale * (-t) / (1.0 + tl.exp(t * logit)) + score_grad
    g = tl.where(p_mask, g, 0.0)
    g_rstd = g * rstd
    # One pass: df = r g (w silu'(xhat) - m1 - xhat m2), the channel means m1, m2 from the forward.
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        c_mask = c < C
        mask = c_mask[:, None] & p_mask[None, :]
        x = tl.load(f_ptr + c[:, None] * s_c + pix[None, :], mask=mask, other=0.0).to(acc_dtype)
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
        xhat = (x - mean[None, :]) * rstd[None, :]
        s = _sigmoid(xhat)
        w_dsilu = w[:, None] * (s * (1.0 + xhat * (1.0 - s)))
        df = g_rstd[None, :] * (w_dsilu - m1[None, :] - xhat * m2[None, :])
        tl.store(grad_ptr + c[:, None] * g_c + gpix[None, :], df.to(grad_ptr.dtype.element_ty),
                 mask=mask)
        dw = tl.sum(tl.where(mask, g[None, :] * xhat * s, 0.0), axis=1)
        tl.store(dw_part_ptr + pid.to(tl.int64) * C + c, dw, mask=c_mask)
    tl.store(db_part_ptr + pid, tl.sum(g, axis=0))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


STAT_ROWS = 5  # logit, mean, rstd, m1, m2 per pixel
MAX_SLICES = 32  # channel slices a program walks before a small map's tile is narrowed


def _blocks(C: int, HW: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of one head: up to 64 pixels times 32 channels; a small map with many
    channels (8x8 with C = 2560) trades pixels for channels (down to 16 x 128), which gives the
    head 4x the programs and 1/4 the loop trips."""
    block_p = max(16, min(64, triton.next_power_of_2(HW)))
    block_c = min(triton.next_power_of_2(C), max(32, 2048 // block_p))
    while block_p > 16 and triton.cdiv(C, block_c) > MAX_SLICES:
        block_p //= 2
        block_c = min(triton.next_power_of_2(C), 2 * block_c)
    return block_c, block_p


@triton_op("d2g_fast::multiscale_heads_triton", mutates_args={})
def multiscale_heads_triton(features: list[torch.Tensor], weights: list[torch.Tensor],
                            bias: torch.Tensor, target: torch.Tensor, head_weights: list[float],
                            eps: float) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    acc = _acc_dtype(features[0])
    N = target.shape[0]
    tgt = target.to(acc).contiguous()
    bias_acc = bias.detach().to(acc).contiguous()
    losses, scores, stats = [], [], []
    for k, (f, w) in enumerate(zip(features, weights)):
        _, C, H, W = f.shape
        HW = H * W
        block_c, block_p = _blocks(C, HW)
        tiles = triton.cdiv(HW, block_p)
        st = poisoned_empty((STAT_ROWS, N, H, W), dtype=acc, device=f.device)
        loss_part = poisoned_empty((N * tiles,), dtype=acc, device=f.device)
        logit_part = poisoned_empty((N * tiles,), dtype=acc, device=f.device)
        wrap_triton(_heads_fwd_kernel)[(N * tiles,)](
            f, w.to(acc).contiguous(), st, loss_part, logit_part, tgt, bias_acc, k, eps,
            C, H, W, N, tiles, *f.stride(), BLOCK_C=block_c, BLOCK_P=block_p)
        losses.append(loss_part.sum() * (head_weights[k] / (N * HW)))
        scores.append(logit_part.view(N, tiles).sum(1) / HW)
        stats.append(st)
    return torch.stack(losses).sum(), torch.stack(scores), stats


@triton_op("d2g_fast::multiscale_heads_backward_triton", mutates_args={})
def multiscale_heads_backward_triton(
        grad_loss: torch.Tensor, grad_scores: torch.Tensor, features: list[torch.Tensor],
        weights: list[torch.Tensor], target: torch.Tensor, head_weights: list[float], eps: float,
        stats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    acc = stats[0].dtype
    N = target.shape[0]
    tgt = target.to(acc).contiguous()
    gl = grad_loss.detach().to(acc).reshape(1).contiguous()
    gs = grad_scores.to(acc)
    grad_features, grad_weights, grad_bias = [], [], []
    for k, (f, w) in enumerate(zip(features, weights)):
        _, C, H, W = f.shape
        HW = H * W
        block_c, block_p = _blocks(C, HW)
        tiles = triton.cdiv(HW, block_p)
        out = poisoned_empty_like(f)
        dw_part = poisoned_empty((N * tiles, C), dtype=acc, device=f.device)
        db_part = poisoned_empty((N * tiles,), dtype=acc, device=f.device)
        score_grad = (gs[k] / HW).contiguous()
        wrap_triton(_heads_bwd_kernel)[(N * tiles,)](
            f, w.to(acc).contiguous(), stats[k], tgt, out, dw_part, db_part,
            gl, head_weights[k] / (N * HW), score_grad, C, H, W, N, tiles,
            *f.stride(), *out.stride(), BLOCK_C=block_c, BLOCK_P=block_p)
        grad_features.append(out)
        grad_weights.append(dw_part.sum(0).to(w.dtype))
        grad_bias.append(db_part.sum())
    return grad_features, grad_weights, torch.stack(grad_bias)
