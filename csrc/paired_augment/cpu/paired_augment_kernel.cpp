// CPU kernels of the paired latent augmentation.
// Forward, per sample (tasks run in parallel over the batch): the separable 7x7 weights of
// every grid point are computed once and shared by both tensors and all channels; each channel
// plane is then sampled on the grid (49 taps per point) and downsampled separably; colour and
// cutout are applied while writing. Backward is the transposed operator, plane by plane, with
// the scatter into the input gradient done by the task that owns the sample (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "paired_augment/paired_augment.h"
#include "paired_augment/paired_augment_math.h"

namespace d2g {
namespace augment {
namespace {

struct Geometry {
  int N, C, H, W;
  int mx0, my0, Wp, Hp;  // margins before, padded sizes
  int flags;
};

Geometry geometry_of(const at::Tensor& x, at::IntArrayRef margins, int64_t flags) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.mx0 = margins[0];
  g.my0 = margins[1];
  g.Wp = g.W + margins[0] + margins[2];
  g.Hp = g.H + margins[1] + margins[3];
  g.flags = static_cast<int>(flags);
  return g;
}

template <typename acc_t>
struct GridWeights {
  int GH = 0, GW = 0;
  std::vector<AxisWeights<acc_t>> wx, wy;  // per grid point (row-major, local indices)
};

template <typename acc_t>
void build_grid(const double* affine, const Geometry& g, const acc_t* f, GridWeights<acc_t>& out) {
  out.GH = grid_points(g.H);
  out.GW = grid_points(g.W);
  out.wx.resize(static_cast<size_t>(out.GH) * out.GW);
  out.wy.resize(static_cast<size_t>(out.GH) * out.GW);
  for (int ly = 0; ly < out.GH; ++ly)
    for (int lx = 0; lx < out.GW; ++lx) {
      const Coord a = sample_coord(affine, lx + 1, ly + 1);
      const size_t i = static_cast<size_t>(ly) * out.GW + lx;
      axis_weights(a.x, g.mx0, g.W, g.Wp, f, out.wx[i]);
      axis_weights(a.y, g.my0, g.H, g.Hp, f, out.wy[i]);
    }
}

// geometric transform of one channel plane: in (strided) -> out (H x W, contiguous acc_t)
template <typename scalar_t, typename acc_t>
void geometry_plane(const scalar_t* in, int64_t sh, int64_t sw, const GridWeights<acc_t>& grid,
                    const acc_t* f, int H, int W, std::vector<acc_t>& S, std::vector<acc_t>& tmp,
                    acc_t* out) {
  const int GH = grid.GH, GW = grid.GW;
  for (int ly = 0; ly < GH; ++ly)
    for (int lx = 0; lx < GW; ++lx) {
      const size_t i = static_cast<size_t>(ly) * GW + lx;
      const AxisWeights<acc_t>& wx = grid.wx[i];
      const AxisWeights<acc_t>& wy = grid.wy[i];
      acc_t sum = 0;
      for (int r = 0; r < kSpan; ++r) {
        if (wy.src[r] < 0 || wy.w[r] == acc_t(0)) continue;
        const scalar_t* row = in + wy.src[r] * sh;
        acc_t rs = 0;
        for (int k = 0; k < kSpan; ++k)
          if (wx.src[k] >= 0) rs += wx.w[k] * static_cast<acc_t>(row[wx.src[k] * sw]);
        sum += wy.w[r] * rs;
      }
      S[i] = sum;
    }
  // downsample along x: tmp[ly][qx] = sum_k f[k] S[ly][2 qx + k]
  for (int ly = 0; ly < GH; ++ly)
    for (int qx = 0; qx < W; ++qx) {
      acc_t sum = 0;
      const acc_t* s = S.data() + static_cast<size_t>(ly) * GW + 2 * qx;
      for (int k = 0; k < kTaps; ++k) sum += f[k] * s[k];
      tmp[static_cast<size_t>(ly) * W + qx] = sum;
    }
  // and along y
  for (int qy = 0; qy < H; ++qy)
    for (int qx = 0; qx < W; ++qx) {
      acc_t sum = 0;
      for (int k = 0; k < kTaps; ++k) sum += f[k] * tmp[static_cast<size_t>(2 * qy + k) * W + qx];
      out[static_cast<size_t>(qy) * W + qx] = sum;
    }
}

// transposed geometric transform of one plane: gout (H x W) -> gin (H x W, accumulated)
template <typename acc_t>
void geometry_plane_adjoint(const acc_t* gout, const GridWeights<acc_t>& grid, const acc_t* f,
                            int H, int W, std::vector<acc_t>& S, std::vector<acc_t>& tmp,
                            acc_t* gin) {
  const int GH = grid.GH, GW = grid.GW;
  std::fill(tmp.begin(), tmp.end(), acc_t(0));
  for (int qy = 0; qy < H; ++qy)
    for (int k = 0; k < kTaps; ++k) {
      acc_t* t = tmp.data() + static_cast<size_t>(2 * qy + k) * W;
      const acc_t* g = gout + static_cast<size_t>(qy) * W;
      for (int qx = 0; qx < W; ++qx) t[qx] += f[k] * g[qx];
    }
  std::fill(S.begin(), S.end(), acc_t(0));
  for (int ly = 0; ly < GH; ++ly)
    for (int qx = 0; qx < W; ++qx) {
      const acc_t v = tmp[static_cast<size_t>(ly) * W + qx];
      acc_t* s = S.data() + static_cast<size_t>(ly) * GW + 2 * qx;
      for (int k = 0; k < kTaps; ++k) s[k] += f[k] * v;
    }
  for (size_t i = 0; i < S.size(); ++i) {
    const acc_t v = S[i];
    if (v == acc_t(0)) continue;
    const AxisWeights<acc_t>& wx = grid.wx[i];
    const AxisWeights<acc_t>& wy = grid.wy[i];
    for (int r = 0; r < kSpan; ++r) {
      if (wy.src[r] < 0 || wy.w[r] == acc_t(0)) continue;
      const acc_t vr = v * wy.w[r];
      acc_t* row = gin + static_cast<size_t>(wy.src[r]) * W;
      for (int k = 0; k < kSpan; ++k)
        if (wx.src[k] >= 0) row[wx.src[k]] += vr * wx.w[k];
    }
  }
}

// per-pixel channel mean and overall mean of a (C, H, W) buffer
template <typename acc_t>
acc_t means(const acc_t* v, int C, int HW, std::vector<acc_t>& channel_mean) {
  acc_t total = 0;
  for (int p = 0; p < HW; ++p) {
    acc_t s = 0;
    for (int c = 0; c < C; ++c) s += v[static_cast<size_t>(c) * HW + p];
    channel_mean[p] = s / C;
    total += s;
  }
  return total / (static_cast<acc_t>(C) * HW);
}

template <typename scalar_t>
void run(const std::vector<at::Tensor>& ins, const std::vector<at::Tensor>& outs,
         const double* params, const Geometry& g, bool adjoint) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto fd = normalized_filter();
  acc_t f[kTaps];
  for (int i = 0; i < kTaps; ++i) f[i] = static_cast<acc_t>(fd[i]);
  const bool geom = g.flags & kGeometry, colour = g.flags & kColour, cutout = g.flags & kCutout;
  const int H = g.H, W = g.W, C = g.C, HW = H * W;

  at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
    GridWeights<acc_t> grid;
    std::vector<acc_t> S, tmp, buf(static_cast<size_t>(C) * HW), gbuf, cmean(HW);
    std::vector<uint8_t> keep(HW, 1);
    if (geom) {
      S.resize(static_cast<size_t>(grid_points(H)) * grid_points(W));
      tmp.resize(static_cast<size_t>(grid_points(H)) * W);
      gbuf.resize(static_cast<size_t>(C) * HW);
    }
    for (int64_t n = begin; n < end; ++n) {
      const double* P = params + n * kParams;
      if (geom) build_grid(P, g, f, grid);
      if (cutout)
        for (int y = 0; y < H; ++y)
          for (int x = 0; x < W; ++x)
            keep[y * W + x] = cutout_keep(x, y, W, H, static_cast<float>(P[9]), static_cast<float>(P[10]),
                                          static_cast<float>(P[11]), static_cast<float>(P[12]));
      const acc_t b = (g.flags & kLinear) ? acc_t(0) : static_cast<acc_t>(P[6]), c = static_cast<acc_t>(P[7]), s = static_cast<acc_t>(P[8]);
      for (size_t t = 0; t < ins.size(); ++t) {
        const at::Tensor& in = ins[t];
        const at::Tensor& out = outs[t];
        const scalar_t* ip = in.data_ptr<scalar_t>() + n * in.stride(0);
        scalar_t* op = out.data_ptr<scalar_t>() + n * out.stride(0);
        const int64_t isc = in.stride(1), ish = in.stride(2), isw = in.stride(3);
        const int64_t osc = out.stride(1), osh = out.stride(2), osw = out.stride(3);
        if (!adjoint) {
          // buf = geometric output (or the input)
          for (int ch = 0; ch < C; ++ch) {
            acc_t* dst = buf.data() + static_cast<size_t>(ch) * HW;
            if (geom) {
              geometry_plane(ip + ch * isc, ish, isw, grid, f, H, W, S, tmp, dst);
            } else {
              for (int y = 0; y < H; ++y)
                for (int x = 0; x < W; ++x)
                  dst[y * W + x] = static_cast<acc_t>(ip[ch * isc + y * ish + x * isw]);
            }
          }
          const acc_t m = colour ? means(buf.data(), C, HW, cmean) : acc_t(0);
          for (int ch = 0; ch < C; ++ch)
            for (int y = 0; y < H; ++y)
              for (int x = 0; x < W; ++x) {
                const int p = y * W + x;
                acc_t v = buf[static_cast<size_t>(ch) * HW + p];
                if (colour) v = colour_apply(v, cmean[p], m, b, c, s);
                if (cutout && !keep[p]) v = acc_t(0);
                op[ch * osc + y * osh + x * osw] = static_cast<scalar_t>(v);
              }
        } else {
          // buf = gradient of the geometric output: cutout, then colour transposed
          for (int ch = 0; ch < C; ++ch)
            for (int y = 0; y < H; ++y)
              for (int x = 0; x < W; ++x) {
                const int p = y * W + x;
                acc_t v = static_cast<acc_t>(ip[ch * isc + y * ish + x * isw]);
                if (cutout && !keep[p]) v = acc_t(0);
                buf[static_cast<size_t>(ch) * HW + p] = v;
              }
          if (colour) {
            const acc_t m = means(buf.data(), C, HW, cmean);
            for (int ch = 0; ch < C; ++ch)
              for (int p = 0; p < HW; ++p) {
                acc_t& v = buf[static_cast<size_t>(ch) * HW + p];
                v = colour_adjoint(v, cmean[p], m, c, s);
              }
          }
          const acc_t* src = buf.data();
          if (geom) {
            std::fill(gbuf.begin(), gbuf.end(), acc_t(0));
            for (int ch = 0; ch < C; ++ch)
              geometry_plane_adjoint(buf.data() + static_cast<size_t>(ch) * HW, grid, f, H, W, S,
                                     tmp, gbuf.data() + static_cast<size_t>(ch) * HW);
            src = gbuf.data();
          }
          for (int ch = 0; ch < C; ++ch)
            for (int y = 0; y < H; ++y)
              for (int x = 0; x < W; ++x)
                op[ch * osc + y * osh + x * osw] =
                    static_cast<scalar_t>(src[static_cast<size_t>(ch) * HW + y * W + x]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> apply_cpu(const char* op, const char* nx, const char* ny,
                                             const at::Tensor& x, const std::optional<at::Tensor>& y,
                                             const at::Tensor& params, at::IntArrayRef margins,
                                             int64_t flags, bool adjoint) {
  check_args(op, nx, x, ny, y, params, margins, flags);
  std::vector<at::Tensor> ins{x}, outs{alloc_like(x)};
  if (y.has_value()) {
    ins.push_back(*y);
    outs.push_back(alloc_like(*y));
  }
  const Geometry g = geometry_of(x, margins, flags);
  const at::Tensor p = params.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "paired_augment_cpu", [&] {
    run<scalar_t>(ins, outs, p.data_ptr<double>(), g, adjoint);
  });
  return {outs[0], y.has_value() ? outs[1] : empty_output(x)};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& y,
                                               const at::Tensor& params, at::IntArrayRef margins,
                                               int64_t flags) {
  return apply_cpu("d2g_fast::paired_augment", "x", "y", x, y, params, margins, flags, false);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& gx, const std::optional<at::Tensor>& gy,
                                                const at::Tensor& params, at::IntArrayRef margins,
                                                int64_t flags) {
  return apply_cpu("d2g_fast::paired_augment_backward", "grad_x", "grad_y", gx, gy, params, margins,
                   flags, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CPU, m) {
  m.impl("paired_augment", &forward_cpu);
  m.impl("paired_augment_backward", &backward_cpu);
}

}  // namespace augment
}  // namespace d2g
