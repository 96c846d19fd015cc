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
        NormSums<acc_t> ns;
        zero(ns);
        for (int64_t c = 0; c < C; ++c) accumulate_norms(ns, acc_t(pa[c]), acc_t(pb[c]));
        const Norms<acc_t> nm = finalize_norms(ns);
        DistSums<acc_t> ds;
        zero(ds);
        for (int64_t c = 0; c < C; ++c) accumulate_dist(ds, acc_t(pa[c]), acc_t(pb[c]), w[c], nm);
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

// Writes the gradient for one input: self_ is the input being differentiated, other its pair;
// i_self = its 1/|.|, di_self = i_self - i_other (sign +1 for f0, -1 for f1 applied to the
// stored i0 - i1), s_self its s statistic.
template <typename scalar_t>
D2G_CPU_CLONES void backward_row_range(
    const scalar_t* self_, const scalar_t* other, const Strides4& ss, const Strides4& so, scalar_t* out,
    const Strides4& sout, const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* pixel_grad,
    const at::opmath_type<scalar_t>* i_self, const at::opmath_type<scalar_t>* di,
    at::opmath_type<scalar_t> di_sign, const at::opmath_type<scalar_t>* s_self, int64_t C, int64_t H,
    int64_t W, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / H, h = row % H;
    const int64_t pix0 = (n * H + h) * W;
    const scalar_t* ra = self_ + n * ss.n + h * ss.h;
    const scalar_t* rb = other + n * so.n + h * so.h;
    scalar_t* ro = out + n * sout.n + h * sout.h;
    if (sout.channels_inner()) {
      for (int64_t x = 0; x < W; ++x) {
        const int64_t p = pix0 + x;
        for (int64_t c = 0; c < C; ++c)
          ro[x * sout.w + c] = static_cast<scalar_t>(grad_one<acc_t>(
              pixel_grad[p], w[c], acc_t(ra[x * ss.w + c * ss.c]), acc_t(rb[x * so.w + c * so.c]),
              i_self[p], di_sign * di[p], s_self[p]));
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t x = 0; x < W; ++x) {
          const int64_t p = pix0 + x;
          ro[c * sout.c + x * sout.w] = static_cast<scalar_t>(grad_one<acc_t>(
              pixel_grad[p], w[c], acc_t(ra[c * ss.c + x * ss.w]), acc_t(rb[c * so.c + x * so.w]),
              i_self[p], di_sign * di[p], s_self[p]));
        }
      }
    }
  }
}

template <typename scalar_t>
void backward_one(const scalar_t* self_, const scalar_t* other, const Strides4& ss,
                  const Strides4& so, scalar_t* out, const Strides4& sout,
                  const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* pixel_grad,
                  const at::opmath_type<scalar_t>* i_self, const at::opmath_type<scalar_t>* di,
                  at::opmath_type<scalar_t> di_sign, const at::opmath_type<scalar_t>* s_self, int64_t N,
                  int64_t C, int64_t H, int64_t W) {
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    backward_row_range<scalar_t>(self_, other, ss, so, out, sout, w, pixel_grad, i_self, di, di_sign,
                                 s_self, C, H, W, begin, end);
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
    if (need_f0)
      backward_one<scalar_t>(a, b, Strides4(f0), Strides4(f1), g0.mutable_data_ptr<scalar_t>(), Strides4(g0),
                             w.const_data_ptr<acc_t>(), pg, st, st + 2 * plane, acc_t(1), st + 3 * plane, N, C, H,
                             W);
    if (need_f1)
      backward_one<scalar_t>(b, a, Strides4(f1), Strides4(f0), g1.mutable_data_ptr<scalar_t>(), Strides4(g1),
                             w.const_data_ptr<acc_t>(), pg, st + plane, st + 2 * plane, acc_t(-1), st + 4 * plane, N,
                             C, H, W);
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
