#include "lpips_distance/lpips_distance.h"

#include <vector>

#include "common/checks.h"
#include "lpips_distance/lpips_distance_math.h"

namespace d2g {
namespace lpips {

static constexpr const char* kOp = "d2g_fast::lpips_distance";

at::ScalarType check_forward_args(const at::Tensor& f0, const at::Tensor& f1,
                                  const at::Tensor& weight) {
  D2G_CHECK_ARG(f0.defined() && at::isFloatingType(f0.scalar_type()), kOp, "f0");
  D2G_CHECK_ARG(f1.defined() && f1.scalar_type() == f0.scalar_type(), kOp, "f1");
  D2G_CHECK_ARG(weight.defined() && at::isFloatingType(weight.scalar_type()), kOp, "weight");
  D2G_CHECK_ARG(f0.dim() == 4 && f0.numel() > 0, kOp, "f0");
  D2G_CHECK_ARG(f1.sizes() == f0.sizes() && f1.device() == f0.device(), kOp, "f1");
  D2G_CHECK_ARG(weight.dim() == 1 && weight.size(0) == f0.size(1) && weight.device() == f0.device(),
                kOp, "weight");
  return accumulation_type(f0.scalar_type());
}

void check_backward_args(const at::Tensor& grad, const at::Tensor& f0, const at::Tensor& f1,
                         const at::Tensor& weight, const at::Tensor& stats, bool spatial) {
  static constexpr const char* op = "d2g_fast::lpips_distance_backward";
  const auto acc = check_forward_args(f0, f1, weight);
  const int64_t N = f0.size(0), H = f0.size(2), W = f0.size(3);
  const auto grad_shape = spatial ? std::vector<int64_t>{N, 1, H, W} : std::vector<int64_t>{N};
  D2G_CHECK_ARG(grad.defined() && at::isFloatingType(grad.scalar_type()) &&
                    grad.sizes() == at::IntArrayRef(grad_shape) && grad.device() == f0.device(),
                op, "grad");
  D2G_CHECK_ARG(stats.defined() && stats.sizes() == at::IntArrayRef({kStatRows, N, H, W}) &&
                    stats.is_contiguous() && stats.scalar_type() == acc && stats.device() == f0.device(),
                op, "stats");
}

std::tuple<at::Tensor, at::Tensor> alloc_forward_outputs(const at::Tensor& f0, at::ScalarType acc) {
  const int64_t N = f0.size(0), H = f0.size(2), W = f0.size(3);
  auto opts = f0.options().dtype(acc);
  return {poisoned(at::empty({N, 1, H, W}, opts)), poisoned(at::empty({kStatRows, N, H, W}, opts))};
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
