#include "paired_augment/paired_augment.h"

#include <cmath>

#include "common/checks.h"
#include "paired_augment/paired_augment_math.h"

namespace d2g {
namespace augment {

void check_args(const char* op, const char* name_x, const at::Tensor& x, const char* name_y,
                const std::optional<at::Tensor>& y, const at::Tensor& params, int64_t flags) {
  check_floating(x, op, name_x);
  check_dim(x, 4, op, name_x, "(N, C, H, W)");
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op, ": '", name_x,
              "' must have N, C, H, W > 0, got shape ", x.sizes());
  TORCH_CHECK(x.size(2) < (1 << 20) && x.size(3) < (1 << 20), op, ": '", name_x,
              "' is too large (H, W must be < 2^20), got shape ", x.sizes());
  if (y.has_value()) {
    const at::Tensor& t = *y;
    check_floating(t, op, name_y);
    TORCH_CHECK(t.sizes() == x.sizes(), op, ": '", name_x, "' and '", name_y,
                "' must have the same shape, got ", x.sizes(), " and ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": '", name_x, "' and '", name_y,
                "' must have the same dtype, got ", x.scalar_type(), " and ", t.scalar_type());
    check_same_device(x, t, op, name_x, name_y);
  }
  TORCH_CHECK(params.defined() && params.scalar_type() == at::kDouble && params.dim() == 2 &&
                  params.size(0) == x.size(0) && params.size(1) == kParams && params.is_contiguous(),
              op, ": 'params' must be a contiguous float64 tensor of shape (N, ", kParams,
              ") = (", x.size(0), ", ", kParams, ") (AugmentParams.packed), got ",
              params.scalar_type(), " ", params.sizes());
  check_same_device(x, params, op, name_x, "params");
  if (params.device().is_cpu()) {
    const int64_t H = x.size(2), W = x.size(3);
    const double* P = params.data_ptr<double>();
    for (int64_t n = 0; n < params.size(0); ++n)
      for (int i = 0; i < 4; ++i) {
        const double m = P[n * kParams + kMarginCol + i];
        const int64_t limit = (i % 2 == 0 ? W : H) - 1;
        TORCH_CHECK(m >= 0 && m <= limit && m == std::floor(m), op, ": 'params'[", n, ", ",
                    kMarginCol + i, "] (margin ", "xyxy"[i], i < 2 ? "0" : "1",
                    ") must be a whole number in [0, ", limit,
                    "] (a reflection pads at most size - 1), got ", m);
      }
  }
  TORCH_CHECK(flags >= 0 && flags <= 15, op,
              ": 'flags' must be a bit mask of 1 (geometry), 2 (colour), 4 (cutout), 8 (linear "
              "part only), got ", flags);
}

void check_sample_args(const char* op, const at::Tensor& out, int64_t C, int64_t H, int64_t W,
                       int64_t preset_flags, double p, const std::optional<int64_t>& seed) {
  TORCH_CHECK(out.defined() && out.scalar_type() == at::kDouble && out.dim() == 2 &&
                  out.size(0) > 0 && out.size(1) == kParams && out.is_contiguous(),
              op, ": 'out' must be a contiguous float64 tensor of shape (N, ", kParams,
              ") with N > 0, got ", out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(out.size(0) < (int64_t{1} << 31), op, ": 'out' has too many rows (", out.size(0), ")");
  TORCH_CHECK(C > 0 && C < (1 << 20), op, ": 'C' must be in [1, 2^20), got ", C);
  TORCH_CHECK(H > 0 && H < (1 << 20), op, ": 'H' must be in [1, 2^20), got ", H);
  TORCH_CHECK(W > 0 && W < (1 << 20), op, ": 'W' must be in [1, 2^20), got ", W);
  TORCH_CHECK(preset_flags > 0 && preset_flags <= 15, op,
              ": 'preset_flags' must be a non-empty bit mask of 1 (b), 2 (g), 4 (c), 8 (o), got ",
              preset_flags);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": 'p' must be in [0, 1], got ", p);
  TORCH_CHECK(!seed.has_value() || *seed >= 0, op, ": 'seed' must be >= 0, got ",
              seed.has_value() ? *seed : 0);
}

at::Tensor alloc_like(const at::Tensor& t) {
  return poisoned(at::empty(t.sizes(), t.options().memory_format(t.suggest_memory_format())));
}

at::Tensor empty_output(const at::Tensor& t) { return at::empty({0}, t.options()); }

std::array<double, 12> normalized_filter() {
  // Symlet-6 scaling filter (PyWavelets sym6 reconstruction low-pass), 12 taps.
  static const double sym6[12] = {
      0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
      0.4910559419267466,   0.787641141030194,     0.3379294217276218,   -0.07263752278646252,
      -0.021060292512300564, 0.04472490177066578,  0.0017677118642428036, -0.007800708325034148};
  double sum = 0;
  for (double v : sym6) sum += v;
  std::array<double, 12> f{};
  for (int i = 0; i < 12; ++i) f[i] = sym6[i] / sum;
  return f;
}

}  // namespace augment
}  // namespace d2g
