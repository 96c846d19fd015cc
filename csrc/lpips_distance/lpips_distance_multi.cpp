#include "lpips_distance/lpips_distance_multi.h"

#include <string>

#include "common/checks.h"
#include "lpips_distance/lpips_distance_math.h"

namespace d2g {
namespace lpips {

namespace {
std::string item(const char* list, int64_t k) { return std::string(list) + "[" + std::to_string(k) + "]"; }
}  // namespace

MultiArgs prepare_multi(const char* op, at::TensorList f0, at::TensorList f1, at::TensorList weights) {
  const int64_t L = static_cast<int64_t>(f0.size());
  D2G_CHECK_ARG(L > 0 && static_cast<int64_t>(f1.size()) == L, op, "f1");
  D2G_CHECK_ARG(static_cast<int64_t>(weights.size()) == L, op, "weights");
  D2G_CHECK_ARG(f0[0].defined() && at::isFloatingType(f0[0].scalar_type()) && f0[0].dim() == 4 &&
                    f0[0].numel() > 0, op, "f0[0]");
  MultiArgs m;
  m.L = L;
  m.dtype = f0[0].scalar_type();
  m.acc = accumulation_type(m.dtype);
  m.N = f0[0].size(0);
  const auto device = f0[0].device();
  m.pixel_begin.push_back(0);
  for (int64_t k = 0; k < L; ++k) {
    const at::Tensor &a = f0[k], &b = f1[k], &w = weights[k];
    D2G_CHECK_ARG(a.defined() && a.scalar_type() == m.dtype && a.dim() == 4 && a.size(0) == m.N &&
                      a.numel() > 0 && a.device() == device, op, item("f0", k));
    D2G_CHECK_ARG(b.defined() && b.scalar_type() == m.dtype && b.sizes() == a.sizes() &&
                      b.device() == device, op, item("f1", k));
    D2G_CHECK_ARG(w.defined() && at::isFloatingType(w.scalar_type()) && w.dim() == 1 &&
                      w.size(0) == a.size(1) && w.device() == device, op, item("weights", k));
    m.f0.push_back(a);
    m.f1.push_back(b);
    m.w.push_back(w.to(m.acc).contiguous());
    m.pixel_begin.push_back(m.pixel_begin.back() + m.N * a.size(2) * a.size(3));
  }
  return m;
}

void check_multi_backward(const char* op, const at::Tensor& grad, const at::Tensor& stats,
                          const MultiArgs& m) {
  const auto device = m.f0[0].device();
  D2G_CHECK_ARG(grad.defined() && at::isFloatingType(grad.scalar_type()) &&
                    grad.sizes() == at::IntArrayRef({m.L, m.N}) && grad.device() == device, op, "grad");
  D2G_CHECK_ARG(stats.defined() && stats.sizes() == at::IntArrayRef({kStatRows, m.pixels()}) &&
                    stats.is_contiguous() && stats.scalar_type() == m.acc && stats.device() == device,
                op, "stats");
}

at::Tensor alloc_multi_stats(const MultiArgs& m) {
  return poisoned(at::empty({kStatRows, m.pixels()}, m.f0[0].options().dtype(m.acc)));
}

std::vector<at::Tensor> alloc_multi_grads(const std::vector<at::Tensor>& like, bool needed) {
  std::vector<at::Tensor> out;
  for (const auto& t : like)
    out.push_back(needed ? poisoned(at::empty_like(t, at::MemoryFormat::Preserve)) : at::empty({0}, t.options()));
  return out;
}

}  // namespace lpips
}  // namespace d2g
