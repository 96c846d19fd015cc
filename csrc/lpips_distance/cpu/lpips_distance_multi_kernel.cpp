// CPU kernel of lpips_distance_multi: the rows (n, h) of every layer in ONE at::parallel_for,
// split into chunks of about equal cost so that cheap and expensive layers balance across
// threads. Per row two passes over the channels (norms, then the distance sums; the second
// reads the row again from cache). Forward: the row sums of the distance go to a buffer that
// is reduced per (layer, sample) in a fixed order afterwards (deterministic). Backward: one
// pass that reads f0 and f1 once and writes both gradients.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/macros.h"
#include "lpips_distance/lpips_distance_math.h"
#include "lpips_distance/cpu/lpips_distance_rows.h"
#include "lpips_distance/lpips_distance_multi.h"

namespace d2g {
namespace lpips {
namespace {

struct Strides4 {
  int64_t n = 0, c = 0, h = 0, w = 0;
  Strides4() = default;
  explicit Strides4(const at::Tensor& t) {
    if (t.dim() == 4) n = t.stride(0), c = t.stride(1), h = t.stride(2), w = t.stride(3);
  }
};

template <typename scalar_t, typename acc_t>
struct Layer {
  const scalar_t* a;
  const scalar_t* b;
  Strides4 sa, sb;
  scalar_t* ga = nullptr;
  scalar_t* gb = nullptr;
  Strides4 sga, sgb;
  const acc_t* w;
  int64_t C, H, W;
  int64_t pix0;  // this layer's first pixel in the stats rows
};

struct Chunk {
  int64_t layer, row_begin, row_end;
};

// Work units of every layer (units[k] of unit_cost[k] element pairs each) cut into chunks of
// about total / (threads * 16) element pairs; for_each_chunk hands them out dynamically, so
// cheap and expensive layers balance across threads.
std::vector<Chunk> make_chunks(const std::vector<int64_t>& units, const std::vector<int64_t>& unit_cost) {
  int64_t total = 0;
  for (size_t k = 0; k < units.size(); ++k) total += units[k] * unit_cost[k];
  const int64_t target = std::max<int64_t>(1, total / (int64_t(at::get_num_threads()) * 16));
  std::vector<Chunk> chunks;
  for (size_t k = 0; k < units.size(); ++k) {
    const int64_t per_chunk = std::max<int64_t>(1, target / std::max<int64_t>(1, unit_cost[k]));
    for (int64_t r = 0; r < units[k]; r += per_chunk)
      chunks.push_back({int64_t(k), r, std::min(units[k], r + per_chunk)});
  }
  return chunks;
}

// Runs fn(chunk index) for every chunk on the intra-op threads, each thread taking the next
// chunk when it is done (dynamic: the layers' costs per element differ). Every chunk writes
// its own outputs, so the results do not depend on which thread ran what.
template <typename F>
void for_each_chunk(int64_t chunks, const F& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < chunks; i = next.fetch_add(1)) fn(i);
  });
}

template <typename scalar_t, typename acc_t>
std::vector<Layer<scalar_t, acc_t>> make_layers(const MultiArgs& m) {
  std::vector<Layer<scalar_t, acc_t>> layers;
  for (int64_t k = 0; k < m.L; ++k) {
    const auto &a = m.f0[k], &b = m.f1[k];
    Layer<scalar_t, acc_t> l{a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), Strides4(a), Strides4(b)};
    l.w = m.w[k].const_data_ptr<acc_t>();
    l.C = a.size(1), l.H = a.size(2), l.W = a.size(3);
    l.pix0 = m.pixel_begin[k];
    layers.push_back(l);
  }
  return layers;
}

// Planar rows: the sums of the run's pixels in separate arrays (buf holds 6 * run values). A run
// is one image row (run = W), or `rows` consecutive rows of planes contiguous along the rows
// (run = rows * W, unit stride): longer unit-stride runs per channel, still small enough for
// the second pass to find them in cache.
template <typename scalar_t, typename acc_t, bool kUnit>
D2G_CPU_CLONES acc_t forward_row_planar(const Layer<scalar_t, acc_t>& l, int64_t n, int64_t h, int64_t rows, acc_t* st,
                         int64_t P, acc_t* buf) {
  const int64_t W = l.W * rows;
  const scalar_t* ra = l.a + n * l.sa.n + h * l.sa.h;
  const scalar_t* rb = l.b + n * l.sb.n + h * l.sb.h;
  const int64_t pix = l.pix0 + (n * l.H + h) * l.W;
  acc_t *x0 = buf, *x1 = buf + W, *x2 = buf + 2 * W, *i0 = buf + 3 * W, *i1 = buf + 4 * W, *di = buf + 5 * W;
  std::fill(buf, buf + 3 * W, acc_t(0));
  for (int64_t c = 0; c < l.C; ++c)  // pass 1: |a|^2, |b|^2, |b|^2 - |a|^2
    norms_row<scalar_t, acc_t, kUnit>(ra + c * l.sa.c, rb + c * l.sb.c, l.sa.w, l.sb.w, W, x0, x1, x2);
  for (int64_t x = 0; x < W; ++x) {
    const Norms<acc_t> nm = finalize_norms(NormSums<acc_t>{x0[x], x1[x], x2[x]});
    i0[x] = nm.i0;
    i1[x] = nm.i1;
    di[x] = nm.di;
  }
  std::fill(buf, buf + 3 * W, acc_t(0));
  for (int64_t c = 0; c < l.C; ++c)  // pass 2: d, s0, s1 (the row again, from cache)
    dist_row<scalar_t, acc_t, kUnit>(ra + c * l.sa.c, rb + c * l.sb.c, l.sa.w, l.sb.w, l.w[c], W, i0, i1, di,
                                      x0, x1, x2);
  acc_t row_sum = 0;
  for (int64_t x = 0; x < W; ++x) {
    st[pix + x] = i0[x];
    st[P + pix + x] = i1[x];
    st[2 * P + pix + x] = di[x];
    st[3 * P + pix + x] = x1[x];
    st[4 * P + pix + x] = x2[x];
    row_sum += x0[x];
  }
  return row_sum;
}

// Channels innermost in both inputs: a pixel's channels are contiguous; two passes per pixel.
template <typename scalar_t, typename acc_t>
D2G_CPU_CLONES acc_t forward_row_channels_inner(const Layer<scalar_t, acc_t>& l, int64_t n, int64_t h, acc_t* st, int64_t P) {
  const int64_t pix = l.pix0 + (n * l.H + h) * l.W;
  acc_t row_sum = 0;
  for (int64_t x = 0; x < l.W; ++x) {
    const scalar_t* pa = l.a + n * l.sa.n + h * l.sa.h + x * l.sa.w;
    const scalar_t* pb = l.b + n * l.sb.n + h * l.sb.h + x * l.sb.w;
    NormSums<acc_t> ns;
    zero(ns);
    if (l.sa.c == 1 && l.sb.c == 1) {
      ns = norms_pixel<scalar_t, acc_t>(pa, pb, l.C);
    } else {
      for (int64_t c = 0; c < l.C; ++c) accumulate_norms(ns, acc_t(pa[c * l.sa.c]), acc_t(pb[c * l.sb.c]));
    }
    const Norms<acc_t> nm = finalize_norms(ns);
    DistSums<acc_t> ds;
    zero(ds);
    if (l.sa.c == 1 && l.sb.c == 1) {
      ds = dist_pixel<scalar_t, acc_t>(pa, pb, l.w, l.C, nm);
    } else {
      for (int64_t c = 0; c < l.C; ++c)
        accumulate_dist(ds, acc_t(pa[c * l.sa.c]), acc_t(pb[c * l.sb.c]), l.w[c], nm);
    }
    st[pix + x] = nm.i0;
    st[P + pix + x] = nm.i1;
    st[2 * P + pix + x] = nm.di;
    st[3 * P + pix + x] = ds.s0;
    st[4 * P + pix + x] = ds.s1;
    row_sum += ds.d;
  }
  return row_sum;
}

std::tuple<at::Tensor, at::Tensor> lpips_distance_multi_cpu(at::TensorList f0, at::TensorList f1,
                                                            at::TensorList weights) {
  const MultiArgs m = prepare_multi("d2g_fast::lpips_distance_multi", f0, f1, weights);
  auto stats = alloc_multi_stats(m);
  auto dist = poisoned(at::empty({m.L, m.N}, m.f0[0].options().dtype(m.acc)));
  // Work unit: a block of `rows_per_unit[k]` image rows of one sample. Blocks of several rows
  // only for planar layers whose planes are contiguous along the rows; the block size depends on
  // the shapes only, so the sums (reduced per unit in a fixed order) do not depend on the
  // thread count.
  std::vector<int64_t> rows_per_unit(m.L), units_per_sample(m.L), units(m.L), unit_cost(m.L), unit0(m.L);
  int64_t total_units = 0, max_run = 1;
  for (int64_t k = 0; k < m.L; ++k) {
    const auto &a = m.f0[k], &b = m.f1[k];
    const int64_t C = a.size(1), H = a.size(2), W = a.size(3);
    const bool channels_inner = a.stride(1) == 1 && b.stride(1) == 1 && C > 1;
    const bool row_contiguous = a.stride(3) == 1 && b.stride(3) == 1 && a.stride(2) == W && b.stride(2) == W;
    rows_per_unit[k] = channels_inner || !row_contiguous ? 1 : std::clamp<int64_t>(16384 / (C * W), 1, H);
    units_per_sample[k] = (H + rows_per_unit[k] - 1) / rows_per_unit[k];
    units[k] = m.N * units_per_sample[k];
    unit_cost[k] = C * W * rows_per_unit[k];
    unit0[k] = total_units;
    total_units += units[k];
    max_run = std::max(max_run, rows_per_unit[k] * W);
  }
  const auto chunks = make_chunks(units, unit_cost);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.dtype, "lpips_distance_multi_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto layers = make_layers<scalar_t, acc_t>(m);
    const int64_t P = m.pixels();
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    std::vector<acc_t> unit_sums(total_units);
    for_each_chunk(static_cast<int64_t>(chunks.size()), [&](int64_t i) {
      std::vector<acc_t> buf(6 * max_run);  // per chunk: a few dozen small allocations per call
      {
        const int64_t k = chunks[i].layer;
        const auto& l = layers[k];
        const bool channels_inner = l.sa.c == 1 && l.sb.c == 1 && l.C > 1;
        const bool unit = l.sa.w == 1 && l.sb.w == 1;
        for (int64_t u = chunks[i].row_begin; u < chunks[i].row_end; ++u) {
          const int64_t n = u / units_per_sample[k], h = (u % units_per_sample[k]) * rows_per_unit[k];
          const int64_t rows = std::min(rows_per_unit[k], l.H - h);
          unit_sums[unit0[k] + u] =
              channels_inner ? forward_row_channels_inner(l, n, h, st, P)
              : unit         ? forward_row_planar<scalar_t, acc_t, true>(l, n, h, rows, st, P, buf.data())
                             : forward_row_planar<scalar_t, acc_t, false>(l, n, h, rows, st, P, buf.data());
        }
      }
    });
    acc_t* out = dist.mutable_data_ptr<acc_t>();
    for (int64_t k = 0; k < m.L; ++k) {
      const auto& l = layers[k];
      for (int64_t n = 0; n < m.N; ++n) {
        acc_t s = 0;
        for (int64_t u = 0; u < units_per_sample[k]; ++u) s += unit_sums[unit0[k] + n * units_per_sample[k] + u];
        out[k * m.N + n] = s / acc_t(l.H * l.W);
      }
    }
  });
  return {dist, stats};
}

// One channel of a planar row with unit stride along the row in every tensor (vectorises).
template <typename scalar_t, typename acc_t, bool kA, bool kB>
inline void grad_row(const scalar_t* __restrict__ pa, const scalar_t* __restrict__ pb, scalar_t* __restrict__ pga,
                     scalar_t* __restrict__ pgb, int64_t W, acc_t g, acc_t wc, const acc_t* __restrict__ i0,
                     const acc_t* __restrict__ i1, const acc_t* __restrict__ di, const acc_t* __restrict__ s0,
                     const acc_t* __restrict__ s1) {
  for (int64_t x = 0; x < W; ++x) {
    acc_t g0, g1;
    grad_pair<acc_t>(g, wc, acc_t(pa[x]), acc_t(pb[x]), i0[x], i1[x], di[x], s0[x], s1[x], g0, g1);
    if (kA) pga[x] = static_cast<scalar_t>(g0);
    if (kB) pgb[x] = static_cast<scalar_t>(g1);
  }
}

// One pixel with every tensor's channels contiguous: one loop per gradient (fewer streams in
// flight than writing both at once; the pixel's inputs stay in L1 for the second loop).
template <typename scalar_t, typename acc_t, bool kA, bool kB>
inline void grad_pixel_channels(const scalar_t* __restrict__ pa, const scalar_t* __restrict__ pb,
                                scalar_t* __restrict__ pga, scalar_t* __restrict__ pgb, int64_t C, acc_t g,
                                const acc_t* __restrict__ w, acc_t i0, acc_t i1, acc_t di, acc_t s0, acc_t s1) {
  if (kA) {
    for (int64_t c = 0; c < C; ++c) {
      acc_t g0, g1;
      grad_pair<acc_t>(g, w[c], acc_t(pa[c]), acc_t(pb[c]), i0, i1, di, s0, s1, g0, g1);
      pga[c] = static_cast<scalar_t>(g0);
    }
  }
  if (kB) {
    for (int64_t c = 0; c < C; ++c) {
      acc_t g0, g1;
      grad_pair<acc_t>(g, w[c], acc_t(pa[c]), acc_t(pb[c]), i0, i1, di, s0, s1, g0, g1);
      pgb[c] = static_cast<scalar_t>(g1);
    }
  }
}

template <typename scalar_t, typename acc_t, bool kA, bool kB>
D2G_CPU_CLONES void backward_row(const Layer<scalar_t, acc_t>& l, int64_t n, int64_t h, const acc_t* st, int64_t P, acc_t g,
                  bool channels_inner) {
  const int64_t pix = l.pix0 + (n * l.H + h) * l.W;
  const acc_t *i0 = st + pix, *i1 = st + P + pix, *di = st + 2 * P + pix, *s0 = st + 3 * P + pix,
              *s1 = st + 4 * P + pix;
  const scalar_t* ra = l.a + n * l.sa.n + h * l.sa.h;
  const scalar_t* rb = l.b + n * l.sb.n + h * l.sb.h;
  scalar_t* rga = kA ? l.ga + n * l.sga.n + h * l.sga.h : nullptr;
  scalar_t* rgb = kB ? l.gb + n * l.sgb.n + h * l.sgb.h : nullptr;
  auto element = [&](int64_t c, int64_t x) {
    acc_t g0, g1;
    grad_pair<acc_t>(g, l.w[c], acc_t(ra[c * l.sa.c + x * l.sa.w]), acc_t(rb[c * l.sb.c + x * l.sb.w]), i0[x],
                     i1[x], di[x], s0[x], s1[x], g0, g1);
    if (kA) rga[c * l.sga.c + x * l.sga.w] = static_cast<scalar_t>(g0);
    if (kB) rgb[c * l.sgb.c + x * l.sgb.w] = static_cast<scalar_t>(g1);
  };
  if (channels_inner && l.sa.c == 1 && l.sb.c == 1 && (!kA || l.sga.c == 1) && (!kB || l.sgb.c == 1)) {
    for (int64_t x = 0; x < l.W; ++x)
      grad_pixel_channels<scalar_t, acc_t, kA, kB>(ra + x * l.sa.w, rb + x * l.sb.w, kA ? rga + x * l.sga.w : nullptr,
                                                   kB ? rgb + x * l.sgb.w : nullptr, l.C, g, l.w, i0[x], i1[x],
                                                   di[x], s0[x], s1[x]);
  } else if (channels_inner) {  // write in the gradients' memory order
    for (int64_t x = 0; x < l.W; ++x)
      for (int64_t c = 0; c < l.C; ++c) element(c, x);
  } else if (l.sa.w == 1 && l.sb.w == 1 && (!kA || l.sga.w == 1) && (!kB || l.sgb.w == 1)) {
    for (int64_t c = 0; c < l.C; ++c)
      grad_row<scalar_t, acc_t, kA, kB>(ra + c * l.sa.c, rb + c * l.sb.c, kA ? rga + c * l.sga.c : nullptr,
                                        kB ? rgb + c * l.sgb.c : nullptr, l.W, g, l.w[c], i0, i1, di, s0, s1);
  } else {
    for (int64_t c = 0; c < l.C; ++c)
      for (int64_t x = 0; x < l.W; ++x) element(c, x);
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> lpips_distance_multi_backward_cpu(
    const at::Tensor& grad, at::TensorList f0, at::TensorList f1, at::TensorList weights, const at::Tensor& stats,
    bool need_f0, bool need_f1) {
  static constexpr const char* op = "d2g_fast::lpips_distance_multi_backward";
  const MultiArgs m = prepare_multi(op, f0, f1, weights);
  check_multi_backward(op, grad, stats, m);
  auto g0 = alloc_multi_grads(m.f0, need_f0);
  auto g1 = alloc_multi_grads(m.f1, need_f1);
  if (!need_f0 && !need_f1) return {g0, g1};
  const auto gcont = grad.to(m.acc).contiguous();
  // Layers whose channel planes are contiguous in every tensor read or written go plane by
  // plane: long unit-stride runs (prefetch-friendly), where short image rows of planar layers
  // jump a whole plane between channels; the plane's stats stay in cache across channels.
  std::vector<bool> whole_planes(m.L);
  auto plane_contiguous = [](const at::Tensor& t) { return t.stride(3) == 1 && t.stride(2) == t.size(3); };
  for (int64_t k = 0; k < m.L; ++k)
    whole_planes[k] = m.f0[k].size(1) > 1 && plane_contiguous(m.f0[k]) && plane_contiguous(m.f1[k]) &&
                      (!need_f0 || plane_contiguous(g0[k])) && (!need_f1 || plane_contiguous(g1[k]));
  std::vector<int64_t> units(m.L), unit_cost(m.L);
  for (int64_t k = 0; k < m.L; ++k) {  // units: planes (n, c) or image rows (n, h)
    const auto& f = m.f0[k];
    units[k] = m.N * (whole_planes[k] ? f.size(1) : f.size(2));
    unit_cost[k] = whole_planes[k] ? f.size(2) * f.size(3) : f.size(1) * f.size(3);
  }
  const auto chunks = make_chunks(units, unit_cost);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.dtype, "lpips_distance_multi_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto layers = make_layers<scalar_t, acc_t>(m);
    for (int64_t k = 0; k < m.L; ++k) {
      if (need_f0) layers[k].ga = g0[k].mutable_data_ptr<scalar_t>(), layers[k].sga = Strides4(g0[k]);
      if (need_f1) layers[k].gb = g1[k].mutable_data_ptr<scalar_t>(), layers[k].sgb = Strides4(g1[k]);
    }
    const int64_t P = m.pixels();
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t* gp = gcont.const_data_ptr<acc_t>();
    for_each_chunk(static_cast<int64_t>(chunks.size()), [&](int64_t i) {
      {
        const int64_t k = chunks[i].layer;
        const auto& l = layers[k];
        if (whole_planes[k]) {
          const int64_t HW = l.H * l.W;
          for (int64_t r = chunks[i].row_begin; r < chunks[i].row_end; ++r) {
            const int64_t n = r / l.C, c = r % l.C;
            const acc_t g = gp[k * m.N + n] / acc_t(HW);  // derivative of the spatial mean
            const int64_t pix = l.pix0 + n * HW;
            auto run = [&](auto kA, auto kB) {
              grad_row<scalar_t, acc_t, decltype(kA)::value, decltype(kB)::value>(
                  l.a + n * l.sa.n + c * l.sa.c, l.b + n * l.sb.n + c * l.sb.c,
                  need_f0 ? l.ga + n * l.sga.n + c * l.sga.c : nullptr,
                  need_f1 ? l.gb + n * l.sgb.n + c * l.sgb.c : nullptr, HW, g, l.w[c], st + pix, st + P + pix,
                  st + 2 * P + pix, st + 3 * P + pix, st + 4 * P + pix);
            };
            if (need_f0 && need_f1)
              run(std::true_type{}, std::true_type{});
            else if (need_f0)
              run(std::true_type{}, std::false_type{});
            else
              run(std::false_type{}, std::true_type{});
          }
          return;
        }
        const bool channels_inner = (need_f0 ? l.sga.c : l.sgb.c) == 1 && l.C > 1;
        for (int64_t r = chunks[i].row_begin; r < chunks[i].row_end; ++r) {
          const int64_t n = r / l.H, h = r % l.H;
          const acc_t g = gp[k * m.N + n] / acc_t(l.H * l.W);  // derivative of the spatial mean
          if (need_f0 && need_f1)
            backward_row<scalar_t, acc_t, true, true>(l, n, h, st, P, g, channels_inner);
          else if (need_f0)
            backward_row<scalar_t, acc_t, true, false>(l, n, h, st, P, g, channels_inner);
          else
            backward_row<scalar_t, acc_t, false, true>(l, n, h, st, P, g, channels_inner);
        }
      }
    });
  });
  return {g0, g1};
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CPU, m) {
  m.impl("lpips_distance_multi", &lpips_distance_multi_cpu);
  m.impl("lpips_distance_multi_backward", &lpips_distance_multi_backward_cpu);
}

}  // namespace lpips
}  // namespace d2g
