#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace d2g {
namespace multiscale_heads {

// Arguments of one call after the checks shared by every backend: features as contiguous
// NCHW tensors of one dtype, weights / target in the accumulation dtype.
struct Prepared {
  std::vector<at::Tensor> features;  // K tensors (N, C_k, H_k, W_k), contiguous
  std::vector<at::Tensor> weights;   // K tensors (C_k,), accumulation dtype, contiguous
  at::Tensor target;                 // (N,), accumulation dtype, contiguous
  std::vector<double> loss_scale;    // head_weight_k / (N H_k W_k), on the host (no device copy)
  at::ScalarType acc;
  int64_t N;
  int64_t K;
};

Prepared prepare(const char* op, at::TensorList features, at::TensorList weights,
                 const at::Tensor& target, at::ArrayRef<double> head_weights, double eps);

void check_bias(const at::Tensor& bias, const Prepared& p);
void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& grad_scores,
                         at::TensorList stats, const Prepared& p);

// Per-head stats (kStatRows = 5, N, H, W) = [logit, mean, rstd, m1, m2] (multiscale_heads_math.h),
// poisoned under D2G_POISON.
std::vector<at::Tensor> alloc_stats(const Prepared& p);

}  // namespace multiscale_heads
}  // namespace d2g
