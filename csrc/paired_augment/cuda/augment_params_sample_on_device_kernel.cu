// CUDA kernel of augment_params_sample_on_device_: ONE launch of one block. Its threads loop over the
// samples drawing each row (augment_params_sample_on_device.h), block-reduce the corner extents into the
// batch-wide margins, then finish the rows that depend on them. No host synchronisation.
// Random numbers: the Philox state of the (given or default) CUDA generator, reserved under its
// mutex with philox_cuda_state and unpacked in the kernel (as torch's dropout does), so the op
// can be captured in a CUDA graph and every replay draws new parameters. `seed` replaces the
// generator (seed, offset 0): the same numbers as the CPU kernel with that seed.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>

#include "paired_augment/augment_params_sample_on_device.h"
#include "paired_augment/paired_augment.h"

namespace d2g {
namespace augment {
namespace {

constexpr int kSampleThreads = 256;

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(double* __restrict__ rows, int N, int C, int H, int W, int preset, double p,
                  at::PhiloxCudaState state, bool use_seed, uint64_t seed) {
  __shared__ double red[4][kSampleThreads / 32];
  __shared__ double margins[4];
  uint64_t key = seed, offset = 0;
  if (!use_seed) {
    const auto unpacked = at::cuda::philox::unpack(state);
    key = std::get<0>(unpacked);
    offset = std::get<1>(unpacked) / 4;  // reserved in 32-bit numbers, the engine counts 128-bit blocks
  }
  const int tid = threadIdx.x;
  double local[4] = {-1e300, -1e300, -1e300, -1e300};
  for (int n = tid; n < N; n += kSampleThreads) {
    Draws r(key, static_cast<uint64_t>(n), offset);
    double extent[4];
    draw_sample(r, C, H, W, preset, p, rows + static_cast<int64_t>(n) * kParams, extent);
#pragma unroll
    for (int i = 0; i < 4; ++i) local[i] = fmax(local[i], extent[i]);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    double v = local[i];
    for (int off = 16; off > 0; off /= 2) v = fmax(v, __shfl_down_sync(0xffffffffu, v, off));
    if (tid % 32 == 0) red[i][tid / 32] = v;
  }
  __syncthreads();
  if (tid == 0) {
    double extent[4];
    for (int i = 0; i < 4; ++i) {
      extent[i] = red[i][0];
      for (int w = 1; w < kSampleThreads / 32; ++w) extent[i] = fmax(extent[i], red[i][w]);
    }
    double m[4];
    margins_from_extent(extent, H, W, preset, m);
    for (int i = 0; i < 4; ++i) margins[i] = m[i];
  }
  __syncthreads();
  const double m[4] = {margins[0], margins[1], margins[2], margins[3]};
  for (int n = tid; n < N; n += kSampleThreads) finish_row(rows + static_cast<int64_t>(n) * kParams, m, H, W, preset);
}

void sample_cuda(at::Tensor out, int64_t C, int64_t H, int64_t W, int64_t preset_flags, double p,
                 std::optional<at::Generator> generator, std::optional<int64_t> seed) {
  const char* op = "d2g_fast::augment_params_sample_on_device_";
  check_sample_args(op, out, C, H, W, preset_flags, p, seed);
  c10::cuda::CUDAGuard guard(out.device());
  at::PhiloxCudaState state;
  if (!seed.has_value()) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(out.device().index()));
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state(4 * kBlocksPerSample);
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  sample_kernel<<<1, kSampleThreads, 0, stream>>>(
      out.data_ptr<double>(), static_cast<int>(out.size(0)), static_cast<int>(C), static_cast<int>(H),
      static_cast<int>(W), static_cast<int>(preset_flags), p, state, seed.has_value(),
      seed.has_value() ? static_cast<uint64_t>(*seed) : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CUDA, m) { m.impl("augment_params_sample_on_device_", &sample_cuda); }

}  // namespace augment
}  // namespace d2g
