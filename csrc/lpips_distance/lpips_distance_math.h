#pragma once
// Per-pixel math of the LatentLPIPS layer distance, shared by the CPU and CUDA kernels.
//
// For one pixel with channel vectors a, b and weights w:
//   i0 = 1/sqrt(sum a^2 + eps), i1 = 1/sqrt(sum b^2 + eps), A = a*i0, B = b*i1
//   d  = sum_c w_c (A_c - B_c)^2
// One pass over the channels accumulates five sums, from which d follows by expansion:
//   d = i0^2 Swaa - 2 i0 i1 Swab + i1^2 Swbb.
// The backward needs, per pixel, s0 = sum w (A - B) A and s1 = sum w (B - A) B:
//   dd/da_c = 2 i0 (w_c (A_c - B_c) - A_c s0),  dd/db_c = 2 i1 (w_c (B_c - A_c) - B_c s1).
// Both are by-products of the same five sums, so the forward stores (i0, i1, s0, s1) and the
// backward is a single elementwise pass with no second reduction over channels.
// The expansion cancels when A ~ B; with accumulation in float32 (float64 for double) the
// absolute error stays near 1e-7 of sum w, far below the loss values that matter.
#include "common/macros.h"

namespace d2g {
namespace lpips {

constexpr double kEps = 1e-8;  // inside the square root, as in LPIPS' normalize_tensor

template <typename acc_t>
struct Sums {
  acc_t aa, bb, waa, wbb, wab;
};

template <typename acc_t>
D2G_HOST_DEVICE void zero(Sums<acc_t>& s) {
  s.aa = s.bb = s.waa = s.wbb = s.wab = acc_t(0);
}

template <typename acc_t>
D2G_HOST_DEVICE void accumulate(Sums<acc_t>& s, acc_t a, acc_t b, acc_t w) {
  s.aa += a * a;
  s.bb += b * b;
  s.waa += w * a * a;
  s.wbb += w * b * b;
  s.wab += w * a * b;
}

template <typename acc_t>
D2G_HOST_DEVICE void merge(Sums<acc_t>& s, const Sums<acc_t>& o) {
  s.aa += o.aa;
  s.bb += o.bb;
  s.waa += o.waa;
  s.wbb += o.wbb;
  s.wab += o.wab;
}

template <typename acc_t>
struct PixelStats {
  acc_t dist, i0, i1, s0, s1;
};

template <typename acc_t>
D2G_HOST_DEVICE acc_t rsqrt_eps(acc_t x) {
  return acc_t(1) / sqrt(x + acc_t(kEps));
}

template <typename acc_t>
D2G_HOST_DEVICE PixelStats<acc_t> finalize(const Sums<acc_t>& s) {
  PixelStats<acc_t> p;
  p.i0 = rsqrt_eps(s.aa);
  p.i1 = rsqrt_eps(s.bb);
  const acc_t cross = p.i0 * p.i1 * s.wab;
  const acc_t aa = p.i0 * p.i0 * s.waa;
  const acc_t bb = p.i1 * p.i1 * s.wbb;
  p.s0 = aa - cross;
  p.s1 = bb - cross;
  p.dist = p.s0 + p.s1;
  return p;
}

// Gradient of g * d with respect to a_c (swap the roles for b: grad_input(g, w, b, a, i1, i0, s1)).
template <typename acc_t>
D2G_HOST_DEVICE acc_t grad_input(acc_t g, acc_t w, acc_t a, acc_t b, acc_t ia, acc_t ib,
                                 acc_t sa) {
  const acc_t A = a * ia;
  const acc_t B = b * ib;
  return acc_t(2) * g * ia * (w * (A - B) - A * sa);
}

}  // namespace lpips
}  // namespace d2g
