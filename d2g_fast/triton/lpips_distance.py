"""Triton kernels of the LatentLPIPS layer distance (same math as csrc/lpips_distance).

A program owns BLOCK_P pixels and walks the channels in BLOCK_C slices twice (the two-pass,
cancellation-free math of ``lpips_distance_math.h``: norms, then the distance sums); the
(BLOCK_C, BLOCK_P) tiles follow the tensors' strides, so planar (NCHW) and channels_last
inputs are both read directly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from d2g_fast.triton._common import poisoned_empty, poisoned_empty_like

EPS = 1e-8


@triton.jit
def _pixel_sums(a_ptr, b_ptr, w_ptr, a_pix, b_pix, pix_mask, C, sa_c, sb_c,
                EPS_: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The cancellation-free two-pass math of lpips_distance_math.h for BLOCK_P pixels (their
    offsets a_pix, b_pix): returns i0 = 1/|a|, i1 = 1/|b|, di = i0 - i1, the distance d and the
    backward's s0, s1."""
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    # Pass 1: |a|^2, |b|^2, |b|^2 - |a|^2 (as sum (b - a)(b + a), without cancellation).
    s_aa = tl.zeros((BLOCK_P,), acc_dtype)
    s_bb = tl.zeros((BLOCK_P,), acc_dtype)
    s_dd = tl.zeros((BLOCK_P,), acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (c < C)[:, None] & pix_mask[None, :]
        a = tl.load(a_ptr + c[:, None] * sa_c + a_pix[None, :], mask=mask, other=0.0).to(acc_dtype)
        b = tl.load(b_ptr + c[:, None] * sb_c + b_pix[None, :], mask=mask, other=0.0).to(acc_dtype)
        s_aa += tl.sum(a * a, axis=0)
        s_bb += tl.sum(b * b, axis=0)
        s_dd += tl.sum((b - a) * (b + a), axis=0)
    ra = tl.sqrt(s_aa + EPS_)
    rb = tl.sqrt(s_bb + EPS_)
    i0 = 1.0 / ra
    i1 = 1.0 / rb
    di = s_dd * i0 * i1 / (ra + rb)  # i0 - i1 without cancellation
    # Pass 2 (the channels again, from cache): d, s0, s1 accumulated directly from
    # D = A - B = (a - b) i0 + b di.
    s_d = tl.zeros((BLOCK_P,), acc_dtype)
    s_0 = tl.zeros((BLOCK_P,), acc_dtype)
    s_1 = tl.zeros((BLOCK_P,), acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        c_mask = c < C
        mask = c_mask[:, None] & pix_mask[None, :]
        a = tl.load(a_ptr + c[:, None] * sa_c + a_pix[None, :], mask=mask, other=0.0).to(acc_dtype)
        b = tl.load(b_ptr + c[:, None] * sb_c + b_pix[None, :], mask=mask, other=0.0).to(acc_dtype)
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)[:, None]
        D = (a - b) * i0[None, :] + b * di[None, :]
        wD = w * D
        s_d += tl.sum(wD * D, axis=0)
        s_0 += tl.sum(wD * (a * i0[None, :]), axis=0)
        s_1 -= tl.sum(wD * (b * i1[None, :]), axis=0)
    return i0, i1, di, s_d, s_0, s_1


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
    i0, i1, di, s_d, s_0, s_1 = _pixel_sums(a_ptr, b_ptr, w_ptr, a_pix, b_pix, p_mask, C, sa_c, sb_c,
                                           EPS_, BLOCK_C, BLOCK_P)
    tl.store(map_ptr + p, s_d, mask=p_mask)
    tl.store(stats_ptr + p, i0, mask=p_mask)
    tl.store(stats_ptr + P + p, i1, mask=p_mask)
    tl.store(stats_ptr + 2 * P + p, di, mask=p_mask)
    tl.store(stats_ptr + 3 * P + p, s_0, mask=p_mask)
    tl.store(stats_ptr + 4 * P + p, s_1, mask=p_mask)


@triton.jit
def _lpips_distance_bwd_kernel(
    self_ptr, other_ptr, out_ptr, w_ptr, pgrad_ptr, iself_ptr, di_ptr, sself_ptr, di_sign,
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
    dia = di_sign * tl.load(di_ptr + p, mask=p_mask, other=0.0)[None, :]  # i_self - i_other
    sa = tl.load(sself_ptr + p, mask=p_mask, other=0.0)[None, :]
    D = (a - b) * ia + b * dia  # A_self - A_other, without cancellation
    grad = 2.0 * g * ia * (w * D - a * ia * sa)
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
    stats = poisoned_empty((5, N, H, W), dtype=acc, device=f0.device)
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
    # stats rows: [i0, i1, di = i0 - i1, s0, s1]; for f1 the sign of di flips.
    for need, self_, other, i_self, di_sign, s_self in (
            (need_f0, f0, f1, stats[0], 1.0, stats[3]),
            (need_f1, f1, f0, stats[1], -1.0, stats[4])):
        if not need:
            outs.append(f0.new_empty((0,)))
            continue
        out = poisoned_empty_like(self_)
        wrap_triton(_lpips_distance_bwd_kernel)[grid](
            self_, other, out, w, pixel_grad, i_self, stats[2], s_self, di_sign, C, H, W, P,
            *self_.stride(), *other.stride(), *out.stride(), BLOCK_C=block_c, BLOCK_P=block_p)
        outs.append(out)
    return outs[0], outs[1]


# =============================================================================================
# lpips_distance_multi: the cancellation-free two-pass math of lpips_distance_math.h, one launch
# per layer and direction (the CUDA kernel runs all layers in one launch). A forward program
# owns BLOCK_P pixels of one sample: pass 1 accumulates |a|^2, |b|^2, |b|^2 - |a|^2 (as
# sum (b - a)(b + a)), pass 2 re-reads the channels and accumulates d, s0, s1 directly; the
# program's distance sum goes to one slot of a partial buffer (no atomics).

@triton.jit
def _multi_fwd_kernel(
    a_ptr, b_ptr, w_ptr, stats_ptr, part_ptr,
    C, H, W, P, pix0, tiles,
    sa_n, sa_c, sa_h, sa_w, sb_n, sb_c, sb_h, sb_w,
    EPS_: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    HW = H * W
    q = tile.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    q_mask = q < HW
    h = q // W
    x = q % W
    a_pix = n * sa_n + h * sa_h + x * sa_w
    b_pix = n * sb_n + h * sb_h + x * sb_w
    i0, i1, di, s_d, s_0, s_1 = _pixel_sums(a_ptr, b_ptr, w_ptr, a_pix, b_pix, q_mask, C, sa_c, sb_c,
                                           EPS_, BLOCK_C, BLOCK_P)
    pix = pix0 + n * HW + q
    tl.store(stats_ptr + pix, i0, mask=q_mask)
    tl.store(stats_ptr + P + pix, i1, mask=q_mask)
    tl.store(stats_ptr + 2 * P + pix, di, mask=q_mask)
    tl.store(stats_ptr + 3 * P + pix, s_0, mask=q_mask)
    tl.store(stats_ptr + 4 * P + pix, s_1, mask=q_mask)
    tl.store(part_ptr + pid, tl.sum(tl.where(q_mask, s_d, 0.0), axis=0))


@triton.jit
def _multi_bwd_kernel(
    a_ptr, b_ptr, ga_ptr, gb_ptr, w_ptr, stats_ptr, g_ptr,
    C, H, W, P, pix0, NP,
    sa_n, sa_c, sa_h, sa_w, sb_n, sb_c, sb_h, sb_w,
    sga_n, sga_c, sga_h, sga_w, sgb_n, sgb_c, sgb_h, sgb_w,
    NEED_A: tl.constexpr, NEED_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    p_mask = p < NP
    c_mask = c < C
    mask = c_mask[:, None] & p_mask[None, :]
    x = p % W
    h = (p // W) % H
    n = p // (W * H)
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    a = tl.load(a_ptr + c[:, None] * sa_c + (n * sa_n + h * sa_h + x * sa_w)[None, :],
                mask=mask, other=0.0).to(acc_dtype)
    b = tl.load(b_ptr + c[:, None] * sb_c + (n * sb_n + h * sb_h + x * sb_w)[None, :],
                mask=mask, other=0.0).to(acc_dtype)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)[:, None]
    pix = pix0 + p
    g = tl.load(g_ptr + n, mask=p_mask, other=0.0)[None, :]
    i0 = tl.load(stats_ptr + pix, mask=p_mask, other=0.0)[None, :]
    i1 = tl.load(stats_ptr + P + pix, mask=p_mask, other=0.0)[None, :]
    di = tl.load(stats_ptr + 2 * P + pix, mask=p_mask, other=0.0)[None, :]
    wD = w * ((a - b) * i0 + b * di)
    if NEED_A:
        s0 = tl.load(stats_ptr + 3 * P + pix, mask=p_mask, other=0.0)[None, :]
        ga = 2.0 * g * i0 * (wD - a * i0 * s0)
        dst = c[:, None] * sga_c + (n * sga_n + h * sga_h + x * sga_w)[None, :]
        tl.store(ga_ptr + dst, ga.to(ga_ptr.dtype.element_ty), mask=mask)
    if NEED_B:
        s1 = tl.load(stats_ptr + 4 * P + pix, mask=p_mask, other=0.0)[None, :]
        gb = 2.0 * g * i1 * (-wD - b * i1 * s1)
        dst = c[:, None] * sgb_c + (n * sgb_n + h * sgb_h + x * sgb_w)[None, :]
        tl.store(gb_ptr + dst, gb.to(gb_ptr.dtype.element_ty), mask=mask)


def _multi_blocks(C: int, HW: int) -> tuple[int, int]:
    block_c, block_p = _blocks(C)
    return block_c, min(block_p, max(16, triton.next_power_of_2(HW)))


@triton_op("d2g_fast::lpips_distance_multi_triton", mutates_args={})
def lpips_distance_multi_triton(f0: list[torch.Tensor], f1: list[torch.Tensor],
                                weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    acc = _acc_dtype(f0[0])
    N = f0[0].shape[0]
    P = sum(a.shape[0] * a.shape[2] * a.shape[3] for a in f0)
    stats = poisoned_empty((5, P), dtype=acc, device=f0[0].device)
    dists, pix0 = [], 0
    for a, b, w in zip(f0, f1, weights):
        _, C, H, W = a.shape
        block_c, block_p = _multi_blocks(C, H * W)
        tiles = triton.cdiv(H * W, block_p)
        part = poisoned_empty((N * tiles,), dtype=acc, device=a.device)
        wrap_triton(_multi_fwd_kernel)[(N * tiles,)](
            a, b, w.to(acc).contiguous(), stats, part, C, H, W, P, pix0, tiles,
            *a.stride(), *b.stride(), EPS_=EPS, BLOCK_C=block_c, BLOCK_P=block_p)
        dists.append(part.view(N, tiles).sum(1) / (H * W))
        pix0 += N * H * W
    return torch.stack(dists), stats


@triton_op("d2g_fast::lpips_distance_multi_backward_triton", mutates_args={})
def lpips_distance_multi_backward_triton(
        grad: torch.Tensor, f0: list[torch.Tensor], f1: list[torch.Tensor], weights: list[torch.Tensor],
        stats: torch.Tensor, need_f0: bool, need_f1: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    acc = stats.dtype
    P = stats.shape[1]
    g0s, g1s, pix0 = [], [], 0
    for k, (a, b, w) in enumerate(zip(f0, f1, weights)):
        N, C, H, W = a.shape
        ga = poisoned_empty_like(a) if need_f0 else a.new_empty((0,))
        gb = poisoned_empty_like(b) if need_f1 else b.new_empty((0,))
        if need_f0 or need_f1:
            block_c, block_p = _blocks(C)
            g = (grad[k].to(acc) / (H * W)).contiguous()
            sga = ga.stride() if need_f0 else (0, 0, 0, 0)
            sgb = gb.stride() if need_f1 else (0, 0, 0, 0)
            grid = (triton.cdiv(N * H * W, block_p), triton.cdiv(C, block_c))
            wrap_triton(_multi_bwd_kernel)[grid](
                a, b, ga if need_f0 else a, gb if need_f1 else b, w.to(acc).contiguous(), stats, g,
                C, H, W, P, pix0, N * H * W, *a.stride(), *b.stride(), *sga, *sgb,
                NEED_A=need_f0, NEED_B=need_f1, BLOCK_C=block_c, BLOCK_P=block_p)
        g0s.append(ga)
        g1s.append(gb)
        pix0 += N * H * W
    return g0s, g1s
