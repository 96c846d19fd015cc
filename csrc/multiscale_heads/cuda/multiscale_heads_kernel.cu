// CUDA kernels of the fused multi-scale discriminator heads.
//
// Work layout. ONE launch runs every head of a call (up to kMaxHeads per launch; more heads take
// more launches): a table of head descriptors travels in the kernel arguments and each block
// finds its head from its index. A block of kThreads threads covers P pixels of one sample times
// G = kThreads / P channel groups: thread t owns pixel t % P and the channels
// c = t / P + r G, r = 0, 1, ... ("rounds"). Within a warp the lanes read P consecutive pixels of
// 32 / P neighbouring channel planes (or 32 consecutive pixels of one plane when P >= 32): full
// 32-byte sectors for P >= 8 in fp32. Per-pixel channel sums are combined across the G groups in
// shared memory. P is chosen per head on the host (pixels_per_block): large maps keep many pixels
// per block, small maps with many channels split them into up to 32 groups (SD1.5 at batch 16:
// 8x8 and 16x16 with C = 2560 take P = 8, G = 32, 80 channels per thread and 128 / 512 blocks;
// 64x64 with C = 960 takes P = 32, G = 8), so that no thread walks more than about kMaxRounds
// channels and the low-resolution heads are not long chains of dependent loads on a few SMs.
// Heads are ordered longest rounds first so that their blocks start first and the short ones
// fill the tail.
//
// Forward (1 head launch + 1 finishing launch, after one zero-fill of the partial buffer):
// pass 1 over the channels gives the shifted moments, pass 2 (in reverse channel order, for
// cache reuse) the logit and the backward's channel means m1, m2 (multiscale_heads_math.h); the
// pixel's stats (logit, mean, rstd, m1, m2) are written once. Each block writes its loss sum
// (times head_weight / (N H W)) and logit sum (times 1 / (H W)) to a (K, N, max_tiles) buffer
// that finish_forward_kernel reduces, in one block, to the scores (K, N) and the loss.
// Backward (1 head launch + 1 finishing launch): ONE pass over the channels writes the feature
// gradient; the weight gradient of the block's pixels is reduced in shared memory, kChunk rounds
// at a time (each thread stores its contribution, then all threads sum rows of P values), into
// one partial row per block of (C + 1) values, the last one the bias gradient. A second kernel
// sums the partial rows of every head.
// Launches per call (up to kMaxHeads heads): forward 3 (zero-fill, heads, finish), backward 2
// (heads, finish), plus a copy of any input that is not already contiguous NCHW in its working
// dtype (channels_last features are copied by prepare(), and so is a grad_scores that comes
// from an expand).
// Bytes per call (fp32 features of F bytes, Q pixels): forward reads the features twice (the
// second pass partly from L2) and writes 20 Q bytes of stats; backward reads the features once,
// writes their gradient once, reads the stats (20 Q) and writes + reads the partial rows
// (about F / P). SD1.5 at batch 16: F = 860 MB, 20 Q = 6.5 MB, partial rows 39 MB. No atomics
// anywhere: results are deterministic. No device-to-host copies: bias, grad_loss and
// grad_scores are read by the kernels, head constants travel in the arguments.
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
#include "multiscale_heads/multiscale_heads.h"
#include "multiscale_heads/multiscale_heads_math.h"

namespace d2g {
namespace multiscale_heads {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxHeads = 24;
// Split a head's channels until a thread walks at most this many, but keep at least kMinPixels
// pixels per block (32-byte sectors in fp32, and the partial weight-gradient rows of the
// backward stay at most 1 / kMinPixels of the features).
constexpr int kMaxRounds = 128;
constexpr int kMinPixels = 8;
// Backward: rounds buffered in shared memory before a weight-gradient reduction.
constexpr int kChunk = 8;
// Shared buffer of those rounds: kChunk' = min(P, kChunk) rounds of G rows of P + 1 values (padded
// against bank conflicts): kChunk' (kThreads + G) <= kChunk (kThreads + kThreads / kChunk).
constexpr int kChunkBuffer = kChunk * (kThreads + kThreads / kChunk);

template <typename scalar_t, typename acc_t>
struct Head {
  const scalar_t* feat;  // (N, C, HW), contiguous
  const acc_t* weight;   // (C,)
  acc_t* stats;          // (kStatRows, N, HW)
  scalar_t* grad;        // backward: the feature gradient, laid out like feat
  acc_t* part;           // backward: (N * tiles, C + 1) partial rows [dw_0 .. dw_{C-1}, db]
  int64_t C;
  int64_t HW;
  int P;                 // pixels per block (a power of two); G = kThreads / P channel groups
  int tiles;             // blocks per sample: ceil(HW / P)
  int block_begin;       // the head's first block in the launch
  int slot;              // the head's index in the call (rows of bias, scores, grad_scores)
  acc_t loss_scale;      // head_weight / (N HW)
  acc_t inv_hw;          // 1 / HW
};

template <typename scalar_t, typename acc_t>
struct HeadTable {
  int count;
  int N;
  Head<scalar_t, acc_t> head[kMaxHeads];
};

static_assert(sizeof(HeadTable<double, double>) <= 4096, "kernel arguments must fit in 4 KB");

// Sums each of the V values over the G channel groups of the thread's pixel; every thread gets
// its pixel's totals (all in the same order, so the groups agree bit for bit).
template <int V, typename acc_t>
__device__ __forceinline__ void sum_over_groups(acc_t (&v)[V], acc_t (*smem)[kThreads], int P,
                                                int pixel) {
  __syncthreads();  // a previous call may still be reading smem
#pragma unroll
  for (int i = 0; i < V; ++i) smem[i][threadIdx.x] = v[i];
  __syncthreads();
  const int G = kThreads / P;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    acc_t total = 0;
    for (int g = 0; g < G; ++g) total += smem[i][g * P + pixel];
    v[i] = total;
  }
}

// The block's head, and its sample and pixel tile within the head.
struct Where {
  int k, n, tile, local;
};

template <typename Table>
__device__ __forceinline__ Where locate(const Table& t) {
  const int b = blockIdx.x;
  int k = 0;
  while (k + 1 < t.count && b >= t.head[k + 1].block_begin) ++k;
  const int local = b - t.head[k].block_begin;
  return {k, local / t.head[k].tiles, local % t.head[k].tiles, local};
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const HeadTable<scalar_t, acc_t> t, const acc_t* __restrict__ bias,
               const acc_t* __restrict__ target, acc_t eps, int max_tiles,
               acc_t* __restrict__ loss_part, acc_t* __restrict__ logit_part) {
  __shared__ acc_t group_smem[3][kThreads];
  __shared__ acc_t block_smem[kWarps];
  const Where w = locate(t);
  const Head<scalar_t, acc_t>& h = t.head[w.k];
  const int64_t C = h.C, HW = h.HW;
  const int P = h.P, G = kThreads / P;
  const int pixel = threadIdx.x % P, group = threadIdx.x / P;
  const int64_t p = static_cast<int64_t>(w.tile) * P + pixel;
  const bool active = p < HW;
  const scalar_t* f = h.feat + static_cast<int64_t>(w.n) * C * HW + (active ? p : 0);
  const acc_t* wk = h.weight;

  // Pass 1: moments shifted by the pixel's channel 0 (see moments()).
  const acc_t shift = active ? static_cast<acc_t>(f[0]) : acc_t(0);
  acc_t sums[2] = {0, 0};
  if (active) {
#pragma unroll 4
    for (int64_t c = group; c < C; c += G) {
      const acc_t d = static_cast<acc_t>(f[c * HW]) - shift;
      sums[0] += d;
      sums[1] += d * d;
    }
  }
  sum_over_groups<2>(sums, group_smem, P, pixel);
  acc_t mean, rstd;
  moments(sums[0], sums[1], shift, C, eps, mean, rstd);

  // Pass 2: logit, and the backward's m1 = mean_c(w silu'(xhat)), m2 = mean_c(w silu'(xhat) xhat).
  // It walks the channels backwards: the planes pass 1 read last are the likeliest to be still
  // in L1 / L2 (a block's P x C values outgrow its share of the caches; a forward sweep would
  // find every one of them evicted).
  acc_t acc[3] = {0, 0, 0};
  if (active && group < C) {
    const int64_t last = group + (C - 1 - group) / G * G;  // this thread's last channel
#pragma unroll 4
    for (int64_t c = last; c >= 0; c -= G) {
      const acc_t xhat = (static_cast<acc_t>(f[c * HW]) - mean) * rstd;
      acc_t a, da;
      silu_and_grad(xhat, a, da);
      const acc_t wc = wk[c];
      acc[0] += wc * a;
      acc[1] += wc * da;
      acc[2] += wc * da * xhat;
    }
  }
  sum_over_groups<3>(acc, group_smem, P, pixel);

  acc_t loss = 0, logit = 0;
  if (active && group == 0) {
    logit = acc[0] + bias[h.slot];
    const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
    const int64_t plane = static_cast<int64_t>(t.N) * HW;
    acc_t* st = h.stats + static_cast<int64_t>(w.n) * HW + p;
    st[0] = logit;
    st[plane] = mean;
    st[2 * plane] = rstd;
    st[3 * plane] = acc[1] * inv_c;
    st[4 * plane] = acc[2] * inv_c;
    loss = softplus(-target[w.n] * logit);
  }
  const acc_t loss_sum = block_sum<kThreads>(loss, block_smem);
  const acc_t logit_sum = block_sum<kThreads>(logit, block_smem);
  if (threadIdx.x == 0) {
    const int64_t slot = (static_cast<int64_t>(h.slot) * t.N + w.n) * max_tiles + w.tile;
    loss_part[slot] = loss_sum * h.loss_scale;
    logit_part[slot] = logit_sum * h.inv_hw;
  }
}

// One block of 32 warps: scores[i] = sum of logit_part row i, loss = sum of all loss_part rows,
// rows of max_tiles values (tiles a head does not have hold zeros). A warp per row, in a fixed
// order: deterministic.
constexpr int kFinishWarps = 32;

template <typename acc_t>
__global__ void __launch_bounds__(kFinishWarps * kWarp)
finish_forward_kernel(const acc_t* __restrict__ loss_part, const acc_t* __restrict__ logit_part,
                      int rows, int max_tiles, acc_t* __restrict__ scores, acc_t* __restrict__ loss) {
  __shared__ acc_t smem[kFinishWarps];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  acc_t loss_acc = 0;
  for (int i = warp; i < rows; i += kFinishWarps) {
    acc_t l = 0, s = 0;
    for (int j = lane; j < max_tiles; j += kWarp) {
      l += loss_part[static_cast<int64_t>(i) * max_tiles + j];
      s += logit_part[static_cast<int64_t>(i) * max_tiles + j];
    }
    s = warp_sum(s);  // xor butterfly: every lane holds the row total
    l = warp_sum(l);
    if (lane == 0) scores[i] = s;
    loss_acc += l;
  }
  if (lane == 0) smem[warp] = loss_acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
    for (int i = 0; i < kFinishWarps; ++i) total += smem[i];
    *loss = total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const HeadTable<scalar_t, acc_t> t, const acc_t* __restrict__ target,
                const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ grad_scores) {
  __shared__ acc_t chunk[kChunkBuffer];
  __shared__ acc_t block_smem[kWarps];
  const Where w = locate(t);
  const Head<scalar_t, acc_t>& h = t.head[w.k];
  const int64_t C = h.C, HW = h.HW;
  const int P = h.P, G = kThreads / P;
  const int pixel = threadIdx.x % P, group = threadIdx.x / P;
  const int64_t p = static_cast<int64_t>(w.tile) * P + pixel;
  const bool active = p < HW;
  const int64_t offset = static_cast<int64_t>(w.n) * C * HW + (active ? p : 0);
  const scalar_t* f = h.feat + offset;
  scalar_t* df = h.grad + offset;
  const acc_t* wk = h.weight;

  acc_t g = 0, g_rstd = 0, mean = 0, rstd = 0, m1 = 0, m2 = 0;
  if (active) {
    const int64_t plane = static_cast<int64_t>(t.N) * HW;
    const acc_t* st = h.stats + static_cast<int64_t>(w.n) * HW + p;
    mean = st[plane];
    rstd = st[2 * plane];
    m1 = st[3 * plane];
    m2 = st[4 * plane];
    g = logit_grad(st[0], target[w.n], grad_loss[0], h.loss_scale,
                   grad_scores[static_cast<int64_t>(h.slot) * t.N + w.n] * h.inv_hw);
    g_rstd = g * rstd;
  }

  // Rounds are uniform over the block (the __syncthreads below need every thread): a channel
  // past C, or an inactive pixel, contributes 0 and writes nothing.
  const int64_t rounds = (C + G - 1) / G;
  const int R = P < kChunk ? P : kChunk;  // rounds per reduction; rows of P values, R * G rows
  const int T = P / R;                    // threads per row in the reduction (divides 32)
  const int stride = P + 1;
  acc_t* part_row = h.part + static_cast<int64_t>(w.local) * (C + 1);
  for (int64_t r0 = 0; r0 < rounds; r0 += R) {
#pragma unroll
    for (int r = 0; r < kChunk; ++r) {
      if (r < R) {
        const int64_t c = (r0 + r) * G + group;
        acc_t contrib = 0;
        if (active && c < C) {
          const acc_t xhat = (static_cast<acc_t>(f[c * HW]) - mean) * rstd;
          acc_t a, da;
          silu_and_grad(xhat, a, da);
          df[c * HW] = static_cast<scalar_t>(feature_grad(g_rstd, wk[c] * da, xhat, m1, m2));
          contrib = g * a;
        }
        chunk[(r * G + group) * stride + pixel] = contrib;
      }
    }
    __syncthreads();
    // Row = (round r, group) holds the P pixel contributions to one channel: T threads sum it.
    const int row = threadIdx.x / T, seg = threadIdx.x % T;
    acc_t s = 0;
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < R) s += chunk[row * stride + seg + i * T];
    for (int o = T / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    const int64_t c = (r0 + row / G) * G + row % G;
    if (seg == 0 && c < C) part_row[c] = s;
    __syncthreads();  // the buffer is rewritten by the next chunk
  }
  const acc_t db = block_sum<kThreads>(group == 0 ? g : acc_t(0), block_smem);
  if (threadIdx.x == 0) part_row[C] = db;
}

// Sums the partial rows of every head: out_w[c] = sum_r part[r, c] for c < C, out_b = column C.
constexpr int kFinishCols = 32;
constexpr int kFinishRowLanes = 32;

template <typename acc_t>
struct PartTable {
  int count;
  const acc_t* part[kMaxHeads];  // (rows, C + 1)
  acc_t* grad_w[kMaxHeads];      // (C,)
  acc_t* grad_b[kMaxHeads];      // one element of (K,)
  int64_t C[kMaxHeads];
  int rows[kMaxHeads];
  int block_begin[kMaxHeads + 1];
};

static_assert(sizeof(PartTable<double>) <= 4096, "kernel arguments must fit in 4 KB");

template <typename acc_t>
__global__ void __launch_bounds__(kFinishCols * kFinishRowLanes)
finish_backward_kernel(const PartTable<acc_t> t) {
  __shared__ acc_t smem[kFinishRowLanes][kFinishCols + 1];
  const int b = blockIdx.x;
  int k = 0;
  while (k + 1 < t.count && b >= t.block_begin[k + 1]) ++k;
  const int64_t cols = t.C[k] + 1;
  const int x = threadIdx.x % kFinishCols, y = threadIdx.x / kFinishCols;
  const int64_t col = static_cast<int64_t>(b - t.block_begin[k]) * kFinishCols + x;
  const acc_t* part = t.part[k];
  acc_t s = 0;
  if (col < cols) {
#pragma unroll 4
    for (int r = y; r < t.rows[k]; r += kFinishRowLanes) s += part[static_cast<int64_t>(r) * cols + col];
  }
  smem[y][x] = s;
  __syncthreads();
  if (y == 0 && col < cols) {
    acc_t total = 0;
    for (int i = 0; i < kFinishRowLanes; ++i) total += smem[i][x];
    if (col < t.C[k])
      t.grad_w[k][col] = total;
    else
      *t.grad_b[k] = total;
  }
}

// Pixels per block for a head (see the file comment).
int pixels_per_block(int64_t C, int64_t HW) {
  int P = 1;
  while (P < kThreads && P < HW) P *= 2;  // smallest power of two >= HW, at most kThreads
  while (P > kMinPixels && (C + kThreads / P - 1) / (kThreads / P) > kMaxRounds) P /= 2;
  // The backward's shared buffer holds min(P, kChunk) rounds of G rows of P + 1 values.
  TORCH_INTERNAL_ASSERT(std::min(P, kChunk) * (kThreads + kThreads / P) <= kChunkBuffer);
  return P;
}

int64_t rounds_of(int64_t C, int P) { return (C + kThreads / P - 1) / (kThreads / P); }

struct Plan {
  std::vector<int64_t> order;  // heads, longest rounds first
  std::vector<int> P, tiles;   // per head (original index)
  int max_tiles = 1;
};

Plan make_plan(const Prepared& p) {
  Plan plan;
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t C = p.features[k].size(1), HW = p.features[k].size(2) * p.features[k].size(3);
    const int P = pixels_per_block(C, HW);
    plan.P.push_back(P);
    plan.tiles.push_back(static_cast<int>((HW + P - 1) / P));
    plan.max_tiles = std::max(plan.max_tiles, plan.tiles.back());
    plan.order.push_back(k);
  }
  std::stable_sort(plan.order.begin(), plan.order.end(), [&](int64_t a, int64_t b) {
    return rounds_of(p.features[a].size(1), plan.P[a]) > rounds_of(p.features[b].size(1), plan.P[b]);
  });
  return plan;
}

// Fills the table with the heads plan.order[i0 .. i1) and returns the number of blocks.
template <typename scalar_t, typename acc_t>
int fill_table(HeadTable<scalar_t, acc_t>& t, const Prepared& p, const Plan& plan, size_t i0,
               size_t i1, const std::vector<at::Tensor>& stats) {
  t.count = static_cast<int>(i1 - i0);
  t.N = static_cast<int>(p.N);
  int64_t blocks = 0;
  for (size_t i = i0; i < i1; ++i) {
    const int64_t k = plan.order[i];
    const auto& f = p.features[k];
    Head<scalar_t, acc_t>& h = t.head[i - i0];
    h.feat = f.const_data_ptr<scalar_t>();
    h.weight = p.weights[k].const_data_ptr<acc_t>();
    h.stats = const_cast<acc_t*>(stats[k].const_data_ptr<acc_t>());
    h.grad = nullptr;
    h.part = nullptr;
    h.C = f.size(1);
    h.HW = f.size(2) * f.size(3);
    h.P = plan.P[k];
    h.tiles = plan.tiles[k];
    h.block_begin = static_cast<int>(blocks);
    h.slot = static_cast<int>(k);
    h.loss_scale = static_cast<acc_t>(p.loss_scale[k]);
    h.inv_hw = acc_t(1) / static_cast<acc_t>(h.HW);
    blocks += static_cast<int64_t>(h.tiles) * p.N;
  }
  TORCH_CHECK(blocks < (int64_t(1) << 31), "d2g_fast::multiscale_heads: too many blocks (", blocks,
              ") for one launch; use a smaller batch");
  return static_cast<int>(blocks);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> multiscale_heads_cuda(
    at::TensorList features, at::TensorList weights, const at::Tensor& bias, const at::Tensor& target,
    at::ArrayRef<double> head_weights, double eps) {
  const Prepared p = prepare("d2g_fast::multiscale_heads", features, weights, target, head_weights, eps);
  check_bias(bias, p);
  const c10::cuda::CUDAGuard guard(p.features[0].device());
  const auto b = bias.to(p.acc).contiguous();  // read by the kernel: no host copy
  auto stats = alloc_stats(p);
  const Plan plan = make_plan(p);
  const auto opts = p.features[0].options().dtype(p.acc);
  // [loss, logit] partial sums per (head, sample, tile); tiles a head does not have stay zero.
  auto parts = at::zeros({2, p.K, p.N, plan.max_tiles}, opts);
  auto loss = poisoned(at::empty({}, opts));
  auto scores = poisoned(at::empty({p.K, p.N}, opts));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.features[0].scalar_type(),
                                  "multiscale_heads_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* loss_part = parts.mutable_data_ptr<acc_t>();
    acc_t* logit_part = loss_part + p.K * p.N * plan.max_tiles;
    for (size_t i0 = 0; i0 < plan.order.size(); i0 += kMaxHeads) {
      const size_t i1 = std::min(plan.order.size(), i0 + kMaxHeads);
      HeadTable<scalar_t, acc_t> t{};
      const int blocks = fill_table(t, p, plan, i0, i1, stats);
      forward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          t, b.const_data_ptr<acc_t>(), p.target.const_data_ptr<acc_t>(), static_cast<acc_t>(eps),
          plan.max_tiles, loss_part, logit_part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish_forward_kernel<acc_t><<<1, kFinishWarps * kWarp, 0, stream>>>(
        loss_part, logit_part, static_cast<int>(p.K * p.N), plan.max_tiles,
        scores.mutable_data_ptr<acc_t>(), loss.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
  const Plan plan = make_plan(p);
  const auto opts = p.features[0].options().dtype(p.acc);
  std::vector<at::Tensor> grad_features, grad_weights, parts, stats_v(stats.begin(), stats.end());
  for (int64_t k = 0; k < p.K; ++k) {
    const auto& f = p.features[k];
    grad_features.push_back(poisoned(at::empty_like(f)));
    grad_weights.push_back(poisoned(at::empty({f.size(1)}, opts)));
    parts.push_back(poisoned(at::empty({p.N * plan.tiles[k], f.size(1) + 1}, opts)));
  }
  auto grad_bias = poisoned(at::empty({p.K}, opts));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.features[0].scalar_type(),
                                  "multiscale_heads_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (size_t i0 = 0; i0 < plan.order.size(); i0 += kMaxHeads) {
      const size_t i1 = std::min(plan.order.size(), i0 + kMaxHeads);
      HeadTable<scalar_t, acc_t> t{};
      const int blocks = fill_table(t, p, plan, i0, i1, stats_v);
      PartTable<acc_t> pt{};
      pt.count = t.count;
      int finish_blocks = 0;
      for (size_t i = i0; i < i1; ++i) {
        const int64_t k = plan.order[i];
        const int j = static_cast<int>(i - i0);
        t.head[j].grad = grad_features[k].mutable_data_ptr<scalar_t>();
        t.head[j].part = parts[k].mutable_data_ptr<acc_t>();
        pt.part[j] = parts[k].const_data_ptr<acc_t>();
        pt.grad_w[j] = grad_weights[k].mutable_data_ptr<acc_t>();
        pt.grad_b[j] = grad_bias.mutable_data_ptr<acc_t>() + k;
        pt.C[j] = t.head[j].C;
        pt.rows[j] = static_cast<int>(parts[k].size(0));
        pt.block_begin[j] = finish_blocks;
        finish_blocks += static_cast<int>((t.head[j].C + 1 + kFinishCols - 1) / kFinishCols);
      }
      pt.block_begin[pt.count] = finish_blocks;
      backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          t, p.target.const_data_ptr<acc_t>(), gl.const_data_ptr<acc_t>(), gs.const_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finish_backward_kernel<acc_t><<<finish_blocks, kFinishCols * kFinishRowLanes, 0, stream>>>(pt);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  for (int64_t k = 0; k < p.K; ++k)
    if (weights[k].scalar_type() != p.acc) grad_weights[k] = grad_weights[k].to(weights[k].scalar_type());
  return {grad_features, grad_weights, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CUDA, m) {
  m.impl("multiscale_heads", &multiscale_heads_cuda);
  m.impl("multiscale_heads_backward", &multiscale_heads_backward_cuda);
}

}  // namespace multiscale_heads
}  // namespace d2g
