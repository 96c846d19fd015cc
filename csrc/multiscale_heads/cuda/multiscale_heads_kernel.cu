// CUDA kernels of the fused multi-scale discriminator heads.
// ONE launch runs every head of a call (up to kMaxHeads per launch; more heads take more
// launches): a table of head descriptors goes in the kernel arguments and each block finds its
// head by its index. A thread owns one pixel of one sample; at each channel neighbouring
// threads read neighbouring pixels of the NCHW plane (coalesced). Forward: 2 passes over the
// channels (moments, logits), block sums of the loss and logits into a padded (K, N, tiles)
// buffer. Backward: 2 passes (LayerNorm sums; gradients), the weight gradient reduced per warp
// with shuffles into a (warps, C) partial buffer per head. No atomics: results are deterministic.
// Host-side reductions of the partial buffers are small (C or tiles times smaller than the
// features).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "multiscale_heads/multiscale_heads.h"
#include "multiscale_heads/multiscale_heads_math.h"

namespace d2g {
namespace msheads {
namespace {

constexpr int kThreads = 128;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxHeads = 16;

template <typename scalar_t, typename acc_t>
struct HeadTable {
  int K;
  int N;
  const scalar_t* feat[kMaxHeads];
  const acc_t* weight[kMaxHeads];
  acc_t* stats[kMaxHeads];     // (3, N, HW): logit, mean, rstd
  scalar_t* grad[kMaxHeads];   // backward: feature gradients
  acc_t* dw_part[kMaxHeads];   // backward: (N * tiles * kWarps, C) partial weight gradients
  int64_t C[kMaxHeads];
  int64_t HW[kMaxHeads];
  int tiles[kMaxHeads];        // pixel tiles per sample
  int block_begin[kMaxHeads + 1];
  acc_t bias[kMaxHeads];
  acc_t loss_scale[kMaxHeads];
  acc_t score_grad_scale[kMaxHeads];  // 1 / HW
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; the result is valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0)
    for (int i = 0; i < kWarps; ++i) total += smem[i];
  return total;
}

struct Where {
  int k, n, tile;
};

template <typename Table>
__device__ __forceinline__ Where locate(const Table& t) {
  const int b = blockIdx.x;
  int k = 0;
  while (k + 1 < t.K && b >= t.block_begin[k + 1]) ++k;
  const int local = b - t.block_begin[k];
  return {k, local / t.tiles[k], local % t.tiles[k]};
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const HeadTable<scalar_t, acc_t> t, const acc_t* __restrict__ target, acc_t eps,
               int max_tiles, acc_t* __restrict__ loss_part, acc_t* __restrict__ logit_part,
               int head_offset) {
  __shared__ acc_t smem[kWarps];
  const Where w = locate(t);
  const int64_t C = t.C[w.k], HW = t.HW[w.k];
  const int64_t p = static_cast<int64_t>(w.tile) * kThreads + threadIdx.x;
  const bool active = p < HW;
  const scalar_t* f = t.feat[w.k] + static_cast<int64_t>(w.n) * C * HW + p;
  const acc_t* wk = t.weight[w.k];
  acc_t loss = 0, logit = 0;
  if (active) {
    const acc_t shift = static_cast<acc_t>(f[0]);
    acc_t s1 = 0, s2 = 0;
#pragma unroll 4
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(f[c * HW]) - shift;
      s1 += d;
      s2 += d * d;
    }
    acc_t mean, rstd;
    moments(s1, s2, shift, C, eps, mean, rstd);
    logit = t.bias[w.k];
#pragma unroll 4
    for (int64_t c = 0; c < C; ++c)
      logit += wk[c] * silu((static_cast<acc_t>(f[c * HW]) - mean) * rstd);
    const int64_t plane = static_cast<int64_t>(t.N) * HW;
    acc_t* st = t.stats[w.k] + static_cast<int64_t>(w.n) * HW + p;
    st[0] = logit;
    st[plane] = mean;
    st[2 * plane] = rstd;
    loss = softplus(-target[w.n] * logit);
  }
  const acc_t loss_sum = block_sum(loss, smem);
  const acc_t logit_sum = block_sum(logit, smem);
  if (threadIdx.x == 0) {
    const int64_t slot = (static_cast<int64_t>(head_offset + w.k) * t.N + w.n) * max_tiles + w.tile;
    loss_part[slot] = loss_sum;
    logit_part[slot] = logit_sum;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const HeadTable<scalar_t, acc_t> t, const acc_t* __restrict__ target,
                const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ grad_scores,
                int max_tiles, acc_t* __restrict__ db_part, int head_offset) {
  __shared__ acc_t smem[kWarps];
  const Where w = locate(t);
  const int64_t C = t.C[w.k], HW = t.HW[w.k];
  const int64_t p = static_cast<int64_t>(w.tile) * kThreads + threadIdx.x;
  const bool active = p < HW;
  const int64_t offset = static_cast<int64_t>(w.n) * C * HW + (active ? p : 0);
  const scalar_t* f = t.feat[w.k] + offset;
  scalar_t* df = t.grad[w.k] + offset;
  const acc_t* wk = t.weight[w.k];
  const int64_t plane = static_cast<int64_t>(t.N) * HW;
  acc_t g = 0, mean = 0, rstd = 0;
  if (active) {
    const acc_t* st = t.stats[w.k] + static_cast<int64_t>(w.n) * HW + p;
    mean = st[plane];
    rstd = st[2 * plane];
    g = logit_grad(st[0], target[w.n], grad_loss[0], t.loss_scale[w.k],
                   grad_scores[(head_offset + w.k) * t.N + w.n] * t.score_grad_scale[w.k]);
  }
  acc_t sum_d = 0, sum_dx = 0;
  if (active) {
#pragma unroll 4
    for (int64_t c = 0; c < C; ++c) {
      const acc_t xhat = (static_cast<acc_t>(f[c * HW]) - mean) * rstd;
      const acc_t d = g * wk[c] * silu_grad(xhat);
      sum_d += d;
      sum_dx += d * xhat;
    }
  }
  const acc_t inv_c = acc_t(1) / acc_t(C);
  sum_d *= inv_c;
  sum_dx *= inv_c;
  const int lane = threadIdx.x % kWarp;
  const int64_t warp_row =
      (static_cast<int64_t>(w.n) * t.tiles[w.k] + w.tile) * kWarps + threadIdx.x / kWarp;
  acc_t* dw_row = t.dw_part[w.k] + warp_row * C;
  // Every thread of the warp stays in the loop (inactive ones add 0): the shuffles need them.
#pragma unroll 4
  for (int64_t c = 0; c < C; ++c) {
    acc_t contrib = 0;
    if (active) {
      const acc_t xhat = (static_cast<acc_t>(f[c * HW]) - mean) * rstd;
      const acc_t s = sigmoid_normalised(xhat);
      const acc_t d = g * wk[c] * (s * (acc_t(1) + xhat * (acc_t(1) - s)));
      df[c * HW] = static_cast<scalar_t>(feature_grad(d, xhat, rstd, sum_d, sum_dx));
      contrib = g * xhat * s;
    }
    contrib = warp_sum(contrib);
    if (lane == 0) dw_row[c] = contrib;
  }
  const acc_t db = block_sum(g, smem);
  if (threadIdx.x == 0)
    db_part[(static_cast<int64_t>(head_offset + w.k) * t.N + w.n) * max_tiles + w.tile] = db;
}

int tiles_of(int64_t HW) { return static_cast<int>((HW + kThreads - 1) / kThreads); }

int max_tiles_of(const Prepared& p) {
  int m = 1;
  for (const auto& f : p.features) m = std::max(m, tiles_of(f.size(2) * f.size(3)));
  return m;
}

// Fills the table for heads [k0, k1) and returns the number of blocks.
template <typename scalar_t, typename acc_t>
int fill_table(HeadTable<scalar_t, acc_t>& t, const Prepared& p, int64_t k0, int64_t k1,
               const std::vector<at::Tensor>& stats, const std::vector<double>& bias) {
  t.K = static_cast<int>(k1 - k0);
  t.N = static_cast<int>(p.N);
  int blocks = 0;
  for (int64_t k = k0; k < k1; ++k) {
    const int i = static_cast<int>(k - k0);
    const auto& f = p.features[k];
    t.feat[i] = f.const_data_ptr<scalar_t>();
    t.weight[i] = p.weights[k].const_data_ptr<acc_t>();
    t.stats[i] = const_cast<acc_t*>(stats[k].const_data_ptr<acc_t>());
    t.grad[i] = nullptr;
    t.dw_part[i] = nullptr;
    t.C[i] = f.size(1);
    t.HW[i] = f.size(2) * f.size(3);
    t.tiles[i] = tiles_of(t.HW[i]);
    t.block_begin[i] = blocks;
    blocks += t.tiles[i] * t.N;
    t.bias[i] = static_cast<acc_t>(bias.empty() ? 0.0 : bias[k]);
    t.score_grad_scale[i] = acc_t(1) / static_cast<acc_t>(t.HW[i]);
  }
  t.block_begin[t.K] = blocks;
  return blocks;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> multiscale_heads_cuda(
    at::TensorList features, at::TensorList weights, const at::Tensor& bias, const at::Tensor& target,
    at::ArrayRef<double> head_weights, double eps) {
  const Prepared p = prepare("d2g_fast::multiscale_heads", features, weights, target, head_weights, eps);
  check_bias(bias, p);
  const c10::cuda::CUDAGuard guard(p.features[0].device());
  // The bias goes in the kernel arguments (K numbers): one small device-to-host copy.
  const auto bias_host = bias.to(at::kDouble).cpu();
  std::vector<double> b(bias_host.const_data_ptr<double>(), bias_host.const_data_ptr<double>() + p.K);
  auto stats = alloc_stats(p);
  const int max_tiles = max_tiles_of(p);
  const auto opts = p.features[0].options().dtype(p.acc);
  auto loss_part = at::zeros({p.K, p.N, max_tiles}, opts);
  auto logit_part = at::zeros({p.K, p.N, max_tiles}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.features[0].scalar_type(),
                                  "multiscale_heads_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t k0 = 0; k0 < p.K; k0 += kMaxHeads) {
      const int64_t k1 = std::min<int64_t>(p.K, k0 + kMaxHeads);
      HeadTable<scalar_t, acc_t> t{};
      const int blocks = fill_table(t, p, k0, k1, stats, b);
      forward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          t, p.target.const_data_ptr<acc_t>(), static_cast<acc_t>(eps), max_tiles,
          loss_part.mutable_data_ptr<acc_t>(), logit_part.mutable_data_ptr<acc_t>(),
          static_cast<int>(k0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  auto [loss, scores] = finish_forward(loss_part.sum(2), logit_part.sum(2), p);
  return {loss, scores, stats};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> multiscale_heads_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& grad_scores, at::TensorList features,
    at::TensorList weights, const at::Tensor& target, at::ArrayRef<double> head_weights, double eps,
    at::TensorList stats) {
  const Prepared p =
      prepare("d2g_fast::multiscale_heads_backward", features, weights, target, head_weights, eps);
  check_backward_args(grad_loss, grad_scores, stats, p);
  const c10::cuda::CUDAGuard guard(p.features[0].device());
  const auto gl = grad_loss.to(p.acc).reshape({1}).contiguous();
  const auto gs = grad_scores.to(p.acc).contiguous();
  const auto scale_host = p.loss_scale.to(at::kDouble).cpu();
  const double* scale = scale_host.const_data_ptr<double>();
  const int max_tiles = max_tiles_of(p);
  const auto opts = p.features[0].options().dtype(p.acc);
  std::vector<at::Tensor> grad_features, dw_part, stats_v(stats.begin(), stats.end());
  for (int64_t k = 0; k < p.K; ++k) {
    const auto& f = p.features[k];
    grad_features.push_back(poisoned(at::empty_like(f)));
    const int64_t rows = p.N * tiles_of(f.size(2) * f.size(3)) * kWarps;
    dw_part.push_back(poisoned(at::empty({rows, f.size(1)}, opts)));
  }
  auto db_part = at::zeros({p.K, p.N, max_tiles}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.features[0].scalar_type(),
                                  "multiscale_heads_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t k0 = 0; k0 < p.K; k0 += kMaxHeads) {
      const int64_t k1 = std::min<int64_t>(p.K, k0 + kMaxHeads);
      HeadTable<scalar_t, acc_t> t{};
      const int blocks = fill_table(t, p, k0, k1, stats_v, {});
      for (int64_t k = k0; k < k1; ++k) {
        t.grad[k - k0] = grad_features[k].mutable_data_ptr<scalar_t>();
        t.dw_part[k - k0] = dw_part[k].mutable_data_ptr<acc_t>();
        t.loss_scale[k - k0] = static_cast<acc_t>(scale[k]);
      }
      backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          t, p.target.const_data_ptr<acc_t>(), gl.const_data_ptr<acc_t>(), gs.const_data_ptr<acc_t>(),
          max_tiles, db_part.mutable_data_ptr<acc_t>(), static_cast<int>(k0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  std::vector<at::Tensor> grad_weights;
  for (int64_t k = 0; k < p.K; ++k)
    grad_weights.push_back(dw_part[k].sum(0).to(weights[k].scalar_type()));
  return {grad_features, grad_weights, db_part.sum({1, 2})};
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CUDA, m) {
  m.impl("multiscale_heads", &multiscale_heads_cuda);
  m.impl("multiscale_heads_backward", &multiscale_heads_backward_cuda);
}

}  // namespace msheads
}  // namespace d2g
