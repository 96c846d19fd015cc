#include "lpips_distance/lpips_distance.h"

#include "common/checks.h"

namespace d2g {
namespace lpips {

static constexpr const char* kOp = "d2g_fast::lpips_distance";

at::ScalarType check_forward_args(const at::Tensor& f0, const at::Tensor& f1,
                                  const at::Tensor& weight) {
  check_floating(f0, kOp, "f0");
  check_floating(f1, kOp, "f1");
  check_floating(weight, kOp, "weight");
  check_dim(f0, 4, kOp, "f0", "(N, C, H, W)");
  TORCH_CHECK(f0.sizes() == f1.sizes(), kOp, ": 'f0' and 'f1' must have the same shape, got ",
              f0.sizes(), " and ", f1.sizes());
  TORCH_CHECK(f0.scalar_type() == f1.scalar_type(), kOp,
              ": 'f0' and 'f1' must have the same dtype, got ", f0.scalar_type(), " and ",
              f1.scalar_type());
  check_same_device(f0, f1, kOp, "f0", "f1");
  check_same_device(f0, weight, kOp, "f0", "weight");
  TORCH_CHECK(f0.size(0) > 0, kOp, ": 'f0' has an empty batch (N = 0)");
  TORCH_CHECK(f0.size(1) > 0 && f0.size(2) > 0 && f0.size(3) > 0, kOp,
              ": 'f0' must have C, H, W > 0, got shape ", f0.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == f0.size(1), kOp,
              ": 'weight' must have shape (C,) = (", f0.size(1), ",), got ", weight.sizes());
  return f0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_backward_args(const at::Tensor& grad, const at::Tensor& f0, const at::Tensor& f1,
                         const at::Tensor& weight, const at::Tensor& stats, bool spatial) {
  static constexpr const char* op = "d2g_fast::lpips_distance_backward";
  const auto acc = check_forward_args(f0, f1, weight);
  check_floating(grad, op, "grad");
  const int64_t N = f0.size(0), H = f0.size(2), W = f0.size(3);
  if (spatial) {
    TORCH_CHECK(grad.dim() == 4 && grad.size(0) == N && grad.size(1) == 1 && grad.size(2) == H &&
                    grad.size(3) == W,
                op, ": 'grad' must have shape (N, 1, H, W) with spatial=True, got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.dim() == 1 && grad.size(0) == N, op,
                ": 'grad' must have shape (N,) with spatial=False, got ", grad.sizes());
  }
  TORCH_CHECK(stats.dim() == 4 && stats.size(0) == 5 && stats.size(1) == N && stats.size(2) == H &&
                  stats.size(3) == W && stats.is_contiguous(),
              op, ": 'stats' must be the contiguous (5, N, H, W) tensor returned by the forward, got ",
              stats.sizes());
  TORCH_CHECK(stats.scalar_type() == acc, op, ": 'stats' must have dtype ", acc, ", got ",
              stats.scalar_type());
  check_same_device(f0, grad, op, "f0", "grad");
  check_same_device(f0, stats, op, "f0", "stats");
}

std::tuple<at::Tensor, at::Tensor> alloc_forward_outputs(const at::Tensor& f0, at::ScalarType acc) {
  const int64_t N = f0.size(0), H = f0.size(2), W = f0.size(3);
  auto opts = f0.options().dtype(acc);
  return {poisoned(at::empty({N, 1, H, W}, opts)), poisoned(at::empty({5, N, H, W}, opts))};
}

at::Tensor finish_distance(const at::Tensor& map, bool spatial) {
  // A deterministic mean (no atomics): the map is C times smaller than the features.
  return spatial ? map : map.flatten(1).mean(1);
}

at::Tensor alloc_grad(const at::Tensor& like, bool needed) {
  if (!needed) return at::empty({0}, like.options());
  return poisoned(at::empty_like(like, at::MemoryFormat::Preserve));
}

at::Tensor pixel_gradient(const at::Tensor& grad, at::ScalarType acc, int64_t N, int64_t H, int64_t W,
                          bool spatial) {
  const auto g = grad.to(acc);
  return (spatial ? g.reshape({N, H, W}) : (g / double(H * W)).view({N, 1, 1}).expand({N, H, W})).contiguous();
}

}  // namespace lpips
}  // namespace d2g
