// CUDA kernels of the LatentLPIPS layer distance.
// Forward: two passes over each pixel's channels (norms, then the distance sums, read again from
// cache), the cancellation-free math of lpips_distance_math.h. With channel planes (NCHW) a thread column owns a
// pixel and neighbouring threads read neighbouring pixels (coalesced); with channels innermost
// (channels_last) a warp owns a pixel and its lanes read neighbouring channels, then reduce
// with shuffles. Backward: one elementwise pass per input gradient, in the output's memory
// order. Launches: forward 1 kernel + 1 mean (none with spatial=True); backward 1 per gradient.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lpips_distance/lpips_distance.h"
#include "lpips_distance/lpips_distance_math.h"
#include "common/cuda_reduce.cuh"

namespace d2g {
namespace lpips {
namespace {

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename acc_t>
__device__ __forceinline__ void store_pixel(const Norms<acc_t>& nm, const DistSums<acc_t>& ds, int64_t p,
                                            int64_t plane, acc_t* map, acc_t* stats) {
  map[p] = ds.d;
  stats[p] = nm.i0;
  stats[plane + p] = nm.i1;
  stats[2 * plane + p] = nm.di;
  stats[3 * plane + p] = ds.s0;
  stats[4 * plane + p] = ds.s1;
}

// Planar layout: blockDim = (pixels, channel groups). Threads along x read neighbouring pixels
// (coalesced); the y groups split the channel loop (more loads in flight for deep layers with
// few pixels) and are merged through shared memory, after each of the two passes (norms, then
// the distance sums: the second pass reads the channels again, from cache). Every group merges
// the norms in the same order, so all hold identical values.
template <typename scalar_t, typename acc_t>
__global__ void forward_planar(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, Strides4 sa,
                               Strides4 sb, const acc_t* __restrict__ w, acc_t* __restrict__ map,
                               acc_t* __restrict__ stats, int64_t N, int64_t C, int64_t H, int64_t W) {
  __shared__ NormSums<acc_t> norm_partial[kThreads];
  __shared__ DistSums<acc_t> dist_partial[kThreads];
  const int64_t plane = N * H * W;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = p < plane;
  const int64_t x = active ? p % W : 0, h = active ? (p / W) % H : 0, n = active ? p / (W * H) : 0;
  const scalar_t* pa = a + n * sa.n + h * sa.h + x * sa.w;
  const scalar_t* pb = b + n * sb.n + h * sb.h + x * sb.w;
  NormSums<acc_t> ns;
  zero(ns);
  if (active) {
#pragma unroll 4
    for (int64_t c = threadIdx.y; c < C; c += blockDim.y)
      accumulate_norms(ns, static_cast<acc_t>(pa[c * sa.c]), static_cast<acc_t>(pb[c * sb.c]));
  }
  norm_partial[threadIdx.y * blockDim.x + threadIdx.x] = ns;
  __syncthreads();
  NormSums<acc_t> tot = norm_partial[threadIdx.x];
  for (unsigned g = 1; g < blockDim.y; ++g) merge(tot, norm_partial[g * blockDim.x + threadIdx.x]);
  const Norms<acc_t> nm = finalize_norms(tot);
  DistSums<acc_t> ds;
  zero(ds);
  if (active) {
#pragma unroll 4
    for (int64_t c = threadIdx.y; c < C; c += blockDim.y)
      accumulate_dist(ds, static_cast<acc_t>(pa[c * sa.c]), static_cast<acc_t>(pb[c * sb.c]), w[c], nm);
  }
  dist_partial[threadIdx.y * blockDim.x + threadIdx.x] = ds;
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    for (unsigned g = 1; g < blockDim.y; ++g) merge(ds, dist_partial[g * blockDim.x + threadIdx.x]);
    store_pixel(nm, ds, p, plane, map, stats);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void forward_warp_per_pixel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                       Strides4 sa, Strides4 sb, const acc_t* __restrict__ w,
                                       acc_t* __restrict__ map, acc_t* __restrict__ stats, int64_t N,
                                       int64_t C, int64_t H, int64_t W) {
  const int64_t plane = N * H * W;
  const int lane = threadIdx.x % kWarp;
  const int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (p >= plane) return;  // whole warps leave together: p is uniform within a warp
  const int64_t x = p % W, h = (p / W) % H, n = p / (W * H);
  const scalar_t* pa = a + n * sa.n + h * sa.h + x * sa.w;
  const scalar_t* pb = b + n * sb.n + h * sb.h + x * sb.w;
  NormSums<acc_t> ns;
  zero(ns);
  for (int64_t c = lane; c < C; c += kWarp)
    accumulate_norms(ns, static_cast<acc_t>(pa[c]), static_cast<acc_t>(pb[c]));
  ns.aa = warp_sum(ns.aa);
  ns.bb = warp_sum(ns.bb);
  ns.dd = warp_sum(ns.dd);
  const Norms<acc_t> nm = finalize_norms(ns);
  DistSums<acc_t> ds;
  zero(ds);
  for (int64_t c = lane; c < C; c += kWarp)
    accumulate_dist(ds, static_cast<acc_t>(pa[c]), static_cast<acc_t>(pb[c]), w[c], nm);
  ds.d = warp_sum(ds.d);
  ds.s0 = warp_sum(ds.s0);
  ds.s1 = warp_sum(ds.s1);
  if (lane == 0) store_pixel(nm, ds, p, plane, map, stats);
}

// Backward, planar output: grid.x walks (n, c) planes, grid.y blocks of pixels within a plane,
// so each thread does 32-bit index arithmetic only and writes along the row (coalesced).
template <typename scalar_t, typename acc_t>
__global__ void backward_planar(const scalar_t* __restrict__ self_, const scalar_t* __restrict__ other,
                                Strides4 ss, Strides4 so, scalar_t* __restrict__ out, Strides4 sout,
                                const acc_t* __restrict__ w, const acc_t* __restrict__ pixel_grad,
                                const acc_t* __restrict__ i_self, const acc_t* __restrict__ di, acc_t di_sign,
                                const acc_t* __restrict__ s_self, int64_t C, int H, int W) {
  const int hw = blockIdx.y * blockDim.x + threadIdx.x;
  if (hw >= H * W) return;
  const int64_t n = blockIdx.x / C, c = blockIdx.x % C;
  const int h = hw / W, x = hw % W;
  const int64_t p = n * H * W + hw;
  const acc_t g = grad_one<acc_t>(pixel_grad[p], w[c],
                                  static_cast<acc_t>(self_[n * ss.n + c * ss.c + h * ss.h + x * ss.w]),
                                  static_cast<acc_t>(other[n * so.n + c * so.c + h * so.h + x * so.w]),
                                  i_self[p], di_sign * di[p], s_self[p]);
  out[n * sout.n + c * sout.c + h * sout.h + x * sout.w] = static_cast<scalar_t>(g);
}

// Backward, channels-innermost output: a warp per pixel, lanes along the channels.
template <typename scalar_t, typename acc_t>
__global__ void backward_channels_inner(const scalar_t* __restrict__ self_, const scalar_t* __restrict__ other,
                                        Strides4 ss, Strides4 so, scalar_t* __restrict__ out, Strides4 sout,
                                        const acc_t* __restrict__ w, const acc_t* __restrict__ pixel_grad,
                                        const acc_t* __restrict__ i_self, const acc_t* __restrict__ di,
                                        acc_t di_sign, const acc_t* __restrict__ s_self, int64_t N, int64_t C,
                                        int64_t H, int64_t W) {
  const int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (p >= N * H * W) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t x = p % W, h = (p / W) % H, n = p / (W * H);
  const scalar_t* ps = self_ + n * ss.n + h * ss.h + x * ss.w;
  const scalar_t* po = other + n * so.n + h * so.h + x * so.w;
  scalar_t* pd = out + n * sout.n + h * sout.h + x * sout.w;
  const acc_t g = pixel_grad[p], ia = i_self[p], dia = di_sign * di[p], sa = s_self[p];
  for (int64_t c = lane; c < C; c += kWarp)
    pd[c * sout.c] = static_cast<scalar_t>(grad_one<acc_t>(
        g, w[c], static_cast<acc_t>(ps[c * ss.c]), static_cast<acc_t>(po[c * so.c]), ia, dia, sa));
}

unsigned int blocks_for(int64_t work, int threads) {
  const int64_t b = (work + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(b, int64_t(1) << 30));
}

std::tuple<at::Tensor, at::Tensor> lpips_distance_cuda(const at::Tensor& f0, const at::Tensor& f1,
                                                       const at::Tensor& weight, bool spatial) {
  const auto acc = check_forward_args(f0, f1, weight);
  const c10::cuda::CUDAGuard guard(f0.device());
  const auto w = weight.to(acc).contiguous();
  auto [map, stats] = alloc_forward_outputs(f0, acc);
  const int64_t N = f0.size(0), C = f0.size(1), H = f0.size(2), W = f0.size(3);
  const int64_t pixels = N * H * W;
  const auto sa = strides_of(f0), sb = strides_of(f1);
  const bool channels_inner = sa.c == 1 && sb.c == 1 && C > 1;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "lpips_distance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (channels_inner) {  // a warp per pixel
      forward_warp_per_pixel<scalar_t, acc_t><<<blocks_for(pixels * kWarp, kThreads), kThreads, 0, stream>>>(
          f0.const_data_ptr<scalar_t>(), f1.const_data_ptr<scalar_t>(), sa, sb, w.const_data_ptr<acc_t>(),
          map.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(), N, C, H, W);
    } else {  // deep layers get more channel groups per pixel
      const unsigned groups = C >= 256 ? 8 : (C >= 32 ? 4 : 1);
      const dim3 block(kThreads / groups, groups);
      forward_planar<scalar_t, acc_t><<<blocks_for(pixels, block.x), block, 0, stream>>>(
          f0.const_data_ptr<scalar_t>(), f1.const_data_ptr<scalar_t>(), sa, sb, w.const_data_ptr<acc_t>(),
          map.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(), N, C, H, W);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {finish_distance(map, spatial), stats};
}

std::tuple<at::Tensor, at::Tensor> lpips_distance_backward_cuda(
    const at::Tensor& grad, const at::Tensor& f0, const at::Tensor& f1, const at::Tensor& weight,
    const at::Tensor& stats, bool spatial, bool need_f0, bool need_f1) {
  check_backward_args(grad, f0, f1, weight, stats, spatial);
  const c10::cuda::CUDAGuard guard(f0.device());
  const auto acc = stats.scalar_type();
  const int64_t N = f0.size(0), C = f0.size(1), H = f0.size(2), W = f0.size(3);
  const int64_t plane = N * H * W;
  const auto w = weight.to(acc).contiguous();
  const auto pixel_grad = pixel_gradient(grad, acc, N, H, W, spatial);
  auto g0 = alloc_grad(f0, need_f0);
  auto g1 = alloc_grad(f1, need_f1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(H * W < (int64_t(1) << 31) && N * C < (int64_t(1) << 31) && (H * W + kThreads - 1) / kThreads < 65536,
              "d2g_fast::lpips_distance_backward: feature maps of ", H, "x", W, " with N*C = ", N * C,
              " exceed the CUDA kernel's grid limits");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "lpips_distance_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t* pg = pixel_grad.const_data_ptr<acc_t>();
    // stats rows: [i0, i1, di = i0 - i1, s0, s1]; for f1 the sign of di flips (i1 - i0).
    auto launch = [&](const at::Tensor& self_, const at::Tensor& other, at::Tensor& out, const acc_t* i_self,
                      acc_t di_sign, const acc_t* s_self) {
      const auto sd = strides_of(out);
      if (sd.c == 1 && C > 1) {
        backward_channels_inner<scalar_t, acc_t><<<blocks_for(plane * kWarp, kThreads), kThreads, 0, stream>>>(
            self_.const_data_ptr<scalar_t>(), other.const_data_ptr<scalar_t>(), strides_of(self_),
            strides_of(other), out.mutable_data_ptr<scalar_t>(), sd, w.const_data_ptr<acc_t>(), pg, i_self,
            st + 2 * plane, di_sign, s_self, N, C, H, W);
      } else {
        const dim3 grid(static_cast<unsigned>(N * C), blocks_for(H * W, kThreads));
        backward_planar<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
            self_.const_data_ptr<scalar_t>(), other.const_data_ptr<scalar_t>(), strides_of(self_),
            strides_of(other), out.mutable_data_ptr<scalar_t>(), sd, w.const_data_ptr<acc_t>(), pg, i_self,
            st + 2 * plane, di_sign, s_self, C, static_cast<int>(H), static_cast<int>(W));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (need_f0) launch(f0, f1, g0, st, acc_t(1), st + 3 * plane);
    if (need_f1) launch(f1, f0, g1, st + plane, acc_t(-1), st + 4 * plane);
  });
  return {g0, g1};
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CUDA, m) {
  m.impl("lpips_distance", &lpips_distance_cuda);
  m.impl("lpips_distance_backward", &lpips_distance_backward_cuda);
}

}  // namespace lpips
}  // namespace d2g
