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

}  // namespace lpips
}  // namespace d2g
