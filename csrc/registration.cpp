// Every op's schema, in one place. Kernels register themselves per backend with
// TORCH_LIBRARY_IMPL in their own files (cpu/, cuda/); autograd and fake (meta) kernels are
// registered from Python (d2g_fast/ops/), so the ops work under torch.compile.
#include <torch/library.h>

TORCH_LIBRARY(d2g_fast, m) {
  // LatentLPIPS per-layer distance (csrc/lpips_distance). Returns (distance, stats): distance
  // is (N,) or, with spatial, (N, 1, H, W); stats (4, N, H, W) holds per-pixel
  // [1/|f0|, 1/|f1|, s0, s1] that make the backward a single pass.
  m.def("lpips_distance(Tensor f0, Tensor f1, Tensor weight, bool spatial) -> (Tensor, Tensor)");
  m.def(
      "lpips_distance_backward(Tensor grad, Tensor f0, Tensor f1, Tensor weight, Tensor stats, "
      "bool spatial, bool need_f0, bool need_f1) -> (Tensor, Tensor)");
}
