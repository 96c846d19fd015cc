#pragma once
// Per-sample drawing of the paired-augmentation parameters from a counter-based RNG, shared by
// the CPU and CUDA sampler kernels (augment_params_sample_on_device_). The numpy reference is
// d2g_fast/ref/augment_params_sample_on_device.py: keep the two in the same order, operation for operation.
//
// Random numbers: at::Philox4_32 (Philox4x32-10, ATen/core/PhiloxRNGEngine.h) with key = seed,
// subsequence = sample index, counter offset = `offset` 128-bit blocks. Sample n consumes at
// most kBlocksPerSample blocks, so successive calls that advance the offset by that much never
// reuse a number. The integers are bitwise the same on the CPU and the GPU.
//   uniform: two 32-bit draws (hi, lo) -> the top 53 bits of (hi << 32 | lo) * 2^-53, in [0, 1);
//   normal : Box-Muller from two uniforms, sqrt(-2 log(1 - u1)) * cos(2 pi u2) (1 - u1 > 0).
//
// Distributions, hyper-parameters and composition order are those of AugmentParams.sample
// (d2g_fast/augment_params.py, the ADA pipeline of E-LatentLPIPS): every geometric transform
// is kept with probability p (the two rotations of 'g' with 1 - sqrt(1 - p)), colour draws are
// never gated, the cutout is kept with probability p. Arithmetic is float64; the 90-degree
// rotations use exact cosines and sines (0, +-1).
//
// Packed row (kParams = 17 float64, see AugmentParams.packed): sampling affine (6), brightness
// offset, contrast, saturation, cutout centre x, y, cutout half-size x, y, reflect-padding
// margins x0, y0, x1, y1 (batch-wide: the same in every row).
#include <ATen/core/PhiloxRNGEngine.h>

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "paired_augment/paired_augment_math.h"

namespace d2g {
namespace augment {

// Preset letters as bits (argument preset_flags of the sampler op).
enum PresetBits : int { kPresetBlit = 1, kPresetGeneral = 2, kPresetColour = 4, kPresetCutout = 8 };

constexpr int kBlocksPerSample = 16;  // 128-bit Philox blocks reserved per sample and call (uses <= 14)

// Hyper-parameters (the same as d2g_fast/augment_params.py).
constexpr double kXintMax = 0.125;
constexpr double kScaleStd = 0.2;
constexpr double kRotateMax = 1.0;
constexpr double kAnisoStd = 0.2;
constexpr double kXfracStd = 0.125;
constexpr double kCutoutSize = 0.5;
constexpr int kFilterPad = 3;
constexpr double kPi = 3.14159265358979323846;

struct Draws {
  at::Philox4_32 engine;
  D2G_HOST_DEVICE Draws(uint64_t seed, uint64_t sample, uint64_t offset) : engine(seed, sample, offset) {}
  D2G_HOST_DEVICE double uniform() {
    const uint64_t hi = engine();
    const uint64_t lo = engine();
    return static_cast<double>(((hi << 32) | lo) >> 11) * (1.0 / 9007199254740992.0);  // 2^-53
  }
  D2G_HOST_DEVICE double normal() {
    const double u1 = uniform();
    const double u2 = uniform();
    return sqrt(-2.0 * log(1.0 - u1)) * cos(2.0 * kPi * u2);
  }
};

// g <- g @ r (3x3), summed left to right.
D2G_HOST_DEVICE void mat_mul_right(double g[3][3], const double r[3][3]) {
  double t[3][3];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) t[i][j] = g[i][0] * r[0][j] + g[i][1] * r[1][j] + g[i][2] * r[2][j];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) g[i][j] = t[i][j];
}

D2G_HOST_DEVICE void apply_scale(double g[3][3], double sx, double sy) {
  const double r[3][3] = {{sx, 0, 0}, {0, sy, 0}, {0, 0, 1}};
  mat_mul_right(g, r);
}

D2G_HOST_DEVICE void apply_rotation(double g[3][3], double c, double s) {
  const double r[3][3] = {{c, -s, 0}, {s, c, 0}, {0, 0, 1}};
  mat_mul_right(g, r);
}

D2G_HOST_DEVICE void apply_translation(double g[3][3], double tx, double ty) {
  const double r[3][3] = {{1, 0, tx}, {0, 1, ty}, {0, 0, 1}};
  mat_mul_right(g, r);
}

// Draws sample n's parameters into row[0..12]: row[0..5] temporarily hold the first two rows
// of the inverse matrix g_inv (finish_row turns them into the sampling affine once the batch
// margins are known). extent = (max -x, max -y, max x, max y) of the output corners mapped
// through g_inv (what the margins must cover), -1e300 without geometry.
D2G_HOST_DEVICE void draw_sample(Draws& r, int C, int H, int W, int preset, double p, double* row,
                                 double extent[4]) {
  double g[3][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}};
  if (preset & kPresetBlit) {
    // x-flip
    double flip = floor(r.uniform() * 2.0);
    if (!(r.uniform() < p)) flip = 0.0;
    apply_scale(g, 1.0 / (1.0 - 2.0 * flip), 1.0);
    // rotation by k * 90 degrees (the inverse rotates by +k * 90 degrees)
    int k = static_cast<int>(floor(r.uniform() * 4.0));
    if (!(r.uniform() < p)) k = 0;
    const double cos90[4] = {1.0, 0.0, -1.0, 0.0}, sin90[4] = {0.0, 1.0, 0.0, -1.0};
    apply_rotation(g, cos90[k], sin90[k]);
    // integer translation, rounded to pixels (half to even, like numpy)
    double tx = (r.uniform() * 2.0 - 1.0) * kXintMax;
    double ty = (r.uniform() * 2.0 - 1.0) * kXintMax;
    if (!(r.uniform() < p)) tx = ty = 0.0;
    apply_translation(g, -rint(tx * W), -rint(ty * H));
  }
  if (preset & kPresetGeneral) {
    const double p_rot = 1.0 - sqrt(fmin(fmax(1.0 - p, 0.0), 1.0));
    // isotropic scale 2^(0.2 N)
    double s = exp2(r.normal() * kScaleStd);
    if (!(r.uniform() < p)) s = 1.0;
    apply_scale(g, 1.0 / s, 1.0 / s);
    // rotation before the anisotropic scale
    double theta = (r.uniform() * 2.0 - 1.0) * kPi * kRotateMax;
    if (!(r.uniform() < p_rot)) theta = 0.0;
    apply_rotation(g, cos(theta), sin(theta));
    // anisotropic scale
    s = exp2(r.normal() * kAnisoStd);
    if (!(r.uniform() < p)) s = 1.0;
    apply_scale(g, 1.0 / s, s);
    // rotation after it
    theta = (r.uniform() * 2.0 - 1.0) * kPi * kRotateMax;
    if (!(r.uniform() < p_rot)) theta = 0.0;
    apply_rotation(g, cos(theta), sin(theta));
    // fractional translation N * 0.125 of the size
    double tx = r.normal() * kXfracStd;
    double ty = r.normal() * kXfracStd;
    if (!(r.uniform() < p)) tx = ty = 0.0;
    apply_translation(g, -(tx * W), -(ty * H));
  }
  for (int i = 0; i < 3; ++i) {
    row[i] = g[0][i];
    row[3 + i] = g[1][i];
  }
  for (int i = 0; i < 4; ++i) extent[i] = -1e300;
  if (preset & (kPresetBlit | kPresetGeneral)) {
    const double cx = (W - 1) * 0.5, cy = (H - 1) * 0.5;
    const double corner_x[4] = {-cx, cx, cx, -cx}, corner_y[4] = {-cy, -cy, cy, cy};
    for (int c = 0; c < 4; ++c) {
      const double x = g[0][0] * corner_x[c] + g[0][1] * corner_y[c] + g[0][2];
      const double y = g[1][0] * corner_x[c] + g[1][1] * corner_y[c] + g[1][2];
      extent[0] = fmax(extent[0], -x);
      extent[1] = fmax(extent[1], -y);
      extent[2] = fmax(extent[2], x);
      extent[3] = fmax(extent[3], y);
    }
  }
  // colour: never gated by p (as the official pipeline and AugmentParams.sample)
  row[6] = 0.0;
  row[7] = 1.0;
  row[8] = 1.0;
  if (preset & kPresetColour) {
    row[6] = r.uniform() - 0.5;
    row[7] = r.uniform() + 0.5;
    // with one channel the saturation is a no-op and nothing is drawn
    if (C > 1) row[8] = r.uniform() * 2.0;
  }
  row[9] = row[10] = row[11] = row[12] = 0.0;
  if (preset & kPresetCutout) {
    const double size = r.uniform() < p ? kCutoutSize : 0.0;
    row[9] = r.uniform();
    row[10] = r.uniform();
    row[11] = row[12] = size * 0.5;
  }
}

// Batch margins (x0, y0, x1, y1) from the batch-wide maxima of the extents: the corners plus
// twice the filter half-support, clamped to [0, size - 1], rounded up to whole pixels.
D2G_HOST_DEVICE void margins_from_extent(const double extent[4], int H, int W, int preset, double m[4]) {
  const bool geometry = preset & (kPresetBlit | kPresetGeneral);
  const double cx = (W - 1) * 0.5, cy = (H - 1) * 0.5;
  const double pad = 2.0 * kFilterPad;
  for (int i = 0; i < 4; ++i) {
    const double base = i % 2 == 0 ? pad - cx : pad - cy;
    const double limit = i % 2 == 0 ? W - 1 : H - 1;
    const double v = fmin(fmax(extent[i] + base, 0.0), limit);
    m[i] = geometry ? ceil(v) : 0.0;
  }
}

// Turns row[0..5] (g_inv rows) into the sampling affine of AugmentParams.sampling_affine and
// writes the margins into row[13..16].
D2G_HOST_DEVICE void finish_row(double* row, const double m[4], int H, int W, int preset) {
  const bool geometry = preset & (kPresetBlit | kPresetGeneral);
  const double centre[2] = {(W - 1) * 0.5, (H - 1) * 0.5};
  const double ox = 0.5 - (W + 2 * kFilterPad) * 0.5, oy = 0.5 - (H + 2 * kFilterPad) * 0.5;
  for (int r = 0; r < 2; ++r) {
    double* a = row + 3 * r;
    if (geometry) {
      a[2] = 2.0 * ((((a[0] * ox + a[1] * oy) + a[2]) + centre[r]) + m[r]);
    } else {
      a[0] = a[1] = a[2] = 0.0;
    }
  }
  for (int i = 0; i < 4; ++i) row[kMarginCol + i] = m[i];
}

}  // namespace augment
}  // namespace d2g
