#include "multiscale_heads/multiscale_heads.h"

#include <string>

#include "common/checks.h"
#include "multiscale_heads/multiscale_heads_math.h"

namespace d2g {
namespace multiscale_heads {

namespace {
std::string item(const char* list, int64_t k) { return std::string(list) + "[" + std::to_string(k) + "]"; }
}  // namespace

Prepared prepare(const char* op, at::TensorList features, at::TensorList weights,
                 const at::Tensor& target, at::ArrayRef<double> head_weights, double eps) {
  (void)eps;  // a numerical choice, not a memory one: checked in Python
  const int64_t K = static_cast<int64_t>(features.size());
  D2G_CHECK_ARG(K > 0 && features[0].defined() && at::isFloatingType(features[0].scalar_type()),
                op, "features");
  D2G_CHECK_ARG(static_cast<int64_t>(weights.size()) == K, op, "weights");
  D2G_CHECK_ARG(static_cast<int64_t>(head_weights.size()) == K, op, "head_weights");
  const auto device = features[0].device();
  D2G_CHECK_ARG(target.defined() && at::isFloatingType(target.scalar_type()) && target.dim() == 1 &&
                    target.size(0) > 0 && target.device() == device, op, "target");
  Prepared p;
  p.K = K;
  p.N = target.size(0);
  const auto dtype = features[0].scalar_type();
  p.acc = accumulation_type(dtype);
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& f = features[k];
    const at::Tensor& w = weights[k];
    D2G_CHECK_ARG(f.defined() && f.scalar_type() == dtype && f.dim() == 4 && f.size(0) == p.N &&
                      f.numel() > 0 && f.device() == device, op, item("features", k));
    // Not memory but exactness: exp_normalised has no range clamp (multiscale_heads_math.h).
    D2G_CHECK_ARG(f.size(1) <= kMaxChannelsCpu, op, item("features", k));
    D2G_CHECK_ARG(w.defined() && at::isFloatingType(w.scalar_type()) && w.dim() == 1 &&
                      w.size(0) == f.size(1) && w.device() == device, op, item("weights", k));
    p.features.push_back(f.contiguous());
    p.weights.push_back(w.to(p.acc).contiguous());
  }
  p.target = target.to(p.acc).contiguous();
  p.loss_scale.resize(K);
  for (int64_t k = 0; k < K; ++k)
    p.loss_scale[k] = head_weights[k] / double(p.N * features[k].size(2) * features[k].size(3));
  return p;
}

void check_bias(const at::Tensor& bias, const Prepared& p) {
  static constexpr const char* op = "d2g_fast::multiscale_heads";
  D2G_CHECK_ARG(bias.defined() && at::isFloatingType(bias.scalar_type()) && bias.dim() == 1 &&
                    bias.size(0) == p.K && bias.device() == p.features[0].device(), op, "bias");
}

void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& grad_scores,
                         at::TensorList stats, const Prepared& p) {
  static constexpr const char* op = "d2g_fast::multiscale_heads_backward";
  const auto device = p.features[0].device();
  D2G_CHECK_ARG(grad_loss.defined() && at::isFloatingType(grad_loss.scalar_type()) &&
                    grad_loss.numel() == 1 && grad_loss.device() == device, op, "grad_loss");
  D2G_CHECK_ARG(grad_scores.defined() && at::isFloatingType(grad_scores.scalar_type()) &&
                    grad_scores.sizes() == at::IntArrayRef({p.K, p.N}) && grad_scores.device() == device,
                op, "grad_scores");
  D2G_CHECK_ARG(static_cast<int64_t>(stats.size()) == p.K, op, "stats");
  for (int64_t k = 0; k < p.K; ++k) {
    const auto& f = p.features[k];
    const auto& s = stats[k];
    D2G_CHECK_ARG(s.defined() && s.sizes() == at::IntArrayRef({kStatRows, p.N, f.size(2), f.size(3)}) &&
                      s.is_contiguous() && s.scalar_type() == p.acc && s.device() == device,
                  op, item("stats", k));
  }
}

std::vector<at::Tensor> alloc_stats(const Prepared& p) {
  std::vector<at::Tensor> stats;
  for (const auto& f : p.features)
    stats.push_back(poisoned(at::empty({kStatRows, p.N, f.size(2), f.size(3)}, f.options().dtype(p.acc))));
  return stats;
}

}  // namespace multiscale_heads
}  // namespace d2g
