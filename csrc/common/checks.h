#pragma once
#include <ATen/ATen.h>

// Argument checks at the C++ boundary.
//
// Each op's arguments are validated once, with explanations, in Python (d2g_fast/ops/*.py: the
// public op and the fake kernel, which every backend and the tracer pass through). The C++
// entry points, callable directly as torch.ops.d2g_fast.*, keep only the checks that memory
// safety needs (dtypes the kernels dispatch on, shapes they index, one device), written with
// D2G_CHECK_ARG: the message names the argument and quotes the violated condition, so no rule
// is written out twice.
#define D2G_CHECK_ARG(cond, op, name)                                                          \
  TORCH_CHECK(cond, op, ": invalid argument '", name, "': requires " #cond                     \
              " (the Python op of the same name in d2g_fast.ops explains every argument)")

namespace d2g {

// The dtype every kernel accumulates in: float64 for float64 inputs, else float32 (bf16 and
// fp16 inputs too). Its Python twin, for the reference and Triton paths and the fake kernels,
// is d2g_fast._dispatch.accumulation_dtype; tests/test_foundation_constants.py checks that the
// compiled ops follow it.
inline at::ScalarType accumulation_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": '", name, "' is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": '", name,
              "' must be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": '", name, "' must have ", dim, " dimensions ", layout,
              ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": '", name_a, "' is on ", a.device(), " but '",
              name_b, "' is on ", b.device(), "; move them to the same device");
}

}  // namespace d2g

#include <cstdlib>
#include <limits>

namespace d2g {

// With D2G_POISON=1 (the test suite sets it) every output is filled with NaN before a kernel
// writes it, so an element a kernel forgets fails the comparison instead of passing on
// whatever the allocator returned.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("D2G_POISON");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

inline at::Tensor poisoned(at::Tensor t) {
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace d2g
