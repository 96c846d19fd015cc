// CPU kernels of the paired latent augmentation. Tasks run in parallel over the batch; a task
// transforms every plane of its sample (both tensors, all channels) at once, interleaved
// pixel-major so the inner loops run over planes (SIMD).
// Forward: float32 / half types build the 2x upsampled reflect-padded image with separable
// contiguous passes and sample it bilinearly at the grid points (4 taps); float64 evaluates each
// grid point directly as the separable 7x7 weighted sum that the CUDA kernel uses (so the float64
// tests exercise that shared math). Then separable 2x downsampling, colour and cutout.
// Backward: the transposed operator, with every scatter owned by the sample's task
// (deterministic, no atomics).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

Geometry geometry_of(const at::Tensor& x, int64_t flags) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.mx0 = g.my0 = 0;
  g.Wp = g.W;
  g.Hp = g.H;
  g.flags = static_cast<int>(flags);
  return g;
}

// The geometry of sample n: its margins are columns 13..16 of its packed row (check_args has
// verified them: whole numbers in [0, size - 1]).
Geometry sample_geometry(const Geometry& batch, const double* P) {
  Geometry g = batch;
  const int m[4] = {static_cast<int>(P[kMarginCol]), static_cast<int>(P[kMarginCol + 1]),
                    static_cast<int>(P[kMarginCol + 2]), static_cast<int>(P[kMarginCol + 3])};
  g.mx0 = m[0];
  g.my0 = m[1];
  g.Wp = g.W + m[0] + m[2];
  g.Hp = g.H + m[1] + m[3];
  return g;
}

// Sampling weights of grid point (lx, ly) (local indices) of sample parameters P.
// Zero-region taps get weight 0 and source index 0, so the tap loops need no branches.
template <typename acc_t>
inline void point_weights(const double* P, const Geometry& g, const acc_t* f, int lx, int ly,
                          AxisWeights<acc_t>& wx, AxisWeights<acc_t>& wy) {
  const Coord a = sample_coord(P, lx + 1, ly + 1);
  axis_weights(a.x, g.mx0, g.W, g.Wp, f, wx);
  axis_weights(a.y, g.my0, g.H, g.Hp, f, wy);
  for (int i = 0; i < kSpan; ++i) {
    if (wx.src[i] < 0) {
      wx.src[i] = 0;
      wx.w[i] = acc_t(0);
    }
    if (wy.src[i] < 0) {
      wy.src[i] = 0;
      wy.w[i] = acc_t(0);
    }
  }
}

// A channel plane of an input: base pointer and row / column strides.
template <typename scalar_t>
struct PlaneIn {
  const scalar_t* ptr;
  int64_t sh, sw;
};

// ---- explicit-upsampling variant (float32 and half types) -------------------------------------
// For float accumulation the kernel materialises the 2x upsampled padded image U of the sample
// (all planes interleaved) with separable, contiguous passes and samples it bilinearly (4 taps
// per grid point instead of 49). Same operator, different association of the sums; float64
// keeps the 7x7 path, so the CPU tests also exercise the per-point math the CUDA kernel uses.


template <int NP, typename acc_t>
void upsample_padded(const Geometry& g, const acc_t* f, int np_runtime, const acc_t* packed,
                     std::vector<acc_t>& R, std::vector<acc_t>& U) {
  const int np = NP > 0 ? NP : np_runtime;
  const int Hp = g.Hp, Wp = g.Wp, UW = 2 * Wp, UH = 2 * Hp;
  R.assign(static_cast<size_t>(Hp) * UW * np, acc_t(0));
  for (int i = 0; i < Hp; ++i) {
    const int sy = source_index(i, g.my0, g.Hp, g.H);
    acc_t* r = R.data() + static_cast<size_t>(i) * UW * np;
    for (int j = 0; j < Wp; ++j) {
      const int sx = source_index(j, g.mx0, g.Wp, g.W);
      const acc_t* v = packed + (static_cast<size_t>(sy) * g.W + sx) * np;
      for (int t = 0; t < kTaps; ++t) {
        const int b = 2 * j + t - 5;
        if (b < 0 || b >= UW) continue;
        const acc_t w = acc_t(2) * f[t];
        acc_t* rb = r + static_cast<size_t>(b) * np;
        for (int p = 0; p < np; ++p) rb[p] += w * v[p];
      }
    }
  }
  U.assign(static_cast<size_t>(UH) * UW * np, acc_t(0));
  const size_t row = static_cast<size_t>(UW) * np;
  for (int i = 0; i < Hp; ++i)
    for (int t = 0; t < kTaps; ++t) {
      const int a = 2 * i + t - 5;
      if (a < 0 || a >= UH) continue;
      const acc_t w = acc_t(2) * f[t];
      acc_t* u = U.data() + static_cast<size_t>(a) * row;
      const acc_t* r = R.data() + static_cast<size_t>(i) * row;
      for (size_t q = 0; q < row; ++q) u[q] += w * r[q];
    }
}

// Transpose of upsample_padded: gU -> gradient of the packed sample (accumulated into gpacked).
template <int NP, typename acc_t>
void upsample_padded_adjoint(const Geometry& g, const acc_t* f, int np_runtime, const std::vector<acc_t>& gU,
                             std::vector<acc_t>& R, acc_t* gpacked) {
  const int np = NP > 0 ? NP : np_runtime;
  const int Hp = g.Hp, Wp = g.Wp, UW = 2 * Wp, UH = 2 * Hp;
  const size_t row = static_cast<size_t>(UW) * np;
  R.assign(static_cast<size_t>(Hp) * row, acc_t(0));
  for (int i = 0; i < Hp; ++i)
    for (int t = 0; t < kTaps; ++t) {
      const int a = 2 * i + t - 5;
      if (a < 0 || a >= UH) continue;
      const acc_t w = acc_t(2) * f[t];
      acc_t* r = R.data() + static_cast<size_t>(i) * row;
      const acc_t* u = gU.data() + static_cast<size_t>(a) * row;
      for (size_t q = 0; q < row; ++q) r[q] += w * u[q];
    }
  for (int i = 0; i < Hp; ++i) {
    const int sy = source_index(i, g.my0, g.Hp, g.H);
    const acc_t* r = R.data() + static_cast<size_t>(i) * row;
    for (int j = 0; j < Wp; ++j) {
      const int sx = source_index(j, g.mx0, g.Wp, g.W);
      acc_t* v = gpacked + (static_cast<size_t>(sy) * g.W + sx) * np;
      for (int t = 0; t < kTaps; ++t) {
        const int b = 2 * j + t - 5;
        if (b < 0 || b >= UW) continue;
        const acc_t w = acc_t(2) * f[t];
        const acc_t* rb = r + static_cast<size_t>(b) * np;
        for (int p = 0; p < np; ++p) v[p] += w * rb[p];
      }
    }
  }
}

// Bilinear taps of U for grid point (lx, ly): indices clamped into U, out-of-range taps weight 0
// (grid_sample's zero padding).
template <typename acc_t>
struct Bilinear {
  size_t i00, i01, i10, i11;  // element offsets of the 4 taps (times np)
  acc_t w00, w01, w10, w11;
};

template <typename acc_t>
inline void bilinear_at(const double* P, const Geometry& g, int lx, int ly, int np, Bilinear<acc_t>& b) {
  const int UW = 2 * g.Wp, UH = 2 * g.Hp;
  const Coord a = sample_coord(P, lx + 1, ly + 1);
  auto axis = [](double v, int size, int& i0, int& i1, acc_t& w0, acc_t& w1) {
    if (!(v > -4.0)) v = -4.0;
    if (v > size + 4.0) v = size + 4.0;
    const double fl = std::floor(v);
    const int k = static_cast<int>(fl);
    const acc_t fr = static_cast<acc_t>(v - fl);
    w0 = (k >= 0 && k < size) ? acc_t(1) - fr : acc_t(0);
    w1 = (k + 1 >= 0 && k + 1 < size) ? fr : acc_t(0);
    i0 = std::min(std::max(k, 0), size - 1);
    i1 = std::min(std::max(k + 1, 0), size - 1);
  };
  int x0, x1, y0, y1;
  acc_t wx0, wx1, wy0, wy1;
  axis(a.x, UW, x0, x1, wx0, wx1);
  axis(a.y, UH, y0, y1, wy0, wy1);
  b.i00 = (static_cast<size_t>(y0) * UW + x0) * np;
  b.i01 = (static_cast<size_t>(y0) * UW + x1) * np;
  b.i10 = (static_cast<size_t>(y1) * UW + x0) * np;
  b.i11 = (static_cast<size_t>(y1) * UW + x1) * np;
  b.w00 = wy0 * wx0;
  b.w01 = wy0 * wx1;
  b.w10 = wy1 * wx0;
  b.w11 = wy1 * wx1;
}

// Geometric transform of every plane of one sample. The planes (both tensors, all channels) are
// first interleaved pixel-major (packed[pixel][p]), so that each of the 49 taps of a grid point
// is one contiguous, vectorisable multiply-add over all planes; the weights of a grid point are
// computed once for all of them. S[point][p] is then downsampled separably (innermost loop over
// planes again) into out[p] (H x W, contiguous acc_t).
// NP > 0 fixes the number of planes at compile time (the common 4 and 8), so the plane loops
// become straight SIMD code; NP = 0 handles any count.
template <int NP, typename scalar_t, typename acc_t>
void geometry_sample(const double* P, const Geometry& g, const acc_t* f,
                     const std::vector<PlaneIn<scalar_t>>& planes, std::vector<acc_t>& packed,
                     std::vector<acc_t>& S, std::vector<acc_t>& tmp, std::vector<acc_t>& R,
                     std::vector<acc_t>& U, acc_t* out) {
  const int GH = grid_points(g.H), GW = grid_points(g.W), H = g.H, W = g.W;
  const int np = NP > 0 ? NP : static_cast<int>(planes.size());
  for (int p = 0; p < np; ++p) {
    const PlaneIn<scalar_t>& pl = planes[p];
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x)
        packed[(static_cast<size_t>(y) * W + x) * np + p] = static_cast<acc_t>(pl.ptr[y * pl.sh + x * pl.sw]);
  }
  if constexpr (sizeof(acc_t) == 4) {
    upsample_padded<NP>(g, f, np, packed.data(), R, U);
    Bilinear<acc_t> b;
    for (int ly = 0; ly < GH; ++ly)
      for (int lx = 0; lx < GW; ++lx) {
        bilinear_at(P, g, lx, ly, np, b);
        acc_t* s = S.data() + (static_cast<size_t>(ly) * GW + lx) * np;
        const acc_t *u00 = U.data() + b.i00, *u01 = U.data() + b.i01, *u10 = U.data() + b.i10,
                    *u11 = U.data() + b.i11;
        for (int p = 0; p < np; ++p) s[p] = b.w00 * u00[p] + b.w01 * u01[p] + b.w10 * u10[p] + b.w11 * u11[p];
      }
  } else {
  AxisWeights<acc_t> wx, wy;
  for (int ly = 0; ly < GH; ++ly)
    for (int lx = 0; lx < GW; ++lx) {
      point_weights(P, g, f, lx, ly, wx, wy);
      acc_t* s = S.data() + (static_cast<size_t>(ly) * GW + lx) * np;
      for (int p = 0; p < np; ++p) s[p] = 0;
      for (int r = 0; r < kSpan; ++r) {
        const acc_t* row = packed.data() + static_cast<size_t>(wy.src[r]) * W * np;
        for (int k = 0; k < kSpan; ++k) {
          const acc_t w = wy.w[r] * wx.w[k];
          const acc_t* v = row + static_cast<size_t>(wx.src[k]) * np;
          for (int p = 0; p < np; ++p) s[p] += w * v[p];
        }
      }
    }
  }
  // downsample along x: tmp[ly][qx][p] = sum_k f[k] S[ly][2 qx + k][p]
  for (int ly = 0; ly < GH; ++ly)
    for (int qx = 0; qx < W; ++qx) {
      acc_t* t = tmp.data() + (static_cast<size_t>(ly) * W + qx) * np;
      for (int p = 0; p < np; ++p) t[p] = 0;
      for (int k = 0; k < kTaps; ++k) {
        const acc_t* sr = S.data() + (static_cast<size_t>(ly) * GW + 2 * qx + k) * np;
        for (int p = 0; p < np; ++p) t[p] += f[k] * sr[p];
      }
    }
  // and along y, into planar out
  const size_t HW = static_cast<size_t>(H) * W;
  std::vector<acc_t> acc(np);
  for (int qy = 0; qy < H; ++qy)
    for (int qx = 0; qx < W; ++qx) {
      for (int p = 0; p < np; ++p) acc[p] = 0;
      for (int k = 0; k < kTaps; ++k) {
        const acc_t* t = tmp.data() + (static_cast<size_t>(2 * qy + k) * W + qx) * np;
        for (int p = 0; p < np; ++p) acc[p] += f[k] * t[p];
      }
      for (int p = 0; p < np; ++p) out[p * HW + static_cast<size_t>(qy) * W + qx] = acc[p];
    }
}

// Transposed geometric transform of every plane of one sample: gout[p] (H x W) -> gin[p]
// (H x W): transposed downsampling into grid-point gradients S[point][p], then one pass over
// the grid points scattering through their weights into packed[pixel][p] (all planes at once).
template <int NP, typename acc_t>
void geometry_adjoint(const double* P, const Geometry& g, const acc_t* f, int np_runtime,
                      const acc_t* gout, std::vector<acc_t>& packed, std::vector<acc_t>& S,
                      std::vector<acc_t>& tmp, std::vector<acc_t>& R, std::vector<acc_t>& U, acc_t* gin) {
  const int np = NP > 0 ? NP : np_runtime;
  const int GH = grid_points(g.H), GW = grid_points(g.W), H = g.H, W = g.W;
  const size_t G = static_cast<size_t>(GH) * GW, HW = static_cast<size_t>(H) * W;
  std::fill(S.begin(), S.begin() + G * np, acc_t(0));
  std::fill(tmp.begin(), tmp.end(), acc_t(0));
  std::fill(packed.begin(), packed.begin() + HW * np, acc_t(0));
  // transposed y downsampling: tmp[2 qy + k][qx][p] += f[k] gout[p][qy][qx]
  for (int qy = 0; qy < H; ++qy)
    for (int qx = 0; qx < W; ++qx)
      for (int k = 0; k < kTaps; ++k) {
        acc_t* t = tmp.data() + (static_cast<size_t>(2 * qy + k) * W + qx) * np;
        for (int p = 0; p < np; ++p) t[p] += f[k] * gout[p * HW + static_cast<size_t>(qy) * W + qx];
      }
  // transposed x downsampling: S[ly][2 qx + k][p] += f[k] tmp[ly][qx][p]
  for (int ly = 0; ly < GH; ++ly)
    for (int qx = 0; qx < W; ++qx) {
      const acc_t* t = tmp.data() + (static_cast<size_t>(ly) * W + qx) * np;
      for (int k = 0; k < kTaps; ++k) {
        acc_t* sr = S.data() + (static_cast<size_t>(ly) * GW + 2 * qx + k) * np;
        for (int p = 0; p < np; ++p) sr[p] += f[k] * t[p];
      }
    }
  if constexpr (sizeof(acc_t) == 4) {
    U.assign(static_cast<size_t>(4) * g.Hp * g.Wp * np, acc_t(0));
    Bilinear<acc_t> b;
    for (int ly = 0; ly < GH; ++ly)
      for (int lx = 0; lx < GW; ++lx) {
        const acc_t* s = S.data() + (static_cast<size_t>(ly) * GW + lx) * np;
        bilinear_at(P, g, lx, ly, np, b);
        acc_t *u00 = U.data() + b.i00, *u01 = U.data() + b.i01, *u10 = U.data() + b.i10,
              *u11 = U.data() + b.i11;
        for (int p = 0; p < np; ++p) {
          u00[p] += b.w00 * s[p];
          u01[p] += b.w01 * s[p];
          u10[p] += b.w10 * s[p];
          u11[p] += b.w11 * s[p];
        }
      }
    upsample_padded_adjoint<NP>(g, f, np, U, R, packed.data());
  } else {
  AxisWeights<acc_t> wx, wy;
  for (int ly = 0; ly < GH; ++ly)
    for (int lx = 0; lx < GW; ++lx) {
      const acc_t* s = S.data() + (static_cast<size_t>(ly) * GW + lx) * np;
      bool any = false;
      for (int p = 0; p < np; ++p) any |= s[p] != acc_t(0);
      if (!any) continue;
      point_weights(P, g, f, lx, ly, wx, wy);
      for (int r = 0; r < kSpan; ++r) {
        acc_t* row = packed.data() + static_cast<size_t>(wy.src[r]) * W * np;
        for (int k = 0; k < kSpan; ++k) {
          const acc_t w = wy.w[r] * wx.w[k];
          acc_t* v = row + static_cast<size_t>(wx.src[k]) * np;
          for (int p = 0; p < np; ++p) v[p] += w * s[p];
        }
      }
    }
  }
  for (int p = 0; p < np; ++p)
    for (size_t i = 0; i < HW; ++i) gin[p * HW + i] = packed[i * np + p];
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
         const double* params, const Geometry& batch, bool adjoint) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto fd = normalized_filter();
  acc_t f[kTaps];
  for (int i = 0; i < kTaps; ++i) f[i] = static_cast<acc_t>(fd[i]);
  const bool geom = batch.flags & kGeometry, colour = batch.flags & kColour, cutout = batch.flags & kCutout;
  const int H = batch.H, W = batch.W, C = batch.C, HW = H * W;

  const size_t T = ins.size(), HWs = static_cast<size_t>(HW);
  at::parallel_for(0, batch.N, 1, [&](int64_t begin, int64_t end) {
    // per task: buf = the (T, C, H, W) values being transformed, gbuf = geometric result
    std::vector<acc_t> S, tmp, packed, R, U, buf(T * C * HWs), gbuf, cmean(HW);
    std::vector<uint8_t> keep(HW, 1);
    std::vector<PlaneIn<scalar_t>> planes(T * C);
    if (geom) {
      S.resize(T * C * static_cast<size_t>(grid_points(H)) * grid_points(W));
      tmp.resize(T * C * static_cast<size_t>(grid_points(H)) * W);
      packed.resize(T * C * HWs);
      gbuf.resize(T * C * HWs);
    }
    for (int64_t n = begin; n < end; ++n) {
      const double* P = params + n * kParams;
      const Geometry g = sample_geometry(batch, P);
      if (cutout)
        for (int y = 0; y < H; ++y)
          for (int x = 0; x < W; ++x)
            keep[y * W + x] = cutout_keep(x, y, W, H, load_cutout<acc_t>(P));
      const acc_t b = (g.flags & kLinear) ? acc_t(0) : static_cast<acc_t>(P[6]);
      const acc_t c = static_cast<acc_t>(P[7]), s = static_cast<acc_t>(P[8]);
      if (!adjoint) {
        // buf = geometric output (or the input), all planes
        if (geom) {
          for (size_t t = 0; t < T; ++t)
            for (int ch = 0; ch < C; ++ch)
              planes[t * C + ch] = {ins[t].data_ptr<scalar_t>() + n * ins[t].stride(0) + ch * ins[t].stride(1),
                                    ins[t].stride(2), ins[t].stride(3)};
          if (planes.size() == 8) {
            geometry_sample<8>(P, g, f, planes, packed, S, tmp, R, U, buf.data());
          } else if (planes.size() == 4) {
            geometry_sample<4>(P, g, f, planes, packed, S, tmp, R, U, buf.data());
          } else {
            geometry_sample<0>(P, g, f, planes, packed, S, tmp, R, U, buf.data());
          }
        } else {
          for (size_t t = 0; t < T; ++t) {
            const at::Tensor& in = ins[t];
            const scalar_t* ip = in.data_ptr<scalar_t>() + n * in.stride(0);
            for (int ch = 0; ch < C; ++ch)
              for (int y = 0; y < H; ++y)
                for (int x = 0; x < W; ++x)
                  buf[(t * C + ch) * HWs + y * W + x] =
                      static_cast<acc_t>(ip[ch * in.stride(1) + y * in.stride(2) + x * in.stride(3)]);
          }
        }
        for (size_t t = 0; t < T; ++t) {
          const at::Tensor& out = outs[t];
          scalar_t* op = out.data_ptr<scalar_t>() + n * out.stride(0);
          const int64_t osc = out.stride(1), osh = out.stride(2), osw = out.stride(3);
          const acc_t* v0 = buf.data() + t * C * HWs;
          const acc_t m = colour ? means(v0, C, HW, cmean) : acc_t(0);
          for (int ch = 0; ch < C; ++ch)
            for (int y = 0; y < H; ++y)
              for (int x = 0; x < W; ++x) {
                const int p = y * W + x;
                acc_t v = v0[static_cast<size_t>(ch) * HW + p];
                if (colour) v = colour_apply(v, cmean[p], m, b, c, s);
                if (cutout && !keep[p]) v = acc_t(0);
                op[ch * osc + y * osh + x * osw] = static_cast<scalar_t>(v);
              }
        }
      } else {
        // buf = gradient of the geometric output: cutout, then colour transposed
        for (size_t t = 0; t < T; ++t) {
          const at::Tensor& in = ins[t];
          const scalar_t* ip = in.data_ptr<scalar_t>() + n * in.stride(0);
          const int64_t isc = in.stride(1), ish = in.stride(2), isw = in.stride(3);
          acc_t* v0 = buf.data() + t * C * HWs;
          for (int ch = 0; ch < C; ++ch)
            for (int y = 0; y < H; ++y)
              for (int x = 0; x < W; ++x) {
                const int p = y * W + x;
                acc_t v = static_cast<acc_t>(ip[ch * isc + y * ish + x * isw]);
                if (cutout && !keep[p]) v = acc_t(0);
                v0[static_cast<size_t>(ch) * HW + p] = v;
              }
          if (colour) {
            const acc_t m = means(v0, C, HW, cmean);
            for (int ch = 0; ch < C; ++ch)
              for (int p = 0; p < HW; ++p) {
                acc_t& v = v0[static_cast<size_t>(ch) * HW + p];
                v = colour_adjoint(v, cmean[p], m, c, s);
              }
          }
        }
        const acc_t* src = buf.data();
        if (geom) {
          const int np = static_cast<int>(T * C);
          if (np == 8) {
            geometry_adjoint<8>(P, g, f, np, buf.data(), packed, S, tmp, R, U, gbuf.data());
          } else if (np == 4) {
            geometry_adjoint<4>(P, g, f, np, buf.data(), packed, S, tmp, R, U, gbuf.data());
          } else {
            geometry_adjoint<0>(P, g, f, np, buf.data(), packed, S, tmp, R, U, gbuf.data());
          }
          src = gbuf.data();
        }
        for (size_t t = 0; t < T; ++t) {
          const at::Tensor& out = outs[t];
          scalar_t* op = out.data_ptr<scalar_t>() + n * out.stride(0);
          const int64_t osc = out.stride(1), osh = out.stride(2), osw = out.stride(3);
          const acc_t* v0 = src + t * C * HWs;
          for (int ch = 0; ch < C; ++ch)
            for (int y = 0; y < H; ++y)
              for (int x = 0; x < W; ++x)
                op[ch * osc + y * osh + x * osw] =
                    static_cast<scalar_t>(v0[static_cast<size_t>(ch) * HW + y * W + x]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> apply_cpu(const char* op, const char* nx, const char* ny,
                                             const at::Tensor& x, const std::optional<at::Tensor>& y,
                                             const at::Tensor& params, int64_t flags, bool adjoint) {
  check_args(op, nx, x, ny, y, params, flags);
  std::vector<at::Tensor> ins{x}, outs{alloc_like(x)};
  if (y.has_value()) {
    ins.push_back(*y);
    outs.push_back(alloc_like(*y));
  }
  const Geometry g = geometry_of(x, flags);
  const at::Tensor p = params.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "paired_augment_cpu", [&] {
    run<scalar_t>(ins, outs, p.data_ptr<double>(), g, adjoint);
  });
  return {outs[0], y.has_value() ? outs[1] : empty_output(x)};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& y,
                                               const at::Tensor& params, int64_t flags) {
  return apply_cpu("d2g_fast::paired_augment", "x", "y", x, y, params, flags, false);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& gx, const std::optional<at::Tensor>& gy,
                                                const at::Tensor& params, int64_t flags) {
  return apply_cpu("d2g_fast::paired_augment_backward", "grad_x", "grad_y", gx, gy, params, flags,
                   true);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CPU, m) {
  m.impl("paired_augment", &forward_cpu);
  m.impl("paired_augment_backward", &backward_cpu);
}

}  // namespace augment
}  // namespace d2g
