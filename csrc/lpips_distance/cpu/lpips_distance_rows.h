#pragma once
// Row loops of the two-pass LatentLPIPS distance shared by the CPU kernels (lpips_distance and
// lpips_distance_multi): the math of lpips_distance_math.h over the W pixels of one channel of
// a planar row, as functions with restrict-qualified array arguments so the loops vectorise.
#include <cstdint>

#include "lpips_distance/lpips_distance_math.h"

namespace d2g {
namespace lpips {

// The two passes over one channel of a planar row, as functions with restrict-qualified
// array arguments so that the loops along the row vectorise (kUnit: unit stride along the row).
template <typename scalar_t, typename acc_t, bool kUnit>
inline void norms_row(const scalar_t* __restrict__ pa, const scalar_t* __restrict__ pb, int64_t sa_w,
                      int64_t sb_w, int64_t W, acc_t* __restrict__ aa, acc_t* __restrict__ bb,
                      acc_t* __restrict__ dd) {
  for (int64_t x = 0; x < W; ++x) {  // accumulate_norms, one array per sum
    const acc_t va = acc_t(pa[kUnit ? x : x * sa_w]), vb = acc_t(pb[kUnit ? x : x * sb_w]);
    aa[x] += va * va;
    bb[x] += vb * vb;
    dd[x] += (vb - va) * (vb + va);
  }
}

template <typename scalar_t, typename acc_t, bool kUnit>
inline void dist_row(const scalar_t* __restrict__ pa, const scalar_t* __restrict__ pb, int64_t sa_w,
                     int64_t sb_w, acc_t wc, int64_t W, const acc_t* __restrict__ i0,
                     const acc_t* __restrict__ i1, const acc_t* __restrict__ di, acc_t* __restrict__ d,
                     acc_t* __restrict__ s0, acc_t* __restrict__ s1) {
  for (int64_t x = 0; x < W; ++x) {  // accumulate_dist, one array per sum
    const acc_t va = acc_t(pa[kUnit ? x : x * sa_w]), vb = acc_t(pb[kUnit ? x : x * sb_w]);
    const acc_t D = normalized_difference(va, vb, i0[x], di[x]);
    const acc_t wD = wc * D;
    d[x] += wD * D;
    s0[x] += wD * (va * i0[x]);
    s1[x] -= wD * (vb * i1[x]);
  }
}

// The two passes over one pixel whose channels are contiguous in both inputs (channels_last).
// The sums run over the channels, so the loop is a reduction: "omp simd reduction" lets the
// compiler keep one partial sum per vector lane (without it, float sums stay scalar).
template <typename scalar_t, typename acc_t>
inline NormSums<acc_t> norms_pixel(const scalar_t* __restrict__ pa, const scalar_t* __restrict__ pb, int64_t C) {
  acc_t aa = 0, bb = 0, dd = 0;
#pragma omp simd reduction(+ : aa, bb, dd)
  for (int64_t c = 0; c < C; ++c) {
    NormSums<acc_t> s;
    zero(s);
    accumulate_norms(s, acc_t(pa[c]), acc_t(pb[c]));
    aa += s.aa;
    bb += s.bb;
    dd += s.dd;
  }
  return NormSums<acc_t>{aa, bb, dd};
}

template <typename scalar_t, typename acc_t>
inline DistSums<acc_t> dist_pixel(const scalar_t* __restrict__ pa, const scalar_t* __restrict__ pb,
                                  const acc_t* __restrict__ w, int64_t C, const Norms<acc_t>& n) {
  acc_t d = 0, s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : d, s0, s1)
  for (int64_t c = 0; c < C; ++c) {
    DistSums<acc_t> s;
    zero(s);
    accumulate_dist(s, acc_t(pa[c]), acc_t(pb[c]), w[c], n);
    d += s.d;
    s0 += s.s0;
    s1 += s.s1;
  }
  return DistSums<acc_t>{d, s0, s1};
}

// Both input gradients along one channel of a planar row (unit stride), with the per-pixel
// upstream gradient g[x] (kA / kB: which gradients to write).
template <typename scalar_t, typename acc_t, bool kA, bool kB>
inline void grad_row_pixels(const scalar_t* __restrict__ pa, const scalar_t* __restrict__ pb,
                            scalar_t* __restrict__ pga, scalar_t* __restrict__ pgb, int64_t W, acc_t wc,
                            const acc_t* __restrict__ g, const acc_t* __restrict__ i0,
                            const acc_t* __restrict__ i1, const acc_t* __restrict__ di,
                            const acc_t* __restrict__ s0, const acc_t* __restrict__ s1) {
  for (int64_t x = 0; x < W; ++x) {
    acc_t g0, g1;
    grad_pair<acc_t>(g[x], wc, acc_t(pa[x]), acc_t(pb[x]), i0[x], i1[x], di[x], s0[x], s1[x], g0, g1);
    if (kA) pga[x] = static_cast<scalar_t>(g0);
    if (kB) pgb[x] = static_cast<scalar_t>(g1);
  }
}

}  // namespace lpips
}  // namespace d2g
