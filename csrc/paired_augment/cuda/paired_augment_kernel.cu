// CUDA kernels of the paired latent augmentation.
//
// Forward (launches: 1 without colour, 2 with colour; the 2x upsampled image is never stored):
//   geometry_forward: a block owns a 16x16 output tile of one sample of one tensor (x or y:
//     blockIdx.z). For a chunk of channels it evaluates the 42x42 grid points the tile's 2x
//     downsampling reads (each a separable 7x7 weighted sum of input pixels: reflect padding,
//     2x upsampling and bilinear sampling folded into the weights) into shared memory, then
//     downsamples separably in shared memory and writes the tile. With colour it also writes
//     a per-tile partial sum (for the per-sample mean; deterministic, no atomics).
//   colour_cutout: one thread per pixel and sample: channel mean, sample mean from the partial
//     sums, colour and cutout, in place.
//   (colour without geometry: partial_sums + colour_cutout; cutout only: colour_cutout.)
// Backward = transposed operator (launches: zero-fill + [partial_sums with colour] +
//   geometry_adjoint; + 1 cast for float16/bfloat16): a block owns the grid points of its tile,
//   forms their gradient from the output gradient (cutout and colour transposed, then the
//   transposed 2x downsampling in shared memory) and scatters it through the 7x7 weights into a
//   shared-memory window of the padded input that covers the tile's footprint, then adds each
//   window pixel to the input gradient with ONE global atomicAdd (float32/float64 accumulation).
//   Global atomics on the same addresses serialise in L2; the window cuts them from 49 per grid
//   point and channel to about one per footprint pixel (~50x fewer). Points whose weights fall
//   outside the window (a footprint larger than kWindow, i.e. strong zoom-out) fall back to
//   direct global atomics, so the result never depends on the window bound.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <type_traits>

#include "common/checks.h"
#include "paired_augment/paired_augment.h"
#include "paired_augment/paired_augment_math.h"

namespace d2g {
namespace augment {
namespace {

constexpr int kTile = 16;                      // outputs per tile side
constexpr int kThreads = kTile * kTile;        // one thread per output of the tile
constexpr int kRegion = 2 * kTile + kTaps - 2;  // grid points read by a tile's downsampling (42)
constexpr int kHalo = kTaps / 2 - 1;           // outputs before the tile that reach its points (5)
constexpr int kGradRegion = kTile + 2 * kHalo;  // output-gradient rows a tile's points read (26)
// Backward window of padded-input pixels per channel (shares its memory with the halo gradient):
// 44 x 44, a 16-pixel tile's footprint up to about 2.3x zoom-out; 47.3 KB of static shared
// memory with the transposed-downsampling buffer, for float (CB = 4) and double (CB = 2) alike.
constexpr int kWindow = 44 * 44;
static_assert(kWindow >= kGradRegion * kGradRegion, "the window buffer also holds the halo gradient");

template <typename T>
struct Ref4 {
  T* ptr;
  int64_t sn, sc, sh, sw;
};

template <typename T>
Ref4<T> ref_of(const at::Tensor& t) {
  // data_ptr is instantiated for the non-const element types only
  return {t.data_ptr<std::remove_const_t<T>>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename acc_t>
struct Taps {
  acc_t f[kTaps];
};

struct Shape {
  int N, C, H, W;
  int mx0, my0, Wp, Hp;
  int tiles_x, tiles_y;
  int flags;
};

// The shape with sample n's margins: columns 13..16 of its packed row (written on the device by
// the sampler, so they are read here rather than checked on the host). Clamped to [0, size - 1]
// so that a malformed row cannot index out of bounds.
__device__ __forceinline__ Shape sample_shape(Shape s, const double* __restrict__ params, int n) {
  const double* P = params + static_cast<int64_t>(n) * kParams + kMarginCol;
  int m[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const double limit = (i % 2 == 0 ? s.W : s.H) - 1;
    m[i] = static_cast<int>(fmin(fmax(P[i], 0.0), limit));  // also maps NaN to 0
  }
  s.mx0 = m[0];
  s.my0 = m[1];
  s.Wp = s.W + m[0] + m[2];
  s.Hp = s.H + m[1] + m[3];
  return s;
}

// Forward geometry of one output tile; CB channels per shared-memory chunk.
template <typename scalar_t, typename acc_t, int CB>
__global__ void __launch_bounds__(kThreads)
    geometry_forward(Ref4<const scalar_t> in0, Ref4<const scalar_t> in1, Ref4<scalar_t> out0,
                     Ref4<scalar_t> out1, const double* __restrict__ params, Taps<acc_t> taps,
                     Shape batch_shape, acc_t* __restrict__ partials) {
  const Shape s = sample_shape(batch_shape, params, blockIdx.y);
  __shared__ acc_t S[CB][kRegion][kRegion];
  __shared__ acc_t T[CB][kRegion][kTile];
  __shared__ acc_t red[kThreads / 32];
  const int tile = blockIdx.x, n = blockIdx.y, which = blockIdx.z;
  const int qx0 = (tile % s.tiles_x) * kTile, qy0 = (tile / s.tiles_x) * kTile;
  const Ref4<const scalar_t> in = which == 0 ? in0 : in1;
  const Ref4<scalar_t> out = which == 0 ? out0 : out1;
  const double* P = params + static_cast<int64_t>(n) * kParams;
  double affine[6];
#pragma unroll
  for (int i = 0; i < 6; ++i) affine[i] = P[i];
  const bool colour = s.flags & kColour, cutout = s.flags & kCutout;
  const Cutout<acc_t> rect = load_cutout<acc_t>(P);
  const int tid = threadIdx.x, tx = tid % kTile, ty = tid / kTile;
  const int qx = qx0 + tx, qy = qy0 + ty;
  const bool inside = qx < s.W && qy < s.H;
  const bool keep = !cutout || cutout_keep(qx, qy, s.W, s.H, rect);
  acc_t local_sum = 0;
  const scalar_t* base = in.ptr + static_cast<int64_t>(n) * in.sn;

  for (int c0 = 0; c0 < s.C; c0 += CB) {
    // 1. grid points of the tile -> S
    for (int i = tid; i < kRegion * kRegion; i += kThreads) {
      const int ly = i / kRegion, lx = i % kRegion;
      const Coord a = sample_coord(affine, 2 * qx0 + lx + 1, 2 * qy0 + ly + 1);
      AxisWeights<acc_t> wx, wy;
      axis_weights(a.x, s.mx0, s.W, s.Wp, taps.f, wx);
      axis_weights(a.y, s.my0, s.H, s.Hp, taps.f, wy);
      acc_t sum[CB];
#pragma unroll
      for (int cb = 0; cb < CB; ++cb) sum[cb] = 0;
#pragma unroll
      for (int r = 0; r < kSpan; ++r) {
        if (wy.src[r] < 0 || wy.w[r] == acc_t(0)) continue;
        const scalar_t* row = base + wy.src[r] * in.sh;
#pragma unroll
        for (int k = 0; k < kSpan; ++k) {
          if (wx.src[k] < 0) continue;
          const acc_t w = wy.w[r] * wx.w[k];
          const scalar_t* p = row + wx.src[k] * in.sw;
#pragma unroll
          for (int cb = 0; cb < CB; ++cb)
            if (c0 + cb < s.C) sum[cb] += w * static_cast<acc_t>(p[(c0 + cb) * in.sc]);
        }
      }
#pragma unroll
      for (int cb = 0; cb < CB; ++cb) S[cb][ly][lx] = sum[cb];
    }
    __syncthreads();
    // 2. downsample along x
    for (int i = tid; i < CB * kRegion * kTile; i += kThreads) {
      const int cb = i / (kRegion * kTile), rem = i % (kRegion * kTile);
      const int ly = rem / kTile, ox = rem % kTile;
      acc_t sum = 0;
#pragma unroll
      for (int k = 0; k < kTaps; ++k) sum += taps.f[k] * S[cb][ly][2 * ox + k];
      T[cb][ly][ox] = sum;
    }
    __syncthreads();
    // 3. downsample along y, write
    if (inside) {
      scalar_t* o = out.ptr + static_cast<int64_t>(n) * out.sn + qy * out.sh + qx * out.sw;
#pragma unroll
      for (int cb = 0; cb < CB; ++cb) {
        if (c0 + cb >= s.C) break;
        acc_t g = 0;
#pragma unroll
        for (int k = 0; k < kTaps; ++k) g += taps.f[k] * T[cb][2 * ty + k][tx];
        if (colour) {
          local_sum += g;  // colour_cutout finishes the pixel
        } else if (!keep) {
          g = 0;
        }
        o[(c0 + cb) * out.sc] = static_cast<scalar_t>(g);
      }
    }
    __syncthreads();
  }
  if (colour) {  // per-tile partial sum for the per-sample mean
    for (int off = 16; off > 0; off /= 2) local_sum += __shfl_down_sync(0xffffffffu, local_sum, off);
    if (tid % 32 == 0) red[tid / 32] = local_sum;
    __syncthreads();
    if (tid == 0) {
      acc_t total = 0;
      for (int i = 0; i < kThreads / 32; ++i) total += red[i];
      partials[(static_cast<int64_t>(which) * s.N + n) * (s.tiles_x * s.tiles_y) + tile] = total;
    }
  }
}

// Per-tile sums (over channels and the tile's pixels) of the input, with the cutout mask
// applied when `masked` (for the backward's mean of the masked output gradient).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    partial_sums(Ref4<const scalar_t> in0, Ref4<const scalar_t> in1, const double* __restrict__ params,
                 Shape s, bool masked, acc_t* __restrict__ partials) {
  __shared__ acc_t red[kThreads / 32];
  const int tile = blockIdx.x, n = blockIdx.y, which = blockIdx.z;
  const Ref4<const scalar_t> in = which == 0 ? in0 : in1;
  const int tid = threadIdx.x;
  const int qx = (tile % s.tiles_x) * kTile + tid % kTile, qy = (tile / s.tiles_x) * kTile + tid / kTile;
  const double* P = params + static_cast<int64_t>(n) * kParams;
  acc_t sum = 0;
  if (qx < s.W && qy < s.H &&
      (!masked || cutout_keep(qx, qy, s.W, s.H, load_cutout<acc_t>(P)))) {
    const scalar_t* p = in.ptr + static_cast<int64_t>(n) * in.sn + qy * in.sh + qx * in.sw;
    for (int c = 0; c < s.C; ++c) sum += static_cast<acc_t>(p[c * in.sc]);
  }
  for (int off = 16; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffffu, sum, off);
  if (tid % 32 == 0) red[tid / 32] = sum;
  __syncthreads();
  if (tid == 0) {
    acc_t total = 0;
    for (int i = 0; i < kThreads / 32; ++i) total += red[i];
    partials[(static_cast<int64_t>(which) * s.N + n) * (s.tiles_x * s.tiles_y) + tile] = total;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t sample_mean(const acc_t* partials, int which, int n, const Shape& s) {
  const int tiles = s.tiles_x * s.tiles_y;
  const acc_t* p = partials + (static_cast<int64_t>(which) * s.N + n) * tiles;
  acc_t total = 0;
  for (int i = 0; i < tiles; ++i) total += p[i];
  return total / (static_cast<acc_t>(s.C) * s.H * s.W);
}

// Forward colour + cutout (in place when in == out), or with `adjoint` the transposed colour of
// the masked gradient (elementwise path of the backward without geometry). One thread per pixel.
template <typename scalar_t, typename out_t, typename acc_t>
__global__ void colour_cutout(Ref4<const scalar_t> in0, Ref4<const scalar_t> in1, Ref4<out_t> out0,
                              Ref4<out_t> out1, const double* __restrict__ params, Shape s,
                              const acc_t* __restrict__ partials, bool adjoint) {
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int n = blockIdx.y, which = blockIdx.z;
  if (pix >= static_cast<int64_t>(s.H) * s.W) return;
  const int qx = static_cast<int>(pix % s.W), qy = static_cast<int>(pix / s.W);
  const Ref4<const scalar_t> in = which == 0 ? in0 : in1;
  const Ref4<out_t> out = which == 0 ? out0 : out1;
  const double* P = params + static_cast<int64_t>(n) * kParams;
  const bool colour = s.flags & kColour, cutout = s.flags & kCutout;
  const bool keep = !cutout || cutout_keep(qx, qy, s.W, s.H, load_cutout<acc_t>(P));
  const scalar_t* ip = in.ptr + static_cast<int64_t>(n) * in.sn + qy * in.sh + qx * in.sw;
  out_t* op = out.ptr + static_cast<int64_t>(n) * out.sn + qy * out.sh + qx * out.sw;
  acc_t mean = 0, cmean = 0;
  const acc_t b = (s.flags & kLinear) ? acc_t(0) : static_cast<acc_t>(P[6]);
  const acc_t c = static_cast<acc_t>(P[7]), sat = static_cast<acc_t>(P[8]);
  if (colour) {
    mean = sample_mean(partials, which, n, s);
    for (int ch = 0; ch < s.C; ++ch) cmean += static_cast<acc_t>(ip[ch * in.sc]);
    cmean /= s.C;
    if (adjoint && !keep) cmean = 0;  // the adjoint's means are over the masked gradient
  }
  for (int ch = 0; ch < s.C; ++ch) {
    acc_t v = static_cast<acc_t>(ip[ch * in.sc]);
    if (adjoint) {
      if (!keep) v = 0;
      if (colour) v = colour_adjoint(v, cmean, mean, c, sat);
    } else {
      if (colour) v = colour_apply(v, cmean, mean, b, c, sat);
      if (!keep) v = 0;
    }
    op[ch * out.sc] = static_cast<out_t>(v);
  }
}

// Transposed geometry: scatter the gradient of the tile's own grid points into grad (acc_t,
// zero-initialised) through the 7x7 weights.
template <typename scalar_t, typename acc_t, int CB>
__global__ void __launch_bounds__(kThreads)
    geometry_adjoint(Ref4<const scalar_t> gin0, Ref4<const scalar_t> gin1, Ref4<acc_t> gout0,
                     Ref4<acc_t> gout1, const double* __restrict__ params, Taps<acc_t> taps,
                     Shape batch_shape, const acc_t* __restrict__ partials) {
  const Shape s = sample_shape(batch_shape, params, blockIdx.y);
  // scratch holds first G, the gradient of the geometric output over the halo
  // (kGradRegion x kGradRegion per channel), then, once G is consumed, the window of padded
  // input pixels the tile's points write (kWindow per channel).
  __shared__ acc_t scratch[CB][kWindow];
  __shared__ acc_t T[CB][kRegion][kGradRegion];      // after the transposed y downsampling
  const int tile = blockIdx.x, n = blockIdx.y, which = blockIdx.z;
  const int qx0 = (tile % s.tiles_x) * kTile, qy0 = (tile / s.tiles_x) * kTile;
  const Ref4<const scalar_t> gin = which == 0 ? gin0 : gin1;
  const Ref4<acc_t> gout = which == 0 ? gout0 : gout1;
  const double* P = params + static_cast<int64_t>(n) * kParams;
  double affine[6];
#pragma unroll
  for (int i = 0; i < 6; ++i) affine[i] = P[i];
  const bool colour = s.flags & kColour, cutout = s.flags & kCutout;
  const Cutout<acc_t> rect = load_cutout<acc_t>(P);
  const acc_t c = static_cast<acc_t>(P[7]), sat = static_cast<acc_t>(P[8]);
  const acc_t mean = colour ? sample_mean(partials, which, n, s) : acc_t(0);
  const int tid = threadIdx.x;
  // grid points owned by this tile (the last tile also owns the 10 extra points at the end)
  const int GLx = grid_points(s.W), GLy = grid_points(s.H);
  const int own_x = (qx0 + kTile >= s.W) ? GLx - 2 * qx0 : 2 * kTile;
  const int own_y = (qy0 + kTile >= s.H) ? GLy - 2 * qy0 : 2 * kTile;
  const scalar_t* gbase = gin.ptr + static_cast<int64_t>(n) * gin.sn;
  acc_t* obase = gout.ptr + static_cast<int64_t>(n) * gout.sn;

  for (int c0 = 0; c0 < s.C; c0 += CB) {
    // 1. gradient of the geometric output over the halo: cutout, then colour transposed
    for (int i = tid; i < kGradRegion * kGradRegion; i += kThreads) {
      const int hy = i / kGradRegion, hx = i % kGradRegion;
      const int qy = qy0 - kHalo + hy, qx = qx0 - kHalo + hx;
      // A cut-out pixel's masked gradient is zero, but with colour it still receives the
      // sample-mean term (1 - c) * mean: the colour output of EVERY pixel depends on the mean.
      const bool inside = qx >= 0 && qy >= 0 && qx < s.W && qy < s.H;
      const bool keep = inside && (!cutout || cutout_keep(qx, qy, s.W, s.H, rect));
      const scalar_t* p = gbase + (keep ? qy * gin.sh + qx * gin.sw : 0);
      acc_t cmean = 0;
      if (keep && colour) {
        for (int ch = 0; ch < s.C; ++ch) cmean += static_cast<acc_t>(p[ch * gin.sc]);
        cmean /= s.C;
      }
#pragma unroll
      for (int cb = 0; cb < CB; ++cb) {
        acc_t v = 0;
        if (inside && c0 + cb < s.C) {
          if (keep) v = static_cast<acc_t>(p[(c0 + cb) * gin.sc]);
          if (colour) v = colour_adjoint(v, cmean, mean, c, sat);
        }
        scratch[cb][hy * kGradRegion + hx] = v;
      }
    }
    __syncthreads();
    // 2. transposed downsampling along y: T[ly][hx] = sum_k f[k] G[(ly - k)/2 + halo][hx]
    for (int i = tid; i < CB * kRegion * kGradRegion; i += kThreads) {
      const int cb = i / (kRegion * kGradRegion), rem = i % (kRegion * kGradRegion);
      const int ly = rem / kGradRegion, hx = rem % kGradRegion;
      acc_t sum = 0;
#pragma unroll
      for (int k = (ly & 1); k < kTaps; k += 2)
        sum += taps.f[k] * scratch[cb][((ly - k) / 2 + kHalo) * kGradRegion + hx];
      T[cb][ly][hx] = sum;
    }
    __syncthreads();
    // The window: padded-input pixels read by the owned points, from the region's corners (the
    // span base is monotone in the affine coordinate). The same in every thread.
    int win_x0 = INT_MAX, win_y0 = INT_MAX, win_x1 = INT_MIN, win_y1 = INT_MIN;
#pragma unroll
    for (int corner = 0; corner < 4; ++corner) {
      const Coord a = sample_coord(affine, 2 * qx0 + 1 + (corner & 1 ? own_x - 1 : 0),
                                   2 * qy0 + 1 + (corner & 2 ? own_y - 1 : 0));
      const int bx = span_base_at(a.x, s.Wp), by = span_base_at(a.y, s.Hp);
      win_x0 = min(win_x0, bx);
      win_y0 = min(win_y0, by);
      win_x1 = max(win_x1, bx + kSpan - 1);
      win_y1 = max(win_y1, by + kSpan - 1);
    }
    const int win_w = win_x1 - win_x0 + 1, win_h = win_y1 - win_y0 + 1;
    const bool use_window = win_w * win_h <= kWindow;
    if (use_window) {
      for (int i = tid; i < CB * win_w * win_h; i += kThreads)
        scratch[i / (win_w * win_h)][i % (win_w * win_h)] = acc_t(0);
    }
    __syncthreads();
    // 3. each owned point: its gradient (transposed downsampling along x), scattered
    for (int i = tid; i < own_x * own_y; i += kThreads) {
      const int ly = i / own_x, lx = i % own_x;
      acc_t gs[CB];
      bool any = false;
#pragma unroll
      for (int cb = 0; cb < CB; ++cb) {
        acc_t sum = 0;
#pragma unroll
        for (int k = (lx & 1); k < kTaps; k += 2) sum += taps.f[k] * T[cb][ly][(lx - k) / 2 + kHalo];
        gs[cb] = sum;
        any |= sum != acc_t(0);
      }
      if (!any) continue;
      const Coord a = sample_coord(affine, 2 * qx0 + lx + 1, 2 * qy0 + ly + 1);
      AxisWeights<acc_t> wx, wy;
      axis_weights(a.x, s.mx0, s.W, s.Wp, taps.f, wx);
      axis_weights(a.y, s.my0, s.H, s.Hp, taps.f, wy);
#pragma unroll
      for (int r = 0; r < kSpan; ++r) {
        if (wy.src[r] < 0 || wy.w[r] == acc_t(0)) continue;
        acc_t* row = obase + wy.src[r] * gout.sh;
        const int iy = wy.base + r - win_y0;
#pragma unroll
        for (int k = 0; k < kSpan; ++k) {
          if (wx.src[k] < 0 || wx.w[k] == acc_t(0)) continue;
          const acc_t w = wy.w[r] * wx.w[k];
          const int ix = wx.base + k - win_x0;
          if (use_window && ix >= 0 && ix < win_w && iy >= 0 && iy < win_h) {
#pragma unroll
            for (int cb = 0; cb < CB; ++cb) atomicAdd(&scratch[cb][iy * win_w + ix], w * gs[cb]);
          } else {
            acc_t* p = row + wx.src[k] * gout.sw;
#pragma unroll
            for (int cb = 0; cb < CB; ++cb)
              if (c0 + cb < s.C) atomicAdd(p + (c0 + cb) * gout.sc, w * gs[cb]);
          }
        }
      }
    }
    __syncthreads();
    // 4. the window into the input gradient: one atomic per pixel and channel (reflections of
    // the padding fold several window pixels onto one source pixel; zero regions are dropped)
    if (use_window) {
      for (int i = tid; i < win_w * win_h; i += kThreads) {
        const int sx = source_index(win_x0 + i % win_w, s.mx0, s.Wp, s.W);
        const int sy = source_index(win_y0 + i / win_w, s.my0, s.Hp, s.H);
        if (sx < 0 || sy < 0) continue;
        acc_t* p = obase + sy * gout.sh + sx * gout.sw;
#pragma unroll
        for (int cb = 0; cb < CB; ++cb) {
          const acc_t v = scratch[cb][i];
          if (c0 + cb < s.C && v != acc_t(0)) atomicAdd(p + (c0 + cb) * gout.sc, v);
        }
      }
      __syncthreads();
    }
  }
}

Shape shape_of(const at::Tensor& x, int64_t flags) {
  Shape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.mx0 = s.my0 = 0;  // per sample: sample_shape
  s.Wp = s.W;
  s.Hp = s.H;
  s.tiles_x = (s.W + kTile - 1) / kTile;
  s.tiles_y = (s.H + kTile - 1) / kTile;
  s.flags = static_cast<int>(flags);
  return s;
}

template <typename acc_t>
Taps<acc_t> taps_of() {
  const auto f = normalized_filter();
  Taps<acc_t> t;
  for (int i = 0; i < kTaps; ++i) t.f[i] = static_cast<acc_t>(f[i]);
  return t;
}

template <typename scalar_t>
void forward_launch(const at::Tensor& x, const at::Tensor& y, const at::Tensor& ox, const at::Tensor& oy,
                    int T, const at::Tensor& params, const Shape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CB = sizeof(acc_t) == 8 ? 2 : 4;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool geom = s.flags & kGeometry, colour = s.flags & kColour;
  const dim3 tiles(s.tiles_x * s.tiles_y, s.N, T);
  at::Tensor partials;
  if (colour) partials = at::empty({T, s.N, s.tiles_x * s.tiles_y}, params.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* pp = colour ? partials.data_ptr<acc_t>() : nullptr;
  const double* P = params.data_ptr<double>();
  auto ix = ref_of<const scalar_t>(x), iy = ref_of<const scalar_t>(y);
  auto rx = ref_of<scalar_t>(ox), ry = ref_of<scalar_t>(oy);
  if (geom) {
    geometry_forward<scalar_t, acc_t, CB><<<tiles, kThreads, 0, stream>>>(ix, iy, rx, ry, P, taps_of<acc_t>(), s, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (colour) {
    partial_sums<scalar_t, acc_t><<<tiles, kThreads, 0, stream>>>(ix, iy, P, s, false, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (colour || !geom) {
    const int64_t pixels = static_cast<int64_t>(s.H) * s.W;
    const dim3 grid(static_cast<unsigned>((pixels + 255) / 256), s.N, T);
    // after the geometry pass, colour works in place on the output
    auto src_x = geom ? Ref4<const scalar_t>{rx.ptr, rx.sn, rx.sc, rx.sh, rx.sw} : ix;
    auto src_y = geom ? Ref4<const scalar_t>{ry.ptr, ry.sn, ry.sc, ry.sh, ry.sw} : iy;
    colour_cutout<scalar_t, scalar_t, acc_t><<<grid, 256, 0, stream>>>(src_x, src_y, rx, ry, P, s, pp, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void backward_launch(const at::Tensor& gx, const at::Tensor& gy, const at::Tensor& ox, const at::Tensor& oy,
                     int T, const at::Tensor& params, const Shape& s) {
  // ox/oy: zero-filled acc_t tensors with geometry, else scalar_t tensors
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CB = sizeof(acc_t) == 8 ? 2 : 4;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool geom = s.flags & kGeometry, colour = s.flags & kColour;
  const dim3 tiles(s.tiles_x * s.tiles_y, s.N, T);
  at::Tensor partials;
  if (colour) partials = at::empty({T, s.N, s.tiles_x * s.tiles_y}, params.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* pp = colour ? partials.data_ptr<acc_t>() : nullptr;
  const double* P = params.data_ptr<double>();
  auto ix = ref_of<const scalar_t>(gx), iy = ref_of<const scalar_t>(gy);
  if (colour) {
    partial_sums<scalar_t, acc_t><<<tiles, kThreads, 0, stream>>>(ix, iy, P, s, true, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (geom) {
    auto rx = ref_of<acc_t>(ox), ry = ref_of<acc_t>(oy);
    geometry_adjoint<scalar_t, acc_t, CB><<<tiles, kThreads, 0, stream>>>(ix, iy, rx, ry, P, taps_of<acc_t>(), s, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t pixels = static_cast<int64_t>(s.H) * s.W;
    const dim3 grid(static_cast<unsigned>((pixels + 255) / 256), s.N, T);
    auto rx = ref_of<scalar_t>(ox), ry = ref_of<scalar_t>(oy);
    colour_cutout<scalar_t, scalar_t, acc_t><<<grid, 256, 0, stream>>>(ix, iy, rx, ry, P, s, pp, true);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& y,
                                                const at::Tensor& params, int64_t flags) {
  check_args("d2g_fast::paired_augment", "x", x, "y", y, params, flags);
  c10::cuda::CUDAGuard guard(x.device());
  const Shape s = shape_of(x, flags);
  const int T = y.has_value() ? 2 : 1;
  at::Tensor ox = alloc_like(x);
  at::Tensor oy = y.has_value() ? alloc_like(*y) : ox;
  const at::Tensor& iy = y.has_value() ? *y : x;
  const at::Tensor p = params.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "paired_augment_cuda", [&] {
    forward_launch<scalar_t>(x, iy, ox, oy, T, p, s);
  });
  return {ox, y.has_value() ? oy : empty_output(x)};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& gx, const std::optional<at::Tensor>& gy,
                                                 const at::Tensor& params, int64_t flags) {
  check_args("d2g_fast::paired_augment_backward", "grad_x", gx, "grad_y", gy, params, flags);
  c10::cuda::CUDAGuard guard(gx.device());
  const Shape s = shape_of(gx, flags);
  const int T = gy.has_value() ? 2 : 1;
  const bool geom = s.flags & kGeometry;
  const at::ScalarType acc = !geom ? gx.scalar_type() : gx.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto make = [&](const at::Tensor& like) {
    auto opts = like.options().dtype(acc).memory_format(like.suggest_memory_format());
    // the geometric scatter accumulates, the elementwise path overwrites every element
    return geom ? at::zeros(like.sizes(), opts) : poisoned(at::empty(like.sizes(), opts));
  };
  at::Tensor ox = make(gx);
  at::Tensor oy = gy.has_value() ? make(*gy) : ox;
  const at::Tensor& iy = gy.has_value() ? *gy : gx;
  const at::Tensor p = params.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "paired_augment_backward_cuda", [&] {
    backward_launch<scalar_t>(gx, iy, ox, oy, T, p, s);
  });
  if (ox.scalar_type() != gx.scalar_type()) {
    ox = ox.to(gx.scalar_type());
    if (gy.has_value()) oy = oy.to(gx.scalar_type());
  }
  return {ox, gy.has_value() ? oy : empty_output(gx)};
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CUDA, m) {
  m.impl("paired_augment", &forward_cuda);
  m.impl("paired_augment_backward", &backward_cuda);
}

}  // namespace augment
}  // namespace d2g
