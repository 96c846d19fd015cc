#pragma once
// Per-point math of the paired latent augmentation, shared by the CPU and CUDA kernels.
//
// The pipeline (see d2g_fast/ref/paired_augment.py): reflect-pad by the batch margins, upsample
// 2x with the 12-tap filter f (U[a] = 2 sum_t f[t] Pz[a + 5 - t]), sample U bilinearly (zeros
// outside) at a per-sample affine map of a grid of points, downsample 2x with the same filter
// (out[q] = sum_k f[k] S[2q + k + 1]), then colour and cutout.
//
// Fusion used by every kernel: one bilinear sample of U at coordinate a (per axis) touches two
// neighbouring U pixels, which together read at most 7 consecutive padded-input pixels. So one
// grid point S is a separable 7 x 7 weighted sum of input pixels (the weights fold bilinear
// fractions and filter taps; reflect padding and zero regions become index maps), and the
// 2x upsampled image is never materialised.
#include <cmath>

#include "common/macros.h"

// Loop unrolling hint for nvcc (host compilers would warn about an unknown pragma).
#if defined(__CUDACC__)
#define D2G_AUG_UNROLL _Pragma("unroll")
#else
#define D2G_AUG_UNROLL
#endif

namespace d2g {
namespace augment {

constexpr int kTaps = 12;    // sym6 low-pass filter
constexpr int kSpan = 7;     // padded-input pixels read by one sampling point, per axis
constexpr int kParams = 17;  // packed per-sample parameters, see AugmentParams.packed()
constexpr int kMarginCol = 13;  // columns 13..16: reflect-padding margins x0, y0, x1, y1
// kLinear drops the brightness offset: the linear part of the operator (the transpose of the
// backward, used for double backward).
enum Flags : int { kGeometry = 1, kColour = 2, kCutout = 4, kLinear = 8 };

// Number of grid points a kernel evaluates per axis: points j = 1 .. 2*size + 10 (local index
// l = j - 1) are the ones the 2x downsampling reads: out[q] = sum_k f[k] S_local[2q + k].
D2G_HOST_DEVICE int grid_points(int size) { return 2 * size + kTaps - 2; }

// Source index in the unpadded input of padded-input index p, or -1 where the padded image is
// zero (outside the reflect-padded extent). m0 = padding before; margins never exceed size - 1,
// so one reflection suffices.
D2G_HOST_DEVICE int source_index(int p, int m0, int padded, int size) {
  if (p < 0 || p >= padded) return -1;
  int o = p - m0;
  if (o < 0) o = -o;
  if (o > size - 1) o = 2 * (size - 1) - o;
  return o;
}

template <typename acc_t>
struct AxisWeights {
  int base;        // padded-input index of entry 0 (entry i reads padded pixel base + i)
  int src[kSpan];  // source indices (-1 = zero)
  acc_t w[kSpan];
};

// Far outside the upsampled image every tap is zero anyway: clamp the coordinate so the integer
// conversion cannot overflow (this also maps NaN to a harmless value).
D2G_HOST_DEVICE double clamp_coord(double a, int padded) {
  if (!(a > -4.0)) return -4.0;
  const double top = 2.0 * padded + 4.0;
  return a > top ? top : a;
}

// Padded-input index of entry 0 of the span read at upsampled index a0 = floor(coordinate):
// floor((a0 + 1) / 2) - 3 (the arithmetic shift floors).
D2G_HOST_DEVICE int span_base(int a0) { return ((a0 + 1) >> 1) - 3; }

// The same from an unclamped coordinate. Monotone in a, so the span bounds of a region of grid
// points follow from its corners.
D2G_HOST_DEVICE int span_base_at(double a, int padded) {
  return span_base(static_cast<int>(floor(clamp_coord(a, padded))));
}

// Weights along one axis for a sampling coordinate `a` in pixel indices of the 2x upsampled
// padded image U (bilinear between U[floor(a)] and U[floor(a) + 1]). f = normalised taps.
template <typename acc_t>
D2G_HOST_DEVICE void axis_weights(double a, int m0, int size, int padded, const acc_t* f,
                                  AxisWeights<acc_t>& out) {
  const int up = 2 * padded;
  a = clamp_coord(a, padded);
  const double fl = floor(a);
  const int a0 = static_cast<int>(fl);
  const acc_t frac = static_cast<acc_t>(a - fl);
  const int base = span_base(a0);
  out.base = base;
D2G_AUG_UNROLL
  for (int i = 0; i < kSpan; ++i) {
    out.w[i] = acc_t(0);
    out.src[i] = source_index(base + i, m0, padded, size);
  }
D2G_AUG_UNROLL
  for (int side = 0; side < 2; ++side) {
    const int u = a0 + side;
    if (u < 0 || u >= up) continue;  // grid_sample's zero padding
    const acc_t wb = side == 0 ? acc_t(1) - frac : frac;
D2G_AUG_UNROLL
    for (int i = 0; i < kSpan; ++i) {
      const int t = u + 5 - 2 * (base + i);
      if (t >= 0 && t < kTaps) out.w[i] += wb * acc_t(2) * f[t];
    }
  }
}

// Sampling coordinate of grid point (jx, jy) (full-grid indices) from the packed affine.
struct Coord {
  double x, y;
};
D2G_HOST_DEVICE Coord sample_coord(const double* affine, int jx, int jy) {
  return {affine[0] * jx + affine[1] * jy + affine[2], affine[3] * jx + affine[4] * jy + affine[5]};
}

// Colour, with g = geometric output, g_c = its mean over channels at the pixel, g_m = its mean
// over (C, H, W): brightness b, then contrast c (about the CHW mean), then saturation s (about
// the channel mean) collapse to one affine expression.
template <typename acc_t>
D2G_HOST_DEVICE acc_t colour_apply(acc_t g, acc_t g_c, acc_t g_m, acc_t b, acc_t c, acc_t s) {
  return c * s * g + (c - c * s) * g_c + (acc_t(1) - c) * g_m + b;
}

// Its transpose: gradient of the colour input from the output gradient go and its means.
template <typename acc_t>
D2G_HOST_DEVICE acc_t colour_adjoint(acc_t go, acc_t go_c, acc_t go_m, acc_t c, acc_t s) {
  return c * s * go + (c - c * s) * go_c + (acc_t(1) - c) * go_m;
}

// Cutout rectangle of one sample: centre (cx, cy) and half-size (hx, hy), relative to the size.
template <typename acc_t>
struct Cutout {
  acc_t cx, cy, hx, hy;
};

// The rectangle from packed row P (columns 9..12), at the kernel's accumulation precision: float
// for float and half latents, double for double ones, as the reference pipeline runs its
// rectangle test at its own precision.
template <typename acc_t>
D2G_HOST_DEVICE Cutout<acc_t> load_cutout(const double* P) {
  return {static_cast<acc_t>(P[9]), static_cast<acc_t>(P[10]), static_cast<acc_t>(P[11]),
          static_cast<acc_t>(P[12])};
}

// Cutout: true where pixel (x, y) of a W x H image is kept.
template <typename acc_t>
D2G_HOST_DEVICE bool cutout_keep(int x, int y, int W, int H, const Cutout<acc_t>& r) {
  const acc_t du = (static_cast<acc_t>(x) + acc_t(0.5)) / static_cast<acc_t>(W) - r.cx;
  const acc_t dv = (static_cast<acc_t>(y) + acc_t(0.5)) / static_cast<acc_t>(H) - r.cy;
  return (du < acc_t(0) ? -du : du) >= r.hx || (dv < acc_t(0) ? -dv : dv) >= r.hy;
}

}  // namespace augment
}  // namespace d2g
