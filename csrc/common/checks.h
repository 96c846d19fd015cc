#pragma once
#include <ATen/ATen.h>

// Argument checks at the C++ boundary. Every message names the argument and what was
// expected, so a wrong call from any language reads the same.
namespace d2g {

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
