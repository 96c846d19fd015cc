#pragma once
// Per-pixel math of the LatentLPIPS layer distance, shared by the CPU and CUDA kernels of
// lpips_distance and lpips_distance_multi.
//
// For one pixel with channel vectors a, b and weights w:
//   i0 = 1/sqrt(sum a^2 + eps), i1 = 1/sqrt(sum b^2 + eps), A = a*i0, B = b*i1
//   d  = sum_c w_c (A_c - B_c)^2
// Why two passes: the one-pass expansion d = i0^2 Swaa - 2 i0 i1 Swab + i1^2 Swbb cancels
// catastrophically when f1 ~ f0 (its relative error grows like eps_float / |A - B|^2), which is
// exactly the regime of a converging loss. Every kernel uses the two-pass form below.
#include <cstdint>

#include "common/macros.h"

namespace d2g {
namespace lpips {

constexpr double kEps = 1e-8;  // inside the square root, as in LPIPS' normalize_tensor

// Per-pixel statistics the forward saves for the backward: [i0, i1, i0 - i1, s0, s1] (below),
// the rows of the stats tensor of lpips_distance (5, N, H, W) and lpips_distance_multi
// (5, total pixels). Python reads it through d2g_fast._C.constants().
constexpr int64_t kStatRows = 5;

// Two-pass, cancellation-free form.
//
// Pass 1 over a pixel's channels: |a|^2, |b|^2 and dd = sum (b - a)(b + a) (= |b|^2 - |a|^2
// without subtracting two large sums). From them
//   i0 = 1/sqrt(|a|^2 + eps), i1 = 1/sqrt(|b|^2 + eps),
//   di = i0 - i1 = dd i0 i1 / (sqrt(|a|^2 + eps) + sqrt(|b|^2 + eps))   (the eps cancel exactly),
// so the normalised difference D_c = A_c - B_c = (a_c - b_c) i0 + b_c di is accurate even when
// a ~ b (a_c - b_c and di carry the small difference themselves). Pass 2 (the same channels,
// read again from cache) accumulates directly
//   d = sum w D^2, s0 = sum w D A, s1 = -sum w D B   (d = s0 + s1 in exact arithmetic),
// so d keeps full relative precision however close f0 and f1 are, while the one-pass
// expansion above loses it in proportion to 1/|A - B|^2. The gradients are
//   dd/da_c = 2 i0 (w_c D_c - A_c s0),  dd/db_c = 2 i1 (-w_c D_c - B_c s1).

template <typename acc_t>
struct NormSums {
  acc_t aa, bb, dd;
};

template <typename acc_t>
D2G_HOST_DEVICE void zero(NormSums<acc_t>& s) {
  s.aa = s.bb = s.dd = acc_t(0);
}

template <typename acc_t>
D2G_HOST_DEVICE void accumulate_norms(NormSums<acc_t>& s, acc_t a, acc_t b) {
  s.aa += a * a;
  s.bb += b * b;
  s.dd += (b - a) * (b + a);
}

template <typename acc_t>
D2G_HOST_DEVICE void merge(NormSums<acc_t>& s, const NormSums<acc_t>& o) {
  s.aa += o.aa;
  s.bb += o.bb;
  s.dd += o.dd;
}

template <typename acc_t>
struct Norms {
  acc_t i0, i1, di;  // 1/|a|, 1/|b|, i0 - i1 (computed without cancellation)
};

template <typename acc_t>
D2G_HOST_DEVICE Norms<acc_t> finalize_norms(const NormSums<acc_t>& s) {
  const acc_t ra = sqrt(s.aa + acc_t(kEps));
  const acc_t rb = sqrt(s.bb + acc_t(kEps));
  Norms<acc_t> n;
  n.i0 = acc_t(1) / ra;
  n.i1 = acc_t(1) / rb;
  n.di = s.dd * n.i0 * n.i1 / (ra + rb);
  return n;
}

// D_c = a_c i0 - b_c i1, written so that it keeps its relative precision when a ~ b.
template <typename acc_t>
D2G_HOST_DEVICE acc_t normalized_difference(acc_t a, acc_t b, acc_t i0, acc_t di) {
  return (a - b) * i0 + b * di;
}

template <typename acc_t>
struct DistSums {
  acc_t d, s0, s1;
};

template <typename acc_t>
D2G_HOST_DEVICE void zero(DistSums<acc_t>& s) {
  s.d = s.s0 = s.s1 = acc_t(0);
}

template <typename acc_t>
D2G_HOST_DEVICE void accumulate_dist(DistSums<acc_t>& s, acc_t a, acc_t b, acc_t w, const Norms<acc_t>& n) {
  const acc_t D = normalized_difference(a, b, n.i0, n.di);
  const acc_t wD = w * D;
  s.d += wD * D;
  s.s0 += wD * (a * n.i0);
  s.s1 -= wD * (b * n.i1);
}

template <typename acc_t>
D2G_HOST_DEVICE void merge(DistSums<acc_t>& s, const DistSums<acc_t>& o) {
  s.d += o.d;
  s.s0 += o.s0;
  s.s1 += o.s1;
}

// Gradients of g * d for one element: g0 = d/da_c, g1 = d/db_c (g already holds the upstream
// gradient of the pixel, e.g. grad[n] / (H W) for the spatial mean).
template <typename acc_t>
D2G_HOST_DEVICE void grad_pair(acc_t g, acc_t w, acc_t a, acc_t b, acc_t i0, acc_t i1, acc_t di,
                               acc_t s0, acc_t s1, acc_t& g0, acc_t& g1) {
  const acc_t wD = w * normalized_difference(a, b, i0, di);
  g0 = acc_t(2) * g * i0 * (wD - a * i0 * s0);
  g1 = acc_t(2) * g * i1 * (-wD - b * i1 * s1);
}

// Gradient of g * d with respect to ONE input ("self", paired with "other"): i_s its 1/|.|,
// di_s = i_s - i_other (di for f0, -di for f1), s_s its statistic (s0 for f0, s1 for f1).
// For f0 this is grad_pair's g0, for f1 its g1 (D_self = B - A = -D).
template <typename acc_t>
D2G_HOST_DEVICE acc_t grad_one(acc_t g, acc_t w, acc_t self, acc_t other, acc_t i_s, acc_t di_s, acc_t s_s) {
  const acc_t D = normalized_difference(self, other, i_s, di_s);
  return acc_t(2) * g * i_s * (w * D - self * i_s * s_s);
}

}  // namespace lpips
}  // namespace d2g
