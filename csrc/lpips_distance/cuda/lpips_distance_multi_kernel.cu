// CUDA kernels of lpips_distance_multi: ONE launch for the forward of every layer and ONE for
// the backward (up to kMaxLayers layers per launch; more layers take more launches). A table of
// layer descriptors goes in the kernel arguments and each block finds its layer from its index
// (as in csrc/multiscale_heads). A block never straddles two layers or two samples, so every
// branch on the layer's layout is uniform across the block.
//
// Forward, per layer one of two block shapes:
//  - planar (channel planes, or mixed layouts): kThreads / G pixels x G channel groups; threads
//    along the pixels read neighbouring addresses (coalesced), the groups split the channel loop
//    (more loads in flight for deep layers) and merge through shared memory in a fixed order;
//  - channels innermost in both inputs (channels_last): a warp per pixel, lanes along the
//    channels, warp shuffles.
// Both make two passes over a pixel's channels (norms, then the distance sums: the second pass
// reads from cache) with the cancellation-free math of lpips_distance_math.h. Each block sums
// its pixels' distances (times 1 / (H W)) into one slot of a zeroed (L, N, max_tiles) buffer;
// a sum over the tiles gives the (L, N) result. No atomics: deterministic.
// Backward: one elementwise pass that reads f0 and f1 once and writes both gradients, in the
// gradients' memory order (a thread per element of a channel plane, or a warp per pixel).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/cuda_reduce.cuh"
#include "lpips_distance/lpips_distance_math.h"
#include "lpips_distance/lpips_distance_multi.h"

namespace d2g {
namespace lpips {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxLayers = 8;

enum Mode : int { kPlanar = 0, kWarpPerPixel = 1 };

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) {
  if (t.dim() != 4) return {0, 0, 0, 0};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t, typename acc_t>
struct LayerTable {
  int L;  // layers in this launch
  int N;
  const scalar_t* a[kMaxLayers];
  const scalar_t* b[kMaxLayers];
  scalar_t* ga[kMaxLayers];  // backward outputs (null when not needed)
  scalar_t* gb[kMaxLayers];
  const acc_t* w[kMaxLayers];
  Strides4 sa[kMaxLayers], sb[kMaxLayers], sga[kMaxLayers], sgb[kMaxLayers];
  int64_t C[kMaxLayers];
  int H[kMaxLayers], W[kMaxLayers];
  int64_t pix0[kMaxLayers];  // the layer's first pixel in the stats rows
  int mode[kMaxLayers];
  int groups[kMaxLayers];    // forward, planar: channel groups per pixel
  int tiles[kMaxLayers];     // forward: blocks per sample; backward: blocks per (sample, channel) or sample
  int block_begin[kMaxLayers + 1];
  acc_t inv_hw[kMaxLayers];  // 1 / (H W): the derivative of the spatial mean
};

template <typename Table>
__device__ __forceinline__ int find_layer(const Table& t, int block) {
  int k = 0;
  while (k + 1 < t.L && block >= t.block_begin[k + 1]) ++k;
  return k;
}

template <typename acc_t>
__device__ __forceinline__ void store_stats(acc_t* st, int64_t P, int64_t pix, const Norms<acc_t>& nm,
                                            const DistSums<acc_t>& ds) {
  st[pix] = nm.i0;
  st[P + pix] = nm.i1;
  st[2 * P + pix] = nm.di;
  st[3 * P + pix] = ds.s0;
  st[4 * P + pix] = ds.s1;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
multi_forward_kernel(const LayerTable<scalar_t, acc_t> t, acc_t* __restrict__ stats, int64_t P, int max_tiles,
                     acc_t* __restrict__ part, int layer_offset) {
  __shared__ NormSums<acc_t> norm_smem[kThreads];
  __shared__ DistSums<acc_t> dist_smem[kThreads];
  __shared__ acc_t red[kWarps];
  const int k = find_layer(t, blockIdx.x);
  const int local = blockIdx.x - t.block_begin[k];
  const int n = local / t.tiles[k], tile = local % t.tiles[k];
  const int64_t C = t.C[k];
  const int W = t.W[k], HW = t.H[k] * t.W[k];
  const scalar_t* a = t.a[k];
  const scalar_t* b = t.b[k];
  const acc_t* w = t.w[k];
  const Strides4 sa = t.sa[k], sb = t.sb[k];
  acc_t d_pixel = 0;  // the distance of the pixel this thread stores (0 for the others)
  if (t.mode[k] == kPlanar) {
    const int G = t.groups[k];
    const int px = kThreads / G;
    const int lane_p = threadIdx.x % px, g = threadIdx.x / px;
    const int p = tile * px + lane_p;
    const bool active = p < HW;
    const int h = active ? p / W : 0, x = active ? p % W : 0;
    const scalar_t* pa = a + n * sa.n + h * sa.h + x * sa.w;
    const scalar_t* pb = b + n * sb.n + h * sb.h + x * sb.w;
    NormSums<acc_t> ns;
    zero(ns);
    if (active) {
#pragma unroll 4
      for (int64_t c = g; c < C; c += G)
        accumulate_norms(ns, static_cast<acc_t>(pa[c * sa.c]), static_cast<acc_t>(pb[c * sb.c]));
    }
    norm_smem[threadIdx.x] = ns;
    __syncthreads();
    // Every group merges the partial sums in the same order, so all hold identical norms.
    NormSums<acc_t> tot = norm_smem[lane_p];
    for (int gg = 1; gg < G; ++gg) merge(tot, norm_smem[gg * px + lane_p]);
    const Norms<acc_t> nm = finalize_norms(tot);
    DistSums<acc_t> ds;
    zero(ds);
    if (active) {
#pragma unroll 4
      for (int64_t c = g; c < C; c += G)
        accumulate_dist(ds, static_cast<acc_t>(pa[c * sa.c]), static_cast<acc_t>(pb[c * sb.c]), w[c], nm);
    }
    dist_smem[threadIdx.x] = ds;
    __syncthreads();
    if (g == 0 && active) {
      for (int gg = 1; gg < G; ++gg) merge(ds, dist_smem[gg * px + lane_p]);
      store_stats(stats, P, t.pix0[k] + static_cast<int64_t>(n) * HW + p, nm, ds);
      d_pixel = ds.d;
    }
  } else {  // kWarpPerPixel: channels innermost
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int p = tile * kWarps + warp;
    const bool active = p < HW;  // uniform within the warp
    const int h = active ? p / W : 0, x = active ? p % W : 0;
    const scalar_t* pa = a + n * sa.n + h * sa.h + x * sa.w;
    const scalar_t* pb = b + n * sb.n + h * sb.h + x * sb.w;
    NormSums<acc_t> ns;
    zero(ns);
    if (active)
      for (int64_t c = lane; c < C; c += kWarp)
        accumulate_norms(ns, static_cast<acc_t>(pa[c * sa.c]), static_cast<acc_t>(pb[c * sb.c]));
    ns.aa = warp_sum(ns.aa);
    ns.bb = warp_sum(ns.bb);
    ns.dd = warp_sum(ns.dd);
    const Norms<acc_t> nm = finalize_norms(ns);
    DistSums<acc_t> ds;
    zero(ds);
    if (active)
      for (int64_t c = lane; c < C; c += kWarp)
        accumulate_dist(ds, static_cast<acc_t>(pa[c * sa.c]), static_cast<acc_t>(pb[c * sb.c]), w[c], nm);
    ds.d = warp_sum(ds.d);
    ds.s0 = warp_sum(ds.s0);
    ds.s1 = warp_sum(ds.s1);
    if (lane == 0 && active) {
      store_stats(stats, P, t.pix0[k] + static_cast<int64_t>(n) * HW + p, nm, ds);
      d_pixel = ds.d;
    }
  }
  const acc_t total = block_sum<kThreads>(d_pixel, red);
  if (threadIdx.x == 0)
    part[(static_cast<int64_t>(layer_offset + k) * t.N + n) * max_tiles + tile] = total * t.inv_hw[k];
}

template <typename acc_t>
struct PixelStats {
  acc_t i0, i1, di, s0, s1;
};

template <typename acc_t>
__device__ __forceinline__ PixelStats<acc_t> load_stats(const acc_t* __restrict__ st, int64_t P, int64_t pix) {
  return {st[pix], st[P + pix], st[2 * P + pix], st[3 * P + pix], st[4 * P + pix]};
}

template <typename scalar_t, typename acc_t, bool kA, bool kB>
__device__ __forceinline__ void backward_element(const LayerTable<scalar_t, acc_t>& t, int k, int n, int64_t c,
                                                 int h, int x, acc_t g, const PixelStats<acc_t>& ps) {
  const Strides4 sa = t.sa[k], sb = t.sb[k];
  acc_t g0, g1;
  grad_pair<acc_t>(g, t.w[k][c], static_cast<acc_t>(t.a[k][n * sa.n + c * sa.c + h * sa.h + x * sa.w]),
                   static_cast<acc_t>(t.b[k][n * sb.n + c * sb.c + h * sb.h + x * sb.w]), ps.i0, ps.i1, ps.di,
                   ps.s0, ps.s1, g0, g1);
  if (kA) {
    const Strides4 s = t.sga[k];
    t.ga[k][n * s.n + c * s.c + h * s.h + x * s.w] = static_cast<scalar_t>(g0);
  }
  if (kB) {
    const Strides4 s = t.sgb[k];
    t.gb[k][n * s.n + c * s.c + h * s.h + x * s.w] = static_cast<scalar_t>(g1);
  }
}

// Planar mode: a block covers kThreads pixels of one (sample, channel) plane.
// Warp-per-pixel mode: a block covers kWarps pixels of one sample, lanes along the channels.
template <typename scalar_t, typename acc_t, bool kA, bool kB>
__global__ void __launch_bounds__(kThreads)
multi_backward_kernel(const LayerTable<scalar_t, acc_t> t, const acc_t* __restrict__ stats, int64_t P,
                      const acc_t* __restrict__ grad, int layer_offset) {
  const int k = find_layer(t, blockIdx.x);
  const int local = blockIdx.x - t.block_begin[k];
  const int W = t.W[k], HW = t.H[k] * t.W[k];
  const int64_t C = t.C[k];
  if (t.mode[k] == kPlanar) {
    const int64_t plane = local / t.tiles[k];
    const int p = (local % t.tiles[k]) * kThreads + threadIdx.x;
    if (p >= HW) return;
    const int n = static_cast<int>(plane / C);
    const int64_t c = plane % C;
    const acc_t g = grad[(layer_offset + k) * t.N + n] * t.inv_hw[k];
    const PixelStats<acc_t> ps = load_stats(stats, P, t.pix0[k] + static_cast<int64_t>(n) * HW + p);
    backward_element<scalar_t, acc_t, kA, kB>(t, k, n, c, p / W, p % W, g, ps);
  } else {
    const int n = local / t.tiles[k];
    const int p = (local % t.tiles[k]) * kWarps + threadIdx.x / kWarp;
    if (p >= HW) return;
    const acc_t g = grad[(layer_offset + k) * t.N + n] * t.inv_hw[k];
    const PixelStats<acc_t> ps = load_stats(stats, P, t.pix0[k] + static_cast<int64_t>(n) * HW + p);
    for (int64_t c = threadIdx.x % kWarp; c < C; c += kWarp)
      backward_element<scalar_t, acc_t, kA, kB>(t, k, n, c, p / W, p % W, g, ps);
  }
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Fills the table for layers [k0, k1) and returns the number of blocks of the launch.
template <typename scalar_t, typename acc_t>
int fill_table(LayerTable<scalar_t, acc_t>& t, const MultiArgs& m, int64_t k0, int64_t k1, bool backward,
               const std::vector<at::Tensor>& g0, const std::vector<at::Tensor>& g1, bool need_f0, bool need_f1) {
  t.L = static_cast<int>(k1 - k0);
  t.N = static_cast<int>(m.N);
  int64_t blocks = 0;
  for (int64_t k = k0; k < k1; ++k) {
    const int i = static_cast<int>(k - k0);
    const auto &a = m.f0[k], &b = m.f1[k];
    const int64_t C = a.size(1), H = a.size(2), W = a.size(3), HW = H * W;
    t.a[i] = a.const_data_ptr<scalar_t>();
    t.b[i] = b.const_data_ptr<scalar_t>();
    t.w[i] = m.w[k].const_data_ptr<acc_t>();
    t.sa[i] = strides_of(a);
    t.sb[i] = strides_of(b);
    t.ga[i] = need_f0 ? g0[k].mutable_data_ptr<scalar_t>() : nullptr;
    t.gb[i] = need_f1 ? g1[k].mutable_data_ptr<scalar_t>() : nullptr;
    t.sga[i] = need_f0 ? strides_of(g0[k]) : Strides4{0, 0, 0, 0};
    t.sgb[i] = need_f1 ? strides_of(g1[k]) : Strides4{0, 0, 0, 0};
    t.C[i] = C;
    t.H[i] = static_cast<int>(H);
    t.W[i] = static_cast<int>(W);
    t.pix0[i] = m.pixel_begin[k];
    t.inv_hw[i] = acc_t(1) / static_cast<acc_t>(HW);
    t.groups[i] = C >= 256 ? 8 : (C >= 32 ? 4 : 1);
    int64_t layer_blocks;
    if (!backward) {
      const bool channels_inner = t.sa[i].c == 1 && t.sb[i].c == 1 && C > 1;
      t.mode[i] = channels_inner ? kWarpPerPixel : kPlanar;
      t.tiles[i] = ceil_div(HW, channels_inner ? kWarps : kThreads / t.groups[i]);
      layer_blocks = m.N * t.tiles[i];
    } else {
      const int64_t out_c_stride = need_f0 ? t.sga[i].c : t.sgb[i].c;
      const bool channels_inner = out_c_stride == 1 && C > 1;
      t.mode[i] = channels_inner ? kWarpPerPixel : kPlanar;
      t.tiles[i] = ceil_div(HW, channels_inner ? kWarps : kThreads);
      layer_blocks = channels_inner ? m.N * t.tiles[i] : m.N * C * t.tiles[i];
    }
    TORCH_CHECK(HW < (int64_t(1) << 31) && blocks + layer_blocks < (int64_t(1) << 31),
                "d2g_fast::lpips_distance_multi: the layers of ", H, "x", W, " pixels (N = ", m.N, ", C = ", C,
                ") exceed the CUDA kernel's grid limits");
    t.block_begin[i] = static_cast<int>(blocks);
    blocks += layer_blocks;
  }
  t.block_begin[t.L] = static_cast<int>(blocks);
  return static_cast<int>(blocks);
}

int forward_max_tiles(const MultiArgs& m) {
  int tiles = 1;
  for (int64_t k = 0; k < m.L; ++k) {
    const auto& a = m.f0[k];
    const int64_t C = a.size(1), HW = a.size(2) * a.size(3);
    const int groups = C >= 256 ? 8 : (C >= 32 ? 4 : 1);
    // The smaller tile of the two modes bounds the tile count of either.
    tiles = std::max(tiles, ceil_div(HW, std::min(kWarps, kThreads / groups)));
  }
  return tiles;
}

std::tuple<at::Tensor, at::Tensor> lpips_distance_multi_cuda(at::TensorList f0, at::TensorList f1,
                                                             at::TensorList weights) {
  const MultiArgs m = prepare_multi("d2g_fast::lpips_distance_multi", f0, f1, weights);
  const c10::cuda::CUDAGuard guard(m.f0[0].device());
  auto stats = alloc_multi_stats(m);
  const int max_tiles = forward_max_tiles(m);
  auto part = at::zeros({m.L, m.N, max_tiles}, m.f0[0].options().dtype(m.acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const std::vector<at::Tensor> none;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.dtype, "lpips_distance_multi_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t k0 = 0; k0 < m.L; k0 += kMaxLayers) {
      const int64_t k1 = std::min<int64_t>(m.L, k0 + kMaxLayers);
      LayerTable<scalar_t, acc_t> t{};
      const int blocks = fill_table(t, m, k0, k1, /*backward=*/false, none, none, false, false);
      multi_forward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          t, stats.mutable_data_ptr<acc_t>(), m.pixels(), max_tiles, part.mutable_data_ptr<acc_t>(),
          static_cast<int>(k0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {part.sum(2), stats};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> lpips_distance_multi_backward_cuda(
    const at::Tensor& grad, at::TensorList f0, at::TensorList f1, at::TensorList weights, const at::Tensor& stats,
    bool need_f0, bool need_f1) {
  static constexpr const char* op = "d2g_fast::lpips_distance_multi_backward";
  const MultiArgs m = prepare_multi(op, f0, f1, weights);
  check_multi_backward(op, grad, stats, m);
  const c10::cuda::CUDAGuard guard(m.f0[0].device());
  auto g0 = alloc_multi_grads(m.f0, need_f0);
  auto g1 = alloc_multi_grads(m.f1, need_f1);
  if (!need_f0 && !need_f1) return {g0, g1};
  const auto gcont = grad.to(m.acc).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.dtype, "lpips_distance_multi_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t k0 = 0; k0 < m.L; k0 += kMaxLayers) {
      const int64_t k1 = std::min<int64_t>(m.L, k0 + kMaxLayers);
      LayerTable<scalar_t, acc_t> t{};
      const int blocks = fill_table(t, m, k0, k1, /*backward=*/true, g0, g1, need_f0, need_f1);
      const acc_t* st = stats.const_data_ptr<acc_t>();
      const acc_t* gp = gcont.const_data_ptr<acc_t>();
      if (need_f0 && need_f1)
        multi_backward_kernel<scalar_t, acc_t, true, true>
            <<<blocks, kThreads, 0, stream>>>(t, st, m.pixels(), gp, static_cast<int>(k0));
      else if (need_f0)
        multi_backward_kernel<scalar_t, acc_t, true, false>
            <<<blocks, kThreads, 0, stream>>>(t, st, m.pixels(), gp, static_cast<int>(k0));
      else
        multi_backward_kernel<scalar_t, acc_t, false, true>
            <<<blocks, kThreads, 0, stream>>>(t, st, m.pixels(), gp, static_cast<int>(k0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {g0, g1};
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CUDA, m) {
  m.impl("lpips_distance_multi", &lpips_distance_multi_cuda);
  m.impl("lpips_distance_multi_backward", &lpips_distance_multi_backward_cuda);
}

}  // namespace lpips
}  // namespace d2g
