"""Triton kernels of the LatentLPIPS layer distance (same math as csrc/lpips_distance).

A program owns BLOCK_P pixels and walks the channels in BLOCK_C slices, accumulating the five
per-pixel sums of ``lpips_distance_math.h``; the (BLOCK_C, BLOCK_P) tiles follow the tensors'
strides, so planar (NCHW) and channels_last inputs are both read in one pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from d2g_fast.triton._common import poisoned_empty, poisoned_empty_like

EPS = 1e-8


@triton.jit
def _lpips_distance_fwd_kernel(
    a_ptr, b_ptr, w_ptr, map_ptr, stats_ptr,
    C, H, W, P,
    sa_n, sa_c, sa_h, sa_w, sb_n, sb_c, sb_h, sb_w,
    EPS_: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_mask = p < P
    x = p % W
    h = (p // W) % H
    n = p // (W * H)
    a_pix = n * sa_n + h * sa_h + x * sa_w
    b_pix = n * sb_n + h * sb_h + x * sb_w
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    s_aa = tl.zeros((BLOCK_P,), acc_dtype)
    s_bb = tl.zeros((BLOCK_P,), acc_dtype)
    s_waa = tl.zeros((BLOCK_P,), acc_dtype)
    s_wbb = tl.zeros((BLOCK_P,), acc_dtype)
    s_wab = tl.zeros((BLOCK_P,), acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        c_mask = c < C
        mask = c_mask[:, None] & p_mask[None, :]
        a = tl.load(a_ptr + c[:, None] * sa_c + a_pix[None, :], mask=mask, other=0.0).to(acc_dtype)
        b = tl.load(b_ptr + c[:, None] * sb_c + b_pix[None, :], mask=mask, other=0.0).to(acc_dtype)
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)[:, None]
        s_aa += tl.sum(a * a, axis=0)
        s_bb += tl.sum(b * b, axis=0)
        s_waa += tl.sum(w * a * a, axis=0)
        s_wbb += tl.sum(w * b * b, axis=0)
        s_wab += tl.sum(w * a * b, axis=0)
    i0 = 1.0 / tl.sqrt(s_aa + EPS_)
    i1 = 1.0 / tl.sqrt(s_bb + EPS_)
    cross = i0 * i1 * s_wab
    s0 = i0 * i0 * s_waa - cross
    s1 = i1 * i1 * s_wbb - cross
    tl.store(map_ptr + p, s0 + s1, mask=p_mask)
    tl.store(stats_ptr + p, i0, mask=p_mask)
    tl.store(stats_ptr + P + p, i1, mask=p_mask)
    tl.store(stats_ptr + 2 * P + p, s0, mask=p_mask)
    tl.store(stats_ptr + 3 * P + p, s1, mask=p_mask)


@triton.jit
def _lpips_distance_bwd_kernel(
    self_ptr, other_ptr, out_ptr, w_ptr, pgrad_ptr, iself_ptr, iother_ptr, sself_ptr,
    C, H, W, P,
    ss_n, ss_c, ss_h, ss_w, so_n, so_c, so_h, so_w, sd_n, sd_c, sd_h, sd_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    p_mask = p < P
    c_mask = c < C
    mask = c_mask[:, None] & p_mask[None, :]
    x = p % W
    h = (p // W) % H
    n = p // (W * H)
    acc_dtype = tl.float64 if self_ptr.dtype.element_ty == tl.float64 else tl.float32
    a = tl.load(self_ptr + c[:, None] * ss_c + (n * ss_n + h * ss_h + x * ss_w)[None, :],
                mask=mask, other=0.0).to(acc_dtype)
    b = tl.load(other_ptr + c[:, None] * so_c + (n * so_n + h * so_h + x * so_w)[None, :],
                mask=mask, other=0.0).to(acc_dtype)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)[:, None]
    g = tl.load(pgrad_ptr + p, mask=p_mask, other=0.0)[None, :]
    ia = tl.load(iself_ptr + p, mask=p_mask, other=0.0)[None, :]
    ib = tl.load(iother_ptr + p, mask=p_mask, other=0.0)[None, :]
    sa = tl.load(sself_ptr + p, mask=p_mask, other=0.0)[None, :]
    A = a * ia
    B = b * ib
    grad = 2.0 * g * ia * (w * (A - B) - A * sa)
    dst = c[:, None] * sd_c + (n * sd_n + h * sd_h + x * sd_w)[None, :]
    tl.store(out_ptr + dst, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _blocks(C: int) -> tuple[int, int]:
    block_c = min(64, triton.next_power_of_2(C))
    return block_c, max(16, 4096 // block_c)


@triton_op("d2g_fast::lpips_distance_triton", mutates_args={})
def lpips_distance_triton(f0: torch.Tensor, f1: torch.Tensor, weight: torch.Tensor,
                          spatial: bool) -> tuple[torch.Tensor, torch.Tensor]:
    N, C, H, W = f0.shape
    P = N * H * W
    acc = _acc_dtype(f0)
    w = weight.to(acc).contiguous()
    dist_map = poisoned_empty((N, 1, H, W), dtype=acc, device=f0.device)
    stats = poisoned_empty((4, N, H, W), dtype=acc, device=f0.device)
    block_c, block_p = _blocks(C)
    grid = (triton.cdiv(P, block_p),)
    wrap_triton(_lpips_distance_fwd_kernel)[grid](
        f0, f1, w, dist_map, stats, C, H, W, P, *f0.stride(), *f1.stride(),
        EPS_=EPS, BLOCK_C=block_c, BLOCK_P=block_p)
    return (dist_map if spatial else dist_map.flatten(1).mean(1)), stats


@triton_op("d2g_fast::lpips_distance_backward_triton", mutates_args={})
def lpips_distance_backward_triton(grad: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor,
                                   weight: torch.Tensor, stats: torch.Tensor, spatial: bool,
                                   need_f0: bool, need_f1: bool) -> tuple[torch.Tensor, torch.Tensor]:
    N, C, H, W = f0.shape
    P = N * H * W
    acc = stats.dtype
    w = weight.to(acc).contiguous()
    if spatial:
        pixel_grad = grad.to(acc).reshape(N, H, W).contiguous()
    else:
        pixel_grad = (grad.to(acc) / (H * W)).view(N, 1, 1).expand(N, H, W).contiguous()
    block_c, block_p = _blocks(C)
    grid = (triton.cdiv(P, block_p), triton.cdiv(C, block_c))
    outs = []
    for need, self_, other, i_self, i_other, s_self in (
            (need_f0, f0, f1, stats[0], stats[1], stats[2]),
            (need_f1, f1, f0, stats[1], stats[0], stats[3])):
        if not need:
            outs.append(f0.new_empty((0,)))
            continue
        out = poisoned_empty_like(self_)
        wrap_triton(_lpips_distance_bwd_kernel)[grid](
            self_, other, out, w, pixel_grad, i_self, i_other, s_self, C, H, W, P,
            *self_.stride(), *other.stride(), *out.stride(), BLOCK_C=block_c, BLOCK_P=block_p)
        outs.append(out)
    return outs[0], outs[1]
