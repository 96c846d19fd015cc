#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace d2g {
namespace augment {

// Checks shared by every backend (x and its optional pair y, packed params, margins, flags).
void check_args(const char* op, const char* name_x, const at::Tensor& x, const char* name_y,
                const std::optional<at::Tensor>& y, const at::Tensor& params,
                at::IntArrayRef margins, int64_t flags);

// Output like `t` (same sizes and memory format), NaN-poisoned under D2G_POISON=1.
at::Tensor alloc_like(const at::Tensor& t);

// The second output when there is no second input.
at::Tensor empty_output(const at::Tensor& t);

// sym6 low-pass taps normalised to unit sum.
std::array<double, 12> normalized_filter();

}  // namespace augment
}  // namespace d2g
