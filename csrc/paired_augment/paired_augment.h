#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace d2g {
namespace augment {

// Checks shared by every backend (x and its optional pair y, packed params, flags). On the
// CPU it also checks the margin columns of params (whole numbers in [0, size - 1]); a device
// kernel cannot read them without a host synchronisation, so it clamps them instead.
void check_args(const char* op, const char* name_x, const at::Tensor& x, const char* name_y,
                const std::optional<at::Tensor>& y, const at::Tensor& params, int64_t flags);

// Checks of the sampler op augment_params_sample_on_device_ (every backend).
void check_sample_args(const char* op, const at::Tensor& out, int64_t C, int64_t H, int64_t W,
                       int64_t preset_flags, double p, const std::optional<int64_t>& seed);

// Output like `t` (same sizes and memory format), NaN-poisoned under D2G_POISON=1.
at::Tensor alloc_like(const at::Tensor& t);

// The second output when there is no second input.
at::Tensor empty_output(const at::Tensor& t);

// sym6 low-pass taps normalised to unit sum.
std::array<double, 12> normalized_filter();

}  // namespace augment
}  // namespace d2g
