"""Triton kernels of the paired latent augmentation (same math as csrc/paired_augment).

Triton has no explicit shared memory, so the fused tile of the CUDA kernel becomes passes over
a buffer of the resampling grid (about 4.8x the latent):
  forward, per tensor: grid points (each a separable 7x7 weighted sum of input pixels) ->
  2x downsampling (+ cutout) -> [colour + cutout, one program per sample];
  backward, per tensor: [cutout + colour transposed] -> grid-point gradients (transposed
  downsampling, gathered) scattered through the 7x7 weights with atomic adds.
Computes at the accumulation precision of the C++ kernels (ACC: float64 for float64 inputs,
float32 otherwise).  Registered with torch.library.triton_op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from d2g_fast.ref.paired_augment import resampling_filter
from d2g_fast.triton._common import poisoned_empty_like

GEOMETRY, COLOUR, CUTOUT, LINEAR = 1, 2, 4, 8
# params rows are 17 float64 (AugmentParams.packed): the margins are columns 13..16.
BLOCK_POINTS = 128
BLOCK_PIXELS = 256


@triton.jit
def _axis_weights(a, m0, size, padded, f_ptr, ACC: tl.constexpr):
    """[BLOCK, 8] weights and source indices (-1 = zero) of 7 padded-input pixels per point."""
    up = 2 * padded
    a = tl.minimum(tl.maximum(a, -4.0), up + 4.0)
    fl = tl.floor(a)
    a0 = fl.to(tl.int32)
    frac = (a - fl).to(ACC)
    base = (tl.floor((fl + 1.0) * 0.5) - 3.0).to(tl.int32)
    i = tl.arange(0, 8)[None, :]
    p = base[:, None] + i
    o = p - m0
    o = tl.where(o < 0, -o, o)
    o = tl.where(o > size - 1, 2 * (size - 1) - o, o)
    src = tl.where((p >= 0) & (p < padded) & (i < 7), o, -1)
    u0 = a0[:, None]
    t0 = u0 + 5 - 2 * p
    ok0 = (t0 >= 0) & (t0 < 12) & (u0 >= 0) & (u0 < up) & (i < 7)
    ok1 = (t0 + 1 >= 0) & (t0 + 1 < 12) & (u0 + 1 >= 0) & (u0 + 1 < up) & (i < 7)
    f0 = tl.load(f_ptr + t0, mask=ok0, other=0.0)
    f1 = tl.load(f_ptr + t0 + 1, mask=ok1, other=0.0)
    w = (1.0 - frac)[:, None] * 2.0 * f0 + frac[:, None] * 2.0 * f1
    return w, src


@triton.jit
def _sample_margins(params_ptr, n, H, W):
    """Sample n's margins (columns 13..16, written on the device: read, not checked on the host;
    clamped to [0, size - 1] so a malformed row cannot index out of bounds) and padded sizes."""
    P = params_ptr + n * 17
    mx0 = tl.minimum(tl.maximum(tl.load(P + 13), 0.0), W - 1.0).to(tl.int32)
    my0 = tl.minimum(tl.maximum(tl.load(P + 14), 0.0), H - 1.0).to(tl.int32)
    mx1 = tl.minimum(tl.maximum(tl.load(P + 15), 0.0), W - 1.0).to(tl.int32)
    my1 = tl.minimum(tl.maximum(tl.load(P + 16), 0.0), H - 1.0).to(tl.int32)
    return mx0, my0, H + my0 + my1, W + mx0 + mx1


@triton.jit
def _point_weights(params_ptr, n, idx, GW, H, W, f_ptr, ACC: tl.constexpr):
    mx0, my0, Hp, Wp = _sample_margins(params_ptr, n, H, W)
    ly = idx // GW
    lx = idx % GW
    P = params_ptr + n * 17
    jx = (lx + 1).to(tl.float64)
    jy = (ly + 1).to(tl.float64)
    ax = tl.load(P + 0) * jx + tl.load(P + 1) * jy + tl.load(P + 2)
    ay = tl.load(P + 3) * jx + tl.load(P + 4) * jy + tl.load(P + 5)
    wx, sx = _axis_weights(ax, mx0, W, Wp, f_ptr, ACC)
    wy, sy = _axis_weights(ay, my0, H, Hp, f_ptr, ACC)
    return ly, lx, wx, sx, wy, sy


@triton.jit
def _column(v, r):
    sel = tl.arange(0, 8)[None, :] == r
    return tl.sum(tl.where(sel, v, 0), axis=1)


@triton.jit
def _keep(qx, qy, W, H, P, ACC: tl.constexpr):
    u = (qx.to(ACC) + 0.5) / W
    v = (qy.to(ACC) + 0.5) / H
    cx = tl.load(P + 9).to(ACC)
    cy = tl.load(P + 10).to(ACC)
    hx = tl.load(P + 11).to(ACC)
    hy = tl.load(P + 12).to(ACC)
    return (tl.abs(u - cx) >= hx) | (tl.abs(v - cy) >= hy)


@triton.jit
def _grid_points_kernel(x_ptr, s_ptr, params_ptr, f_ptr, sxn, sxc, sxh, sxw,
                        C, H, W, GH, GW, ACC: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < GH * GW
    ly, lx, wx, sx, wy, sy = _point_weights(params_ptr, n, idx, GW, H, W, f_ptr, ACC)
    base = x_ptr + n * sxn
    for c in range(C):
        acc = tl.zeros([BLOCK], dtype=ACC)
        for r in tl.static_range(7):
            wy_r = _column(wy, r)
            sy_r = _column(sy, r)
            ok = (sx >= 0) & (sy_r >= 0)[:, None] & inb[:, None]
            v = tl.load(base + c * sxc + sy_r[:, None] * sxh + sx * sxw, mask=ok, other=0.0)
            acc += wy_r * tl.sum(v.to(ACC) * wx, axis=1)
        tl.store(s_ptr + (n * C + c) * GH * GW + idx, acc, mask=inb)


@triton.jit
def _downsample_kernel(s_ptr, o_ptr, params_ptr, f_ptr, son, soc, soh, sow, C, H, W, GH, GW,
                       CUT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    nc = tl.program_id(0)
    n = nc // C
    c = nc % C
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < H * W
    qy = idx // W
    qx = idx % W
    l16 = tl.arange(0, 16)
    fl = tl.load(f_ptr + l16, mask=l16 < 12, other=0.0)
    plane = s_ptr + nc * GH * GW
    acc = tl.zeros([BLOCK], dtype=ACC)
    for k in tl.static_range(12):
        ptrs = plane + (2 * qy + k)[:, None] * GW + (2 * qx)[:, None] + l16[None, :]
        row = tl.load(ptrs, mask=inb[:, None] & (l16 < 12)[None, :], other=0.0)
        acc += tl.load(f_ptr + k) * tl.sum(row * fl[None, :], axis=1)
    if CUT:
        acc = tl.where(_keep(qx, qy, W, H, params_ptr + n * 17, ACC), acc, 0.0)
    tl.store(o_ptr + n * son + c * soc + qy * soh + qx * sow, acc.to(o_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _colour_kernel(i_ptr, o_ptr, params_ptr, sin, sic, sih, siw, son, soc, soh, sow, C, H, W,
                   COL: tl.constexpr, CUT: tl.constexpr, ADJOINT: tl.constexpr, LIN: tl.constexpr,
                   ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program per sample: colour (or its transpose) and cutout, in place when i == o."""
    n = tl.program_id(0)
    P = params_ptr + n * 17
    HW = H * W
    mean = 0.0
    if COL:
        total = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, HW, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            ok = idx < HW
            qy = idx // W
            qx = idx % W
            if ADJOINT and CUT:
                ok = ok & _keep(qx, qy, W, H, P, ACC)
            for c in range(C):
                v = tl.load(i_ptr + n * sin + c * sic + qy * sih + qx * siw, mask=ok, other=0.0)
                total += v.to(ACC)
        mean = tl.sum(total, axis=0) / (C * HW)
    b = tl.load(P + 6).to(ACC)
    if LIN:
        b = 0.0
    cf = tl.load(P + 7).to(ACC)
    sf = tl.load(P + 8).to(ACC)
    for start in range(0, HW, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inb = idx < HW
        qy = idx // W
        qx = idx % W
        keep = inb
        if CUT:
            keep = keep & _keep(qx, qy, W, H, P, ACC)
        cmean = tl.zeros([BLOCK], dtype=ACC)
        if COL:
            for c in range(C):
                cmean += tl.load(i_ptr + n * sin + c * sic + qy * sih + qx * siw, mask=inb, other=0.0).to(ACC)
            cmean = cmean / C
            if ADJOINT:
                cmean = tl.where(keep, cmean, 0.0)
        for c in range(C):
            v = tl.load(i_ptr + n * sin + c * sic + qy * sih + qx * siw, mask=inb, other=0.0).to(ACC)
            if ADJOINT:
                v = tl.where(keep, v, 0.0)
                if COL:
                    v = cf * sf * v + (cf - cf * sf) * cmean + (1.0 - cf) * mean
            else:
                if COL:
                    v = cf * sf * v + (cf - cf * sf) * cmean + (1.0 - cf) * mean + b
                v = tl.where(keep, v, 0.0)
            tl.store(o_ptr + n * son + c * soc + qy * soh + qx * sow, v.to(o_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _scatter_kernel(g_ptr, out_ptr, params_ptr, f_ptr, C, H, W, GH, GW, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Transposed geometry: grid-point gradients gathered from the (contiguous, ACC) output
    gradient g, scattered into out (contiguous, ACC, zeroed) with atomic adds."""
    n = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < GH * GW
    ly, lx, wx, sx, wy, sy = _point_weights(params_ptr, n, idx, GW, H, W, f_ptr, ACC)
    l16 = tl.arange(0, 16)
    fl = tl.load(f_ptr + l16, mask=l16 < 12, other=0.0)
    qx2 = lx[:, None] - l16[None, :]
    okx = (qx2 >= 0) & (qx2 % 2 == 0) & (qx2 < 2 * W) & (l16 < 12)[None, :]
    for c in range(C):
        plane = g_ptr + (n * C + c) * H * W
        gs = tl.zeros([BLOCK], dtype=ACC)
        for k in tl.static_range(12):
            qy2 = ly - k
            oky = (qy2 >= 0) & (qy2 % 2 == 0) & (qy2 < 2 * H) & inb
            v = tl.load(plane + (qy2 // 2)[:, None] * W + qx2 // 2, mask=oky[:, None] & okx, other=0.0)
            gs += tl.load(f_ptr + k) * tl.sum(v * fl[None, :], axis=1)
        oplane = out_ptr + (n * C + c) * H * W
        for r in tl.static_range(7):
            wy_r = _column(wy, r)
            sy_r = _column(sy, r)
            ok = (sx >= 0) & (sy_r >= 0)[:, None] & inb[:, None] & (gs != 0.0)[:, None]
            tl.atomic_add(oplane + sy_r[:, None] * W + sx, (gs * wy_r)[:, None] * wx, mask=ok)


def _geometry_sizes(x: torch.Tensor):
    N, C, H, W = x.shape
    return N, C, H, W, 2 * H + 10, 2 * W + 10


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The C++ kernels' rule (at::opmath_type): float64 stays float64, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _forward_one(x, params, flags, f):
    N, C, H, W, GH, GW = _geometry_sizes(x)
    acc_dtype = f.dtype
    ACC = _TRITON_DTYPES[acc_dtype]
    out = poisoned_empty_like(x)
    geom, col, cut = bool(flags & GEOMETRY), bool(flags & COLOUR), bool(flags & CUTOUT)
    src = x
    if geom:
        s = torch.empty((N, C, GH, GW), device=x.device, dtype=acc_dtype)
        wrap_triton(_grid_points_kernel)[(N, triton.cdiv(GH * GW, BLOCK_POINTS))](
            x, s, params, f, *x.stride(), C, H, W, GH, GW, ACC=ACC, BLOCK=BLOCK_POINTS)
        wrap_triton(_downsample_kernel)[(N * C, triton.cdiv(H * W, BLOCK_PIXELS))](
            s, out, params, f, *out.stride(), C, H, W, GH, GW, CUT=cut and not col, ACC=ACC,
            BLOCK=BLOCK_PIXELS)
        src = out
    if col or not geom:
        wrap_triton(_colour_kernel)[(N,)](
            src, out, params, *src.stride(), *out.stride(), C, H, W, COL=col, CUT=cut,
            ADJOINT=False, LIN=bool(flags & LINEAR), ACC=ACC, BLOCK=BLOCK_PIXELS)
    return out


def _backward_one(g, params, flags, f):
    N, C, H, W, GH, GW = _geometry_sizes(g)
    acc_dtype = f.dtype
    ACC = _TRITON_DTYPES[acc_dtype]
    geom, col, cut = bool(flags & GEOMETRY), bool(flags & COLOUR), bool(flags & CUTOUT)
    if not geom:
        out = poisoned_empty_like(g)
        wrap_triton(_colour_kernel)[(N,)](
            g, out, params, *g.stride(), *out.stride(), C, H, W, COL=col, CUT=cut, ADJOINT=True,
            LIN=False, ACC=ACC, BLOCK=BLOCK_PIXELS)
        return out
    gg = torch.empty((N, C, H, W), device=g.device, dtype=acc_dtype)
    wrap_triton(_colour_kernel)[(N,)](
        g, gg, params, *g.stride(), *gg.stride(), C, H, W, COL=col, CUT=cut, ADJOINT=True,
        LIN=False, ACC=ACC, BLOCK=BLOCK_PIXELS)
    acc = torch.zeros((N, C, H, W), device=g.device, dtype=acc_dtype)
    wrap_triton(_scatter_kernel)[(N, triton.cdiv(GH * GW, BLOCK_POINTS))](
        gg, acc, params, f, C, H, W, GH, GW, ACC=ACC, BLOCK=BLOCK_POINTS)
    if g.dtype == acc_dtype:
        return acc
    return acc.to(dtype=g.dtype, memory_format=torch.preserve_format)


_FILTERS: dict = {}


def _filter(device, dtype: torch.dtype) -> torch.Tensor:
    """The resampling filter at the accumulation precision of ``dtype`` inputs (cached)."""
    acc_dtype = _accumulation_dtype(dtype)
    f = _FILTERS.get((device, acc_dtype))
    if f is None:
        f = _FILTERS[(device, acc_dtype)] = resampling_filter(acc_dtype, device)
    return f


@triton_op("d2g_fast::paired_augment_triton", mutates_args={})
def paired_augment_triton(x: torch.Tensor, y: torch.Tensor | None, params: torch.Tensor,
                          flags: int) -> tuple[torch.Tensor, torch.Tensor]:
    f = _filter(x.device, x.dtype)
    ox = _forward_one(x, params, flags, f)
    oy = _forward_one(y, params, flags, f) if y is not None else x.new_empty((0,))
    return ox, oy


@triton_op("d2g_fast::paired_augment_backward_triton", mutates_args={})
def paired_augment_backward_triton(grad_x: torch.Tensor, grad_y: torch.Tensor | None,
                                   params: torch.Tensor, flags: int
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    f = _filter(grad_x.device, grad_x.dtype)
    gx = _backward_one(grad_x, params, flags, f)
    gy = _backward_one(grad_y, params, flags, f) if grad_y is not None else grad_x.new_empty((0,))
    return gx, gy
