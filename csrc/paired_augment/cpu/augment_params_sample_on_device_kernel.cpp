// CPU kernel of augment_params_sample_on_device_: draws the packed augmentation parameters of every
// sample (augment_params_sample_on_device.h), then the batch-wide margins and the rows that depend on them.
// Seed: `seed` when given, else one random64() of the (given or default) CPU generator, so
// successive calls differ and torch.manual_seed reproduces them. Counter offset 0.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "paired_augment/augment_params_sample_on_device.h"
#include "paired_augment/paired_augment.h"

namespace d2g {
namespace augment {
namespace {

void sample_cpu(at::Tensor out, int64_t C, int64_t H, int64_t W, int64_t preset_flags, double p,
                std::optional<at::Generator> generator, std::optional<int64_t> seed) {
  const char* op = "d2g_fast::augment_params_sample_on_device_";
  check_sample_args(op, out, C, H, W, preset_flags, p, seed);
  TORCH_CHECK(out.device().is_cpu(), op, ": 'out' must be a CPU tensor here, got ", out.device());
  uint64_t key = 0;
  if (seed.has_value()) {
    key = static_cast<uint64_t>(*seed);
  } else {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    key = gen->random64();
  }
  const int64_t N = out.size(0);
  const int c = static_cast<int>(C), h = static_cast<int>(H), w = static_cast<int>(W);
  const int preset = static_cast<int>(preset_flags);
  double* rows = out.data_ptr<double>();
  std::vector<double> extent(4 * N);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      Draws r(key, static_cast<uint64_t>(n), 0);
      draw_sample(r, c, h, w, preset, p, rows + n * kParams, extent.data() + 4 * n);
    }
  });
  double batch_extent[4] = {-1e300, -1e300, -1e300, -1e300};
  for (int64_t n = 0; n < N; ++n)
    for (int i = 0; i < 4; ++i) batch_extent[i] = std::max(batch_extent[i], extent[4 * n + i]);
  double m[4];
  margins_from_extent(batch_extent, h, w, preset, m);
  for (int64_t n = 0; n < N; ++n) finish_row(rows + n * kParams, m, h, w, preset);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CPU, m) { m.impl("augment_params_sample_on_device_", &sample_cpu); }

}  // namespace augment
}  // namespace d2g
