#pragma once
// lpips_distance_multi: the LatentLPIPS distance of L layers in one call (one parallel loop on
// the CPU, one kernel launch on the GPU), with the cancellation-free math of
// lpips_distance_math.h (its kStatRows rows of per-pixel statistics are saved for the
// backward). Shared by every backend: argument checks and allocations.
#include <ATen/ATen.h>

#include <vector>

namespace d2g {
namespace lpips {

struct MultiArgs {
  std::vector<at::Tensor> f0, f1;  // L tensors (N, C_l, H_l, W_l), any strides
  std::vector<at::Tensor> w;       // L tensors (C_l,), accumulation dtype, contiguous
  at::ScalarType dtype, acc;
  int64_t L = 0, N = 0;
  std::vector<int64_t> pixel_begin;  // L + 1 offsets of each layer's N H W pixels in the stats rows
  int64_t pixels() const { return pixel_begin.back(); }
};

MultiArgs prepare_multi(const char* op, at::TensorList f0, at::TensorList f1, at::TensorList weights);

// grad: (L, N); stats: the contiguous (kStatRows, total pixels) tensor returned by the forward.
void check_multi_backward(const char* op, const at::Tensor& grad, const at::Tensor& stats,
                          const MultiArgs& m);

// (kStatRows, total pixels) in the accumulation dtype, NaN-poisoned under D2G_POISON=1.
at::Tensor alloc_multi_stats(const MultiArgs& m);
// One gradient per layer like ``like`` (memory format preserved), or L empty tensors.
std::vector<at::Tensor> alloc_multi_grads(const std::vector<at::Tensor>& like, bool needed);

}  // namespace lpips
}  // namespace d2g
