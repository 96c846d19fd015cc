#include "lpips_distance/lpips_distance_multi.h"

#include <string>

#include "common/checks.h"

namespace d2g {
namespace lpips {

namespace {
std::string item(const char* list, int64_t k) { return std::string(list) + "[" + std::to_string(k) + "]"; }
}  // namespace

MultiArgs prepare_multi(const char* op, at::TensorList f0, at::TensorList f1, at::TensorList weights) {
  const int64_t L = static_cast<int64_t>(f0.size());
  TORCH_CHECK(L > 0, op, ": 'f0' must hold at least one tensor");
  TORCH_CHECK(static_cast<int64_t>(f1.size()) == L, op, ": 'f1' must hold one tensor per layer of 'f0' (",
              L, "), got ", f1.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L, op,
              ": 'weights' must hold one tensor per layer of 'f0' (", L, "), got ", weights.size());
  MultiArgs m;
  m.L = L;
  check_floating(f0[0], op, "f0[0]");
  m.dtype = f0[0].scalar_type();
  m.acc = m.dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(f0[0].dim() == 4, op, ": 'f0[0]' must have shape (N, C, H, W), got ", f0[0].sizes());
  m.N = f0[0].size(0);
  TORCH_CHECK(m.N > 0, op, ": 'f0[0]' has an empty batch (N = 0)");
  m.pixel_begin.push_back(0);
  for (int64_t k = 0; k < L; ++k) {
    const std::string n0 = item("f0", k), n1 = item("f1", k), nw = item("weights", k);
    const at::Tensor &a = f0[k], &b = f1[k], &w = weights[k];
    check_floating(a, op, n0.c_str());
    check_floating(b, op, n1.c_str());
    check_floating(w, op, nw.c_str());
    check_dim(a, 4, op, n0.c_str(), "(N, C, H, W)");
    TORCH_CHECK(a.sizes() == b.sizes(), op, ": '", n0, "' and '", n1, "' must have the same shape, got ",
                a.sizes(), " and ", b.sizes());
    TORCH_CHECK(a.scalar_type() == m.dtype && b.scalar_type() == m.dtype, op,
                ": every feature map must have the dtype of 'f0[0]' (", m.dtype, "), '", n0, "' has ",
                a.scalar_type(), " and '", n1, "' has ", b.scalar_type());
    TORCH_CHECK(a.size(0) == m.N, op, ": '", n0, "' has batch ", a.size(0), " but 'f0[0]' has ", m.N);
    TORCH_CHECK(a.size(1) > 0 && a.size(2) > 0 && a.size(3) > 0, op, ": '", n0,
                "' must have C, H, W > 0, got shape ", a.sizes());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == a.size(1), op, ": '", nw, "' must have shape (C,) = (",
                a.size(1), ",), got ", w.sizes());
    check_same_device(f0[0], a, op, "f0[0]", n0.c_str());
    check_same_device(f0[0], b, op, "f0[0]", n1.c_str());
    check_same_device(f0[0], w, op, "f0[0]", nw.c_str());
    m.f0.push_back(a);
    m.f1.push_back(b);
    m.w.push_back(w.to(m.acc).contiguous());
    m.pixel_begin.push_back(m.pixel_begin.back() + m.N * a.size(2) * a.size(3));
  }
  return m;
}

void check_multi_backward(const char* op, const at::Tensor& grad, const at::Tensor& stats,
                          const MultiArgs& m) {
  check_floating(grad, op, "grad");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == m.L && grad.size(1) == m.N, op,
              ": 'grad' must have shape (L, N) = (", m.L, ", ", m.N, "), got ", grad.sizes());
  TORCH_CHECK(stats.defined() && stats.dim() == 2 && stats.size(0) == kMultiStatRows &&
                  stats.size(1) == m.pixels() && stats.is_contiguous(),
              op, ": 'stats' must be the contiguous (", kMultiStatRows, ", ", m.pixels(),
              ") tensor returned by the forward, got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == m.acc, op, ": 'stats' must have dtype ", m.acc, ", got ",
              stats.scalar_type());
  check_same_device(m.f0[0], grad, op, "f0[0]", "grad");
  check_same_device(m.f0[0], stats, op, "f0[0]", "stats");
}

at::Tensor alloc_multi_stats(const MultiArgs& m) {
  return poisoned(at::empty({kMultiStatRows, m.pixels()}, m.f0[0].options().dtype(m.acc)));
}

std::vector<at::Tensor> alloc_multi_grads(const std::vector<at::Tensor>& like, bool needed) {
  std::vector<at::Tensor> out;
  for (const auto& t : like)
    out.push_back(needed ? poisoned(at::empty_like(t, at::MemoryFormat::Preserve)) : at::empty({0}, t.options()));
  return out;
}

}  // namespace lpips
}  // namespace d2g
