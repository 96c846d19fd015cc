// CPU kernel of the LatentLPIPS layer distance: two passes over each row of both feature maps
// (the second from cache), with the cancellation-free math of lpips_distance_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/macros.h"
#include "lpips_distance/cpu/lpips_distance_rows.h"
#include "lpips_distance/lpips_distance.h"
#include "lpips_distance/lpips_distance_math.h"

namespace d2g {
namespace lpips {
namespace {

struct Strides4 {
  int64_t n, c, h, w;
  explicit Strides4(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
  bool channels_inner() const { return c == 1; }
};

// Rows [begin, end) of the forward. A row is one image row (n, h); two passes over its
// channels (norms, then the distance sums, see lpips_distance_math.h). Planar inputs keep the
// row's per-pixel sums in separate arrays (structure of arrays), so the loops along the row
// vectorise.
template <typename scalar_t>
D2G_CPU_CLONES void forward_row_range(const scalar_t* a, const scalar_t* b, const Strides4& sa,
                                      const Strides4& sb, const at::opmath_type<scalar_t>* w,
                                      at::opmath_type<scalar_t>* map, at::opmath_type<scalar_t>* stats,
                                      int64_t N, int64_t C, int64_t H, int64_t W, int64_t begin,
                                      int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = N * H * W;
  std::vector<acc_t> buf(6 * W);
  acc_t *x0 = buf.data(), *x1 = x0 + W, *x2 = x1 + W, *i0 = x2 + W, *i1 = i0 + W, *di = i1 + W;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / H, h = row % H;
    const scalar_t* ra = a + n * sa.n + h * sa.h;
    const scalar_t* rb = b + n * sb.n + h * sb.h;
    const int64_t pix0 = (n * H + h) * W;
    auto store = [&](int64_t x, acc_t d, acc_t vi0, acc_t vi1, acc_t vdi, acc_t s0, acc_t s1) {
      map[pix0 + x] = d;
      stats[0 * plane + pix0 + x] = vi0;
      stats[1 * plane + pix0 + x] = vi1;
      stats[2 * plane + pix0 + x] = vdi;
      stats[3 * plane + pix0 + x] = s0;
      stats[4 * plane + pix0 + x] = s1;
    };
    if (sa.channels_inner() && sb.channels_inner()) {  // channels_last: channels contiguous
      for (int64_t x = 0; x < W; ++x) {
        const scalar_t* pa = ra + x * sa.w;
        const scalar_t* pb = rb + x * sb.w;
        const Norms<acc_t> nm = finalize_norms(norms_pixel<scalar_t, acc_t>(pa, pb, C));
        const DistSums<acc_t> ds = dist_pixel<scalar_t, acc_t>(pa, pb, w, C, nm);
        store(x, ds.d, nm.i0, nm.i1, nm.di, ds.s0, ds.s1);
      }
      continue;
    }
    const bool unit = sa.w == 1 && sb.w == 1;  // unit stride along the row: vectorises
    std::fill(buf.begin(), buf.begin() + 3 * W, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      if (unit)
        norms_row<scalar_t, acc_t, true>(ra + c * sa.c, rb + c * sb.c, 1, 1, W, x0, x1, x2);
      else
        norms_row<scalar_t, acc_t, false>(ra + c * sa.c, rb + c * sb.c, sa.w, sb.w, W, x0, x1, x2);
    }
    for (int64_t x = 0; x < W; ++x) {
      const Norms<acc_t> nm = finalize_norms(NormSums<acc_t>{x0[x], x1[x], x2[x]});
      i0[x] = nm.i0;
      i1[x] = nm.i1;
      di[x] = nm.di;
    }
    std::fill(buf.begin(), buf.begin() + 3 * W, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      if (unit)
        dist_row<scalar_t, acc_t, true>(ra + c * sa.c, rb + c * sb.c, 1, 1, w[c], W, i0, i1, di, x0, x1, x2);
      else
        dist_row<scalar_t, acc_t, false>(ra + c * sa.c, rb + c * sb.c, sa.w, sb.w, w[c], W, i0, i1, di, x0, x1,
                                         x2);
    }
    for (int64_t x = 0; x < W; ++x) store(x, x0[x], i0[x], i1[x], di[x], x1[x], x2[x]);
  }
}

template <typename scalar_t>
void forward_rows(const scalar_t* a, const scalar_t* b, const Strides4& sa, const Strides4& sb,
                  const at::opmath_type<scalar_t>* w, at::opmath_type<scalar_t>* map,
                  at::opmath_type<scalar_t>* stats, int64_t N, int64_t C, int64_t H, int64_t W) {
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    forward_row_range<scalar_t>(a, b, sa, sb, w, map, stats, N, C, H, W, begin, end);
  });
}

// Per-pixel rows of the backward: the stats rows [i0, i1, di = i0 - i1, s0, s1] and dL/dd.
template <typename acc_t>
struct PixelStats {
  const acc_t *i0, *i1, *di, *s0, *s1, *g;
};

// Rows [begin, end) of the backward: BOTH gradients in one pass over the two inputs (each read
// once; kA / kB: whether f0's / f1's gradient is wanted). Planar tensors with unit stride along
// the row take grad_row_pixels (vectorised); other layouts go element by element in the
// gradients' memory order.
template <typename scalar_t, bool kA, bool kB>
D2G_CPU_CLONES void backward_row_range(const scalar_t* a, const scalar_t* b, const Strides4& sa,
                                       const Strides4& sb, scalar_t* ga, const Strides4& sga, scalar_t* gb,
                                       const Strides4& sgb, const at::opmath_type<scalar_t>* w,
                                       const PixelStats<at::opmath_type<scalar_t>>& ps, int64_t C, int64_t H,
                                       int64_t W, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool unit_rows = sa.w == 1 && sb.w == 1 && (!kA || sga.w == 1) && (!kB || sgb.w == 1);
  const Strides4& sout = kA ? sga : sgb;
  const bool channels_unit = sa.c == 1 && sb.c == 1 && (!kA || sga.c == 1) && (!kB || sgb.c == 1);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / H, h = row % H;
    const int64_t p = (n * H + h) * W;
    const scalar_t* ra = a + n * sa.n + h * sa.h;
    const scalar_t* rb = b + n * sb.n + h * sb.h;
    scalar_t* rga = kA ? ga + n * sga.n + h * sga.h : nullptr;
    scalar_t* rgb = kB ? gb + n * sgb.n + h * sgb.h : nullptr;
    auto element = [&](int64_t c, int64_t x) {
      acc_t g0, g1;
      grad_pair<acc_t>(ps.g[p + x], w[c], acc_t(ra[c * sa.c + x * sa.w]), acc_t(rb[c * sb.c + x * sb.w]),
                       ps.i0[p + x], ps.i1[p + x], ps.di[p + x], ps.s0[p + x], ps.s1[p + x], g0, g1);
      if (kA) rga[c * sga.c + x * sga.w] = static_cast<scalar_t>(g0);
      if (kB) rgb[c * sgb.c + x * sgb.w] = static_cast<scalar_t>(g1);
    };
    if (!sout.channels_inner() && unit_rows) {
      for (int64_t c = 0; c < C; ++c)
        grad_row_pixels<scalar_t, acc_t, kA, kB>(ra + c * sa.c, rb + c * sb.c, kA ? rga + c * sga.c : nullptr,
                                                 kB ? rgb + c * sgb.c : nullptr, W, w[c], ps.g + p, ps.i0 + p,
                                                 ps.i1 + p, ps.di + p, ps.s0 + p, ps.s1 + p);
    } else if (sout.channels_inner() && channels_unit) {  // one pixel's channels: unit stride
      for (int64_t x = 0; x < W; ++x) {
        const scalar_t* __restrict__ pa = ra + x * sa.w;
        const scalar_t* __restrict__ pb = rb + x * sb.w;
        scalar_t* __restrict__ pga = kA ? rga + x * sga.w : nullptr;
        scalar_t* __restrict__ pgb = kB ? rgb + x * sgb.w : nullptr;
        const acc_t g = ps.g[p + x], i0 = ps.i0[p + x], i1 = ps.i1[p + x], di = ps.di[p + x],
                    s0 = ps.s0[p + x], s1 = ps.s1[p + x];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          acc_t g0, g1;
          grad_pair<acc_t>(g, w[c], acc_t(pa[c]), acc_t(pb[c]), i0, i1, di, s0, s1, g0, g1);
          if (kA) pga[c] = static_cast<scalar_t>(g0);
          if (kB) pgb[c] = static_cast<scalar_t>(g1);
        }
      }
    } else if (sout.channels_inner()) {
      for (int64_t x = 0; x < W; ++x)
        for (int64_t c = 0; c < C; ++c) element(c, x);
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t x = 0; x < W; ++x) element(c, x);
    }
  }
}

template <typename scalar_t, bool kA, bool kB>
void backward_rows(const scalar_t* a, const scalar_t* b, const Strides4& sa, const Strides4& sb, scalar_t* ga,
                   const Strides4& sga, scalar_t* gb, const Strides4& sgb, const at::opmath_type<scalar_t>* w,
                   const PixelStats<at::opmath_type<scalar_t>>& ps, int64_t N, int64_t C, int64_t H, int64_t W) {
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    backward_row_range<scalar_t, kA, kB>(a, b, sa, sb, ga, sga, gb, sgb, w, ps, C, H, W, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor> lpips_distance_cpu(const at::Tensor& f0, const at::Tensor& f1,
                                                      const at::Tensor& weight, bool spatial) {
  const auto acc = check_forward_args(f0, f1, weight);
  const auto w = weight.to(acc).contiguous();
  auto [map, stats] = alloc_forward_outputs(f0, acc);
  const int64_t N = f0.size(0), C = f0.size(1), H = f0.size(2), W = f0.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "lpips_distance_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows<scalar_t>(f0.const_data_ptr<scalar_t>(), f1.const_data_ptr<scalar_t>(), Strides4(f0),
                           Strides4(f1), w.const_data_ptr<acc_t>(), map.mutable_data_ptr<acc_t>(),
                           stats.mutable_data_ptr<acc_t>(), N, C, H, W);
  });
  return {finish_distance(map, spatial), stats};
}

std::tuple<at::Tensor, at::Tensor> lpips_distance_backward_cpu(
    const at::Tensor& grad, const at::Tensor& f0, const at::Tensor& f1, const at::Tensor& weight,
    const at::Tensor& stats, bool spatial, bool need_f0, bool need_f1) {
  check_backward_args(grad, f0, f1, weight, stats, spatial);
  const auto acc = stats.scalar_type();
  const int64_t N = f0.size(0), C = f0.size(1), H = f0.size(2), W = f0.size(3);
  const auto w = weight.to(acc).contiguous();
  const auto pixel_grad = pixel_gradient(grad, acc, N, H, W, spatial);
  auto g0 = alloc_grad(f0, need_f0);
  auto g1 = alloc_grad(f1, need_f1);
  const int64_t plane = N * H * W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "lpips_distance_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t* pg = pixel_grad.const_data_ptr<acc_t>();
    const scalar_t* a = f0.const_data_ptr<scalar_t>();
    const scalar_t* b = f1.const_data_ptr<scalar_t>();
    // stats rows: [i0, i1, di = i0 - i1, s0, s1]
    const PixelStats<acc_t> ps{st, st + plane, st + 2 * plane, st + 3 * plane, st + 4 * plane, pg};
    const Strides4 sa(f0), sb(f1);
    const acc_t* wp = w.const_data_ptr<acc_t>();
    if (need_f0 && need_f1)
      backward_rows<scalar_t, true, true>(a, b, sa, sb, g0.mutable_data_ptr<scalar_t>(), Strides4(g0),
                                          g1.mutable_data_ptr<scalar_t>(), Strides4(g1), wp, ps, N, C, H, W);
    else if (need_f0)
      backward_rows<scalar_t, true, false>(a, b, sa, sb, g0.mutable_data_ptr<scalar_t>(), Strides4(g0), nullptr,
                                           sa, wp, ps, N, C, H, W);
    else if (need_f1)
      backward_rows<scalar_t, false, true>(a, b, sa, sb, nullptr, sb, g1.mutable_data_ptr<scalar_t>(),
                                           Strides4(g1), wp, ps, N, C, H, W);
  });
  return {g0, g1};
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CPU, m) {
  m.impl("lpips_distance", &lpips_distance_cpu);
  m.impl("lpips_distance_backward", &lpips_distance_backward_cpu);
}

}  // namespace lpips
}  // namespace d2g
