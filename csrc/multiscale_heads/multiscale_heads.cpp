#include "multiscale_heads/multiscale_heads.h"

#include "common/checks.h"
#include "multiscale_heads/multiscale_heads_math.h"

namespace d2g {
namespace multiscale_heads {

Prepared prepare(const char* op, at::TensorList features, at::TensorList weights,
                 const at::Tensor& target, at::ArrayRef<double> head_weights, double eps) {
  const int64_t K = static_cast<int64_t>(features.size());
  TORCH_CHECK(K > 0, op, ": 'features' must hold at least one tensor");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == K, op, ": 'weights' must hold one tensor per "
              "feature map (", K, "), got ", weights.size());
  TORCH_CHECK(static_cast<int64_t>(head_weights.size()) == K, op, ": 'head_weights' must hold one "
              "number per feature map (", K, "), got ", head_weights.size());
  TORCH_CHECK(eps > 0, op, ": 'eps' must be positive, got ", eps);
  check_floating(target, op, "target");
  TORCH_CHECK(target.dim() == 1, op, ": 'target' must have shape (N,), got ", target.sizes());
  Prepared p;
  p.K = K;
  p.N = target.size(0);
  TORCH_CHECK(p.N > 0, op, ": 'target' has an empty batch (N = 0)");
  const auto dtype = features[0].defined() ? features[0].scalar_type() : at::kFloat;
  p.acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& f = features[k];
    const at::Tensor& w = weights[k];
    check_floating(f, op, "features[k]");
    check_floating(w, op, "weights[k]");
    TORCH_CHECK(f.dim() == 4, op, ": 'features[", k, "]' must have shape (N, C, H, W), got ", f.sizes());
    TORCH_CHECK(f.scalar_type() == dtype, op, ": every 'features' tensor must have the dtype of "
                "'features[0]' (", dtype, "), 'features[", k, "]' has ", f.scalar_type());
    TORCH_CHECK(f.size(0) == p.N, op, ": 'features[", k, "]' has batch ", f.size(0),
                " but 'target' has ", p.N);
    TORCH_CHECK(f.size(1) > 0 && f.size(2) > 0 && f.size(3) > 0, op, ": 'features[", k,
                "]' must have C, H, W > 0, got ", f.sizes());
    TORCH_CHECK(f.size(1) <= kMaxChannelsCpu, op, ": 'features[", k, "]' has ", f.size(1),
                " channels; the kernels support at most ", kMaxChannelsCpu,
                " (their SiLU exp is exact only for |LayerNorm output| < 84); use impl='ref'");
    TORCH_CHECK(w.dim() == 1 && w.size(0) == f.size(1), op, ": 'weights[", k,
                "]' must have shape (C,) = (", f.size(1), ",), got ", w.sizes());
    check_same_device(features[0], f, op, "features[0]", "features[k]");
    check_same_device(features[0], w, op, "features[0]", "weights[k]");
    p.features.push_back(f.contiguous());
    p.weights.push_back(w.to(p.acc).contiguous());
  }
  check_same_device(features[0], target, op, "features[0]", "target");
  p.target = target.to(p.acc).contiguous();
  p.loss_scale.resize(K);
  for (int64_t k = 0; k < K; ++k)
    p.loss_scale[k] = head_weights[k] / double(p.N * features[k].size(2) * features[k].size(3));
  return p;
}

void check_bias(const at::Tensor& bias, const Prepared& p) {
  static constexpr const char* op = "d2g_fast::multiscale_heads";
  check_floating(bias, op, "bias");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == p.K, op, ": 'bias' must have shape (K,) = (", p.K,
              ",), got ", bias.sizes());
  check_same_device(p.features[0], bias, op, "features[0]", "bias");
}

void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& grad_scores,
                         at::TensorList stats, const Prepared& p) {
  static constexpr const char* op = "d2g_fast::multiscale_heads_backward";
  check_floating(grad_loss, op, "grad_loss");
  check_floating(grad_scores, op, "grad_scores");
  TORCH_CHECK(grad_loss.numel() == 1, op, ": 'grad_loss' must be a scalar, got ", grad_loss.sizes());
  TORCH_CHECK(grad_scores.dim() == 2 && grad_scores.size(0) == p.K && grad_scores.size(1) == p.N,
              op, ": 'grad_scores' must have shape (K, N) = (", p.K, ", ", p.N, "), got ",
              grad_scores.sizes());
  TORCH_CHECK(static_cast<int64_t>(stats.size()) == p.K, op, ": 'stats' must hold one tensor per "
              "head (", p.K, "), got ", stats.size());
  for (int64_t k = 0; k < p.K; ++k) {
    const auto& f = p.features[k];
    const auto& s = stats[k];
    TORCH_CHECK(s.defined() && s.dim() == 4 && s.size(0) == kStatRows && s.size(1) == p.N &&
                    s.size(2) == f.size(2) && s.size(3) == f.size(3) && s.is_contiguous() &&
                    s.scalar_type() == p.acc,
                op, ": 'stats[", k, "]' must be the contiguous (", kStatRows, ", N, H, W) ", p.acc,
                " tensor returned by the forward, got ", s.sizes(), " ", s.scalar_type());
    check_same_device(f, s, op, "features[k]", "stats[k]");
  }
  check_same_device(p.features[0], grad_loss, op, "features[0]", "grad_loss");
  check_same_device(p.features[0], grad_scores, op, "features[0]", "grad_scores");
}

std::vector<at::Tensor> alloc_stats(const Prepared& p) {
  std::vector<at::Tensor> stats;
  for (const auto& f : p.features)
    stats.push_back(poisoned(at::empty({kStatRows, p.N, f.size(2), f.size(3)}, f.options().dtype(p.acc))));
  return stats;
}

}  // namespace multiscale_heads
}  // namespace d2g
