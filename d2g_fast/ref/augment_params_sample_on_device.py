"""Numpy reference of the device-side parameter sampler (op ``augment_params_sample_on_device_``).

The test oracle of csrc/paired_augment/augment_params_sample_on_device.h, written from the algorithms:

* Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC11) in numpy
  uint64 arithmetic: key = seed (lo, hi), counter = (offset lo, offset hi, subsequence lo,
  subsequence hi), ten rounds, the key bumped by the Weyl constants between rounds; each
  128-bit block gives four 32-bit numbers, used in order; the counter's low word advances by
  one per block.  Subsequence = sample index, offset = 128-bit blocks to skip.
* uniform = top 53 bits of (hi << 32 | lo) of two consecutive numbers, times 2^-53;
  normal = Box-Muller sqrt(-2 log(1 - u1)) cos(2 pi u2).
* the per-sample draws, their composition into the inverse matrix, the batch margins and the
  packed row, in the same order as the C++ code (every sample consumes the same numbers of
  draws, so the batch is processed column by column).

Float64 throughout; the only differences from the C++ kernel are last-bit differences of the
transcendental functions (exp2, log, cos, sin) between numpy and the C library.
"""
from __future__ import annotations

import math

import numpy as np

from d2g_fast.augment_params import (ANISO_STD, CUTOUT_SIZE, FILTER_PAD, PACKED_COLUMNS,
                                     ROTATE_MAX, SCALE_STD, XFRAC_STD, XINT_MAX)

PRESET_BITS = {"b": 1, "g": 2, "c": 4, "o": 8}
BLOCKS_PER_SAMPLE = 16  # 128-bit blocks reserved per sample (csrc: kBlocksPerSample)

_M32 = np.uint64(0xFFFFFFFF)
_PHILOX_W = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of counters (..., 4) under keys (..., 2) (uint32 values in any int array):
    returns (..., 4) uint32."""
    c = [np.asarray(counter[..., i], dtype=np.uint64) & _M32 for i in range(4)]
    k = [np.asarray(key[..., i], dtype=np.uint64) & _M32 for i in range(2)]
    for rnd in range(10):
        if rnd > 0:
            k = [(k[0] + _PHILOX_W[0]) & _M32, (k[1] + _PHILOX_W[1]) & _M32]
        p0 = _PHILOX_M[0] * c[0]  # < 2^64: exact in uint64
        p1 = _PHILOX_M[1] * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _M32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _M32
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
    return np.stack(c, axis=-1).astype(np.uint32)


def philox_stream(seed: int, samples: int, offset: int = 0, blocks: int = BLOCKS_PER_SAMPLE
                  ) -> np.ndarray:
    """(samples, 4 * blocks) uint32: the numbers sample n's engine returns, in order."""
    seed, offset = int(seed), int(offset)
    n = np.arange(samples, dtype=np.uint64)[:, None]
    b = np.uint64(offset) + np.arange(blocks, dtype=np.uint64)[None, :]
    counter = np.stack(np.broadcast_arrays(b & _M32, b >> np.uint64(32), n & _M32, n >> np.uint64(32)),
                       axis=-1)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    return philox4x32_10(counter, np.broadcast_to(key, counter.shape[:-1] + (2,))).reshape(samples, -1)


class _Draws:
    """Column-by-column consumer of the per-sample streams (every sample draws alike)."""

    def __init__(self, stream: np.ndarray):
        self.stream = stream.astype(np.uint64)
        self.used = 0

    def uniform(self) -> np.ndarray:
        hi, lo = self.stream[:, self.used], self.stream[:, self.used + 1]
        self.used += 2
        bits53 = ((hi << np.uint64(32)) | lo) >> np.uint64(11)
        return bits53.astype(np.float64) * (1.0 / 9007199254740992.0)  # 2^-53

    def normal(self) -> np.ndarray:
        u1 = self.uniform()
        u2 = self.uniform()
        return np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * math.pi * u2)


def _mul_right(g: np.ndarray, r: np.ndarray) -> np.ndarray:
    """g @ r per sample, each entry summed left to right (as the C++ loop)."""
    t = np.empty_like(g)
    for i in range(3):
        for j in range(3):
            t[:, i, j] = g[:, i, 0] * r[:, 0, j] + g[:, i, 1] * r[:, 1, j] + g[:, i, 2] * r[:, 2, j]
    return t


def _matrix(n: int, rows) -> np.ndarray:
    out = np.empty((n, 3, 3))
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            out[:, i, j] = v
    return out


def _scale(g, sx, sy):
    return _mul_right(g, _matrix(len(g), [[sx, 0, 0], [0, sy, 0], [0, 0, 1]]))


def _rotation(g, c, s):
    return _mul_right(g, _matrix(len(g), [[c, -s, 0], [s, c, 0], [0, 0, 1]]))


def _translation(g, tx, ty):
    return _mul_right(g, _matrix(len(g), [[1, 0, tx], [0, 1, ty], [0, 0, 1]]))


def preset_bits(preset: str) -> int:
    return sum(PRESET_BITS[ch] for ch in preset)


def sample_packed(preset: str, batch_size: int, height: int, width: int, num_channels: int = 4,
                  p: float = 1.0, seed: int = 0, offset: int = 0) -> np.ndarray:
    """(N, 17) float64: what ``augment_params_sample_on_device_`` writes for this seed and offset."""
    n, h, w, p = int(batch_size), int(height), int(width), float(p)
    bits = preset_bits(preset)
    r = _Draws(philox_stream(seed, n, offset))
    g = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
    if bits & 1:  # b
        flip = np.floor(r.uniform() * 2.0)
        flip = np.where(r.uniform() < p, flip, 0.0)
        g = _scale(g, 1.0 / (1.0 - 2.0 * flip), 1.0)
        k = np.floor(r.uniform() * 4.0).astype(np.int64)
        k = np.where(r.uniform() < p, k, 0)
        g = _rotation(g, np.array([1.0, 0.0, -1.0, 0.0])[k], np.array([0.0, 1.0, 0.0, -1.0])[k])
        tx = (r.uniform() * 2.0 - 1.0) * XINT_MAX
        ty = (r.uniform() * 2.0 - 1.0) * XINT_MAX
        keep = r.uniform() < p
        tx, ty = np.where(keep, tx, 0.0), np.where(keep, ty, 0.0)
        g = _translation(g, -np.rint(tx * w), -np.rint(ty * h))
    if bits & 2:  # g
        p_rot = 1.0 - math.sqrt(min(max(1.0 - p, 0.0), 1.0))
        s = np.exp2(r.normal() * SCALE_STD)
        s = np.where(r.uniform() < p, s, 1.0)
        g = _scale(g, 1.0 / s, 1.0 / s)
        theta = (r.uniform() * 2.0 - 1.0) * math.pi * ROTATE_MAX
        theta = np.where(r.uniform() < p_rot, theta, 0.0)
        g = _rotation(g, np.cos(theta), np.sin(theta))
        s = np.exp2(r.normal() * ANISO_STD)
        s = np.where(r.uniform() < p, s, 1.0)
        g = _scale(g, 1.0 / s, s)
        theta = (r.uniform() * 2.0 - 1.0) * math.pi * ROTATE_MAX
        theta = np.where(r.uniform() < p_rot, theta, 0.0)
        g = _rotation(g, np.cos(theta), np.sin(theta))
        tx = r.normal() * XFRAC_STD
        ty = r.normal() * XFRAC_STD
        keep = r.uniform() < p
        tx, ty = np.where(keep, tx, 0.0), np.where(keep, ty, 0.0)
        g = _translation(g, -(tx * w), -(ty * h))
    out = np.zeros((n, PACKED_COLUMNS))
    geometry = bool(bits & 3)
    cx, cy = (w - 1) * 0.5, (h - 1) * 0.5
    if geometry:
        xs = [g[:, 0, 0] * X + g[:, 0, 1] * Y + g[:, 0, 2] for X, Y in ((-cx, -cy), (cx, -cy), (cx, cy), (-cx, cy))]
        ys = [g[:, 1, 0] * X + g[:, 1, 1] * Y + g[:, 1, 2] for X, Y in ((-cx, -cy), (cx, -cy), (cx, cy), (-cx, cy))]
        extent = [max(float((-v).max()) for v in xs), max(float((-v).max()) for v in ys),
                  max(float(v.max()) for v in xs), max(float(v.max()) for v in ys)]
        pad = 2.0 * FILTER_PAD
        m = []
        for i, e in enumerate(extent):
            base = pad - cx if i % 2 == 0 else pad - cy
            limit = float(w - 1 if i % 2 == 0 else h - 1)
            m.append(math.ceil(min(max(e + base, 0.0), limit)))
        ox, oy = 0.5 - (w + 2 * FILTER_PAD) * 0.5, 0.5 - (h + 2 * FILTER_PAD) * 0.5
        for row, centre in ((0, cx), (1, cy)):
            out[:, 3 * row + 0] = g[:, row, 0]
            out[:, 3 * row + 1] = g[:, row, 1]
            out[:, 3 * row + 2] = 2.0 * ((((g[:, row, 0] * ox + g[:, row, 1] * oy) + g[:, row, 2])
                                          + centre) + m[row])
        out[:, 13:17] = m
    out[:, 7:9] = 1.0
    if bits & 4:  # c (never gated by p)
        out[:, 6] = r.uniform() - 0.5
        out[:, 7] = r.uniform() + 0.5
        if num_channels > 1:
            out[:, 8] = r.uniform() * 2.0
    if bits & 8:  # o
        size = np.where(r.uniform() < p, CUTOUT_SIZE, 0.0)
        out[:, 9] = r.uniform()
        out[:, 10] = r.uniform()
        out[:, 11] = out[:, 12] = size * 0.5
    assert r.used <= 4 * BLOCKS_PER_SAMPLE
    return out
