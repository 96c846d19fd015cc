#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace d2g {
namespace lpips {

// Checks shared by every backend; returns the accumulation dtype (float32, or float64 for
// float64 inputs).
at::ScalarType check_forward_args(const at::Tensor& f0, const at::Tensor& f1,
                                  const at::Tensor& weight);
void check_backward_args(const at::Tensor& grad, const at::Tensor& f0, const at::Tensor& f1,
                         const at::Tensor& weight, const at::Tensor& stats, bool spatial);

// Allocations shared by every backend (poisoned with NaN under D2G_POISON=1).
std::tuple<at::Tensor, at::Tensor> alloc_forward_outputs(const at::Tensor& f0, at::ScalarType acc);
at::Tensor finish_distance(const at::Tensor& map, bool spatial);
at::Tensor alloc_grad(const at::Tensor& like, bool needed);
// The upstream gradient per pixel, contiguous (N, H, W) in the accumulation dtype: the
// spatial map itself, or grad[n] / (H W) (the derivative of the spatial mean).
at::Tensor pixel_gradient(const at::Tensor& grad, at::ScalarType acc, int64_t N, int64_t H, int64_t W,
                          bool spatial);

}  // namespace lpips
}  // namespace d2g
