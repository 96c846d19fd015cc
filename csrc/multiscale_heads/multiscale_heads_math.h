#pragma once
// Per-pixel math of the fused multi-scale discriminator heads, shared by the CPU and CUDA
// kernels (see d2g_fast/ref/multiscale_heads.py for the definition).
//
// One head, one pixel with channel values f_c (c < C), weights w_c, bias b, target t (+-1):
//   mean = sum f / C,  var = sum (f - mean)^2 / C,  r = 1/sqrt(var + eps)
//   xhat_c = (f_c - mean) r,  a_c = silu(xhat_c),  logit = b + sum_c w_c a_c
//   loss contribution softplus(-t logit), score contribution logit.
// The mean and variance come from sums shifted by the pixel's first channel (f - f_0), which
// keeps E[x^2] - E[x]^2 from cancelling when |mean| >> std.
//
// Backward for a pixel with upstream gradient g = dL/dlogit:
//   dxhat_c = g w_c silu'(xhat_c)
//   df_c    = r (dxhat_c - mean_c(dxhat) - xhat_c mean_c(dxhat xhat))   (LayerNorm backward)
//   dw_c   += g a_c,  db += g
// g factors out of both channel means: mean_c(dxhat) = g m1 and mean_c(dxhat xhat) = g m2 with
//   m1 = mean_c(w_c silu'(xhat_c)),  m2 = mean_c(w_c silu'(xhat_c) xhat_c),
// which do not depend on the upstream gradient. The forward computes m1 and m2 in its logit pass
// and stores them with the other per-pixel stats, so the backward reads the features ONCE:
//   df_c = r g (w_c silu'(xhat_c) - m1 - xhat_c m2).
// Per-pixel stats, one (N, H, W) plane each: logit, mean, rstd, m1, m2.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace d2g {
namespace multiscale_heads {

constexpr int64_t kStatRows = 5;  // logit, mean, rstd, m1, m2 (see above)

// exp for the per-channel SiLU, the hot spot of every kernel. On the CPU, std::exp blocks
// auto-vectorisation, so float uses a branch-free Cody-Waite range reduction and a degree-6
// Taylor polynomial (relative error ~2e-7, far below the 1e-5 test tolerance) that the compiler
// vectorises. It has NO range clamp (a clamp is control flow that stops the vectoriser): it is
// only called on LayerNorm outputs, which are bounded by sqrt(C - 1) in magnitude, so the
// kernels require C <= kMaxChannelsCpu (|x| < 84 < 87, where float exp is still normal).
// float64 keeps std::exp (gradcheck needs full precision); CUDA uses expf.
constexpr int64_t kMaxChannelsCpu = 7000;

D2G_HOST_DEVICE float exp_normalised(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

D2G_HOST_DEVICE double exp_normalised(double x) { return exp(x); }

// Sigmoid of a LayerNorm output (bounded, see above).
template <typename acc_t>
D2G_HOST_DEVICE acc_t sigmoid_normalised(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_normalised(-x));
}

// Sigmoid of any value (the logits): std::exp, which saturates correctly.
template <typename acc_t>
D2G_HOST_DEVICE acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp(-x));
}

// log(1 + exp(x)) without overflow.
template <typename acc_t>
D2G_HOST_DEVICE acc_t softplus(acc_t x) {
  return (x > acc_t(0) ? x : acc_t(0)) + log1p(exp(-(x > acc_t(0) ? x : -x)));
}

// Shifted moments of one pixel: s1 = sum (f - f0), s2 = sum (f - f0)^2.
template <typename acc_t>
D2G_HOST_DEVICE void moments(acc_t s1, acc_t s2, acc_t shift, int64_t C, acc_t eps, acc_t& mean,
                             acc_t& rstd) {
  const acc_t inv_c = acc_t(1) / acc_t(C);
  const acc_t m = s1 * inv_c;
  acc_t var = s2 * inv_c - m * m;
  var = var > acc_t(0) ? var : acc_t(0);
  mean = shift + m;
  rstd = acc_t(1) / sqrt(var + eps);
}

// dL/dlogit of one pixel. loss_scale = head_weight / (N H W), score_grad = grad_scores[k, n] / (H W).
template <typename acc_t>
D2G_HOST_DEVICE acc_t logit_grad(acc_t logit, acc_t target, acc_t grad_loss, acc_t loss_scale,
                                 acc_t score_grad) {
  // d softplus(-t l) / dl = -t sigmoid(-t l)
  return grad_loss * loss_scale * (-target) * sigmoid(-target * logit) + score_grad;
}

// SiLU and its derivative from one exponential: a = x s, da = s (1 + x (1 - s)), s = sigmoid(x).
template <typename acc_t>
D2G_HOST_DEVICE void silu_and_grad(acc_t x, acc_t& a, acc_t& da) {
  const acc_t s = sigmoid_normalised(x);
  a = x * s;
  da = s * (acc_t(1) + x * (acc_t(1) - s));
}

// LayerNorm backward for one channel in the factorised form above:
// g_rstd = g r, w_dsilu = w_c silu'(xhat_c), m1 / m2 the pixel's stats.
template <typename acc_t>
D2G_HOST_DEVICE acc_t feature_grad(acc_t g_rstd, acc_t w_dsilu, acc_t xhat, acc_t m1, acc_t m2) {
  return g_rstd * (w_dsilu - m1 - xhat * m2);
}

}  // namespace multiscale_heads
}  // namespace d2g
