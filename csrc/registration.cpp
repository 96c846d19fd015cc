// Every op's schema, in one place. Kernels register themselves per backend with
// TORCH_LIBRARY_IMPL in their own files (cpu/, cuda/); autograd and fake (meta) kernels are
// registered from Python (d2g_fast/ops/), so the ops work under torch.compile.
#include <torch/library.h>

TORCH_LIBRARY(d2g_fast, m) {
  // LatentLPIPS per-layer distance (csrc/lpips_distance). Returns (distance, stats): distance
  // is (N,) or, with spatial, (N, 1, H, W); stats (5, N, H, W) holds per-pixel
  // [1/|f0|, 1/|f1|, 1/|f0| - 1/|f1|, s0, s1] that make the backward a single pass.
  m.def("lpips_distance(Tensor f0, Tensor f1, Tensor weight, bool spatial) -> (Tensor, Tensor)");
  m.def(
      "lpips_distance_backward(Tensor grad, Tensor f0, Tensor f1, Tensor weight, Tensor stats, "
      "bool spatial, bool need_f0, bool need_f1) -> (Tensor, Tensor)");
  // The same distance for L layers in one call (csrc/lpips_distance/*multi*), with the
  // cancellation-free two-pass math. Returns (dist (L, N) spatial means, stats (5, total
  // pixels) = per pixel [1/|f0|, 1/|f1|, 1/|f0| - 1/|f1|, s0, s1], layers one after another).
  // The backward writes the gradients of f0 and/or f1 of every layer in one pass.
  m.def("lpips_distance_multi(Tensor[] f0, Tensor[] f1, Tensor[] weights) -> (Tensor, Tensor)");
  m.def(
      "lpips_distance_multi_backward(Tensor grad, Tensor[] f0, Tensor[] f1, Tensor[] weights, "
      "Tensor stats, bool need_f0, bool need_f1) -> (Tensor[], Tensor[])");
  // Paired latent augmentation (csrc/paired_augment): the same per-sample transform applied to
  // x and (optionally) y. params = AugmentParams.packed() (N, 17) float64 (columns 13..16:
  // the batch's reflect-padding margins x0, y0, x1, y1), flags = 1 geometry | 2 colour |
  // 4 cutout (| 8 = without the brightness offset: the linear part). Without y the second
  // output is an empty tensor. The backward applies the transposed operator to one or two
  // gradients (it is linear, and the same for x and y).
  m.def("paired_augment(Tensor x, Tensor? y, Tensor params, int flags) -> (Tensor, Tensor)");
  m.def(
      "paired_augment_backward(Tensor grad_x, Tensor? grad_y, Tensor params, int flags) -> "
      "(Tensor, Tensor)");
  // Draws those params on out's device (N = out.size(0)) from a counter-based RNG, no host
  // synchronisation: preset_flags = 1 b | 2 g | 4 c | 8 o, p = probability multiplier;
  // seed (>= 0) replaces the generator.
  m.def(
      "augment_params_sample_on_device_(Tensor(a!) out, int C, int H, int W, int preset_flags, "
      "float p, Generator? generator=None, int? seed=None) -> ()");
  // Fused multi-scale discriminator heads (csrc/multiscale_heads): K heads of per-pixel
  // LayerNorm over channels -> SiLU -> 1x1 conv to one logit, and the non-saturating loss
  // sum_k head_weights[k] * mean softplus(-target[n] * logit). Returns (loss, scores (K, N)
  // spatial-mean logits, stats: per head (5, N, H, W) [logit, mean, rstd, m1, m2] for the
  // backward, see csrc/multiscale_heads/multiscale_heads_math.h).
  m.def(
      "multiscale_heads(Tensor[] features, Tensor[] weights, Tensor bias, Tensor target, "
      "float[] head_weights, float eps) -> (Tensor, Tensor, Tensor[])");
  m.def(
      "multiscale_heads_backward(Tensor grad_loss, Tensor grad_scores, Tensor[] features, "
      "Tensor[] weights, Tensor target, float[] head_weights, float eps, Tensor[] stats) "
      "-> (Tensor[], Tensor[], Tensor)");
}
