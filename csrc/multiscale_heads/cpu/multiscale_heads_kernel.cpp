// CPU kernels of the fused multi-scale discriminator heads: every head and sample of one call
// in ONE parallel loop over (head, sample) tasks. Within a task, pixels go in tiles of kTile
// along the contiguous NCHW plane; each pass walks the channels once over the tile, so the
// inner loops are unit-stride and vectorise. Forward: 2 passes over the features (moments;
// logits with the backward's channel means m1, m2); backward: 1 pass (gradients) and nothing
// else. Sums are per-task (no atomics): results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "common/macros.h"
#include "multiscale_heads/multiscale_heads.h"
#include "multiscale_heads/multiscale_heads_math.h"

namespace d2g {
namespace multiscale_heads {
namespace {

constexpr int64_t kTile = 64;

// Stores of the feature gradient. c10's float -> bfloat16 conversion branches on NaN, which
// stops the vectoriser; this branch-free round-to-nearest-even gives the same result for every
// finite value (and keeps quiet NaNs NaN).
template <typename scalar_t, typename acc_t>
inline scalar_t to_output(acc_t v) {
  return static_cast<scalar_t>(v);
}

template <>
inline c10::BFloat16 to_output<c10::BFloat16, float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

struct Task {
  int64_t k, n;
};

std::vector<Task> make_tasks(const Prepared& p) {
  std::vector<Task> tasks;
  // Biggest heads first: the parallel loop hands out contiguous ranges, so mixing sizes keeps
  // the threads balanced.
  std::vector<int64_t> order(p.K);
  for (int64_t k = 0; k < p.K; ++k) order[k] = k;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return p.features[a].numel() > p.features[b].numel();
  });
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t k : order) tasks.push_back({k, n});
  return tasks;
}

template <typename scalar_t, typename acc_t>
D2G_CPU_CLONES void forward_task(const scalar_t* f, const acc_t* w, acc_t b, acc_t t, int64_t C, int64_t HW,
                  acc_t eps, acc_t* const out[kStatRows], acc_t* loss_sum, acc_t* logit_sum) {
  acc_t s1[kTile], s2[kTile], shift[kTile], mean[kTile], rstd[kTile], logit[kTile], m1[kTile],
      m2[kTile];
  acc_t loss_acc = 0, logit_acc = 0;
  const acc_t inv_c = acc_t(1) / acc_t(C);
  for (int64_t p0 = 0; p0 < HW; p0 += kTile) {
    const int64_t np = std::min(kTile, HW - p0);
    for (int64_t i = 0; i < np; ++i) {
      shift[i] = acc_t(f[p0 + i]);
      s1[i] = s2[i] = acc_t(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = f + c * HW + p0;
      for (int64_t i = 0; i < np; ++i) {
        const acc_t d = acc_t(row[i]) - shift[i];
        s1[i] += d;
        s2[i] += d * d;
      }
    }
    for (int64_t i = 0; i < np; ++i) {
      moments(s1[i], s2[i], shift[i], C, eps, mean[i], rstd[i]);
      logit[i] = b;
      m1[i] = m2[i] = acc_t(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = f + c * HW + p0;
      const acc_t wc = w[c];
#pragma omp simd
      for (int64_t i = 0; i < np; ++i) {
        const acc_t xhat = (acc_t(row[i]) - mean[i]) * rstd[i];
        acc_t a, da;
        silu_and_grad(xhat, a, da);
        logit[i] += wc * a;
        m1[i] += wc * da;
        m2[i] += wc * da * xhat;
      }
    }
    for (int64_t i = 0; i < np; ++i) {
      out[0][p0 + i] = logit[i];
      out[1][p0 + i] = mean[i];
      out[2][p0 + i] = rstd[i];
      out[3][p0 + i] = m1[i] * inv_c;
      out[4][p0 + i] = m2[i] * inv_c;
      loss_acc += softplus(-t * logit[i]);
      logit_acc += logit[i];
    }
  }
  *loss_sum = loss_acc;
  *logit_sum = logit_acc;
}

// One pass over the features (the LayerNorm channel means come from the forward's m1, m2).
template <typename scalar_t, typename acc_t>
D2G_CPU_CLONES void backward_task(const scalar_t* f, const acc_t* w, acc_t t, int64_t C, int64_t HW,
                   const acc_t* const in[kStatRows], acc_t grad_loss, acc_t loss_scale,
                   acc_t score_grad, scalar_t* df, acc_t* dw, acc_t* db) {
  acc_t g[kTile], g_rstd[kTile], mean[kTile], rstd[kTile], m1[kTile], m2[kTile];
  acc_t db_acc = 0;
  for (int64_t c = 0; c < C; ++c) dw[c] = acc_t(0);
  for (int64_t p0 = 0; p0 < HW; p0 += kTile) {
    const int64_t np = std::min(kTile, HW - p0);
    for (int64_t i = 0; i < np; ++i) {
      g[i] = logit_grad(in[0][p0 + i], t, grad_loss, loss_scale, score_grad);
      mean[i] = in[1][p0 + i];
      rstd[i] = in[2][p0 + i];
      m1[i] = in[3][p0 + i];
      m2[i] = in[4][p0 + i];
      g_rstd[i] = g[i] * rstd[i];
      db_acc += g[i];
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = f + c * HW + p0;
      scalar_t* out = df + c * HW + p0;
      const acc_t wc = w[c];
      acc_t dw_acc = 0;
#pragma omp simd reduction(+ : dw_acc)
      for (int64_t i = 0; i < np; ++i) {
        const acc_t xhat = (acc_t(row[i]) - mean[i]) * rstd[i];
        acc_t a, da;
        silu_and_grad(xhat, a, da);
        out[i] = to_output<scalar_t, acc_t>(feature_grad(g_rstd[i], wc * da, xhat, m1[i], m2[i]));
        dw_acc += g[i] * a;
      }
      dw[c] += dw_acc;
    }
  }
  *db = db_acc;
}

// (K, N) loss and logit sums of every (head, sample) -> (loss scalar, scores (K, N)).
std::tuple<at::Tensor, at::Tensor> finish_forward(const at::Tensor& loss_sums,
                                                  const at::Tensor& logit_sums, const Prepared& p) {
  std::vector<double> inv_hw(p.K);
  for (int64_t k = 0; k < p.K; ++k)
    inv_hw[k] = 1.0 / double(p.features[k].size(2) * p.features[k].size(3));
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const auto scale = at::tensor(p.loss_scale, opts).to(loss_sums.scalar_type());
  const auto inv = at::tensor(inv_hw, opts).to(loss_sums.scalar_type());
  return {(loss_sums.sum(1) * scale).sum(), logit_sums * inv.unsqueeze(1)};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> multiscale_heads_cpu(
    at::TensorList features, at::TensorList weights, const at::Tensor& bias, const at::Tensor& target,
    at::ArrayRef<double> head_weights, double eps) {
  const Prepared p = prepare("d2g_fast::multiscale_heads", features, weights, target, head_weights, eps);
  check_bias(bias, p);
  const auto b = bias.to(p.acc).contiguous();
  auto stats = alloc_stats(p);
  auto loss_sums = poisoned(at::empty({p.K, p.N}, p.features[0].options().dtype(p.acc)));
  auto logit_sums = poisoned(at::empty({p.K, p.N}, p.features[0].options().dtype(p.acc)));
  const auto tasks = make_tasks(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.features[0].scalar_type(),
                                  "multiscale_heads_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t k = tasks[i].k, n = tasks[i].n;
        const auto& f = p.features[k];
        const int64_t C = f.size(1), HW = f.size(2) * f.size(3);
        acc_t* st = stats[k].mutable_data_ptr<acc_t>() + n * HW;
        const int64_t plane = p.N * HW;
        acc_t* const rows[kStatRows] = {st, st + plane, st + 2 * plane, st + 3 * plane,
                                        st + 4 * plane};
        forward_task<scalar_t, acc_t>(
            f.const_data_ptr<scalar_t>() + n * C * HW, p.weights[k].const_data_ptr<acc_t>(),
            b.const_data_ptr<acc_t>()[k], p.target.const_data_ptr<acc_t>()[n], C, HW, acc_t(eps),
            rows, loss_sums.mutable_data_ptr<acc_t>() + k * p.N + n,
            logit_sums.mutable_data_ptr<acc_t>() + k * p.N + n);
      }
    });
  });
  auto [loss, scores] = finish_forward(loss_sums, logit_sums, p);
  return {loss, scores, stats};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> multiscale_heads_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& grad_scores, at::TensorList features,
    at::TensorList weights, const at::Tensor& target, at::ArrayRef<double> head_weights, double eps,
    at::TensorList stats) {
  const Prepared p =
      prepare("d2g_fast::multiscale_heads_backward", features, weights, target, head_weights, eps);
  check_backward_args(grad_loss, grad_scores, stats, p);
  const auto gl = grad_loss.to(p.acc).reshape({});
  const auto gs = grad_scores.to(p.acc).contiguous();
  std::vector<at::Tensor> grad_features, dw_partial;
  for (int64_t k = 0; k < p.K; ++k) {
    grad_features.push_back(poisoned(at::empty_like(p.features[k])));
    dw_partial.push_back(poisoned(at::empty({p.N, p.features[k].size(1)},
                                            p.features[k].options().dtype(p.acc))));
  }
  auto db_partial = poisoned(at::empty({p.K, p.N}, p.features[0].options().dtype(p.acc)));
  const auto tasks = make_tasks(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.features[0].scalar_type(),
                                  "multiscale_heads_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t gl_v = gl.item<acc_t>();
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t k = tasks[i].k, n = tasks[i].n;
        const auto& f = p.features[k];
        const int64_t C = f.size(1), HW = f.size(2) * f.size(3);
        const int64_t plane = p.N * HW;
        const acc_t* st = stats[k].const_data_ptr<acc_t>() + n * HW;
        const acc_t* const rows[kStatRows] = {st, st + plane, st + 2 * plane, st + 3 * plane,
                                              st + 4 * plane};
        backward_task<scalar_t, acc_t>(
            f.const_data_ptr<scalar_t>() + n * C * HW, p.weights[k].const_data_ptr<acc_t>(),
            p.target.const_data_ptr<acc_t>()[n], C, HW, rows, gl_v,
            static_cast<acc_t>(p.loss_scale[k]),
            gs.const_data_ptr<acc_t>()[k * p.N + n] / acc_t(HW),
            grad_features[k].mutable_data_ptr<scalar_t>() + n * C * HW,
            dw_partial[k].mutable_data_ptr<acc_t>() + n * C,
            db_partial.mutable_data_ptr<acc_t>() + k * p.N + n);
      }
    });
  });
  std::vector<at::Tensor> grad_weights;
  for (int64_t k = 0; k < p.K; ++k)
    grad_weights.push_back(dw_partial[k].sum(0).to(weights[k].scalar_type()));
  return {grad_features, grad_weights, db_partial.sum(1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(d2g_fast, CPU, m) {
  m.impl("multiscale_heads", &multiscale_heads_cpu);
  m.impl("multiscale_heads_backward", &multiscale_heads_backward_cpu);
}

}  // namespace multiscale_heads
}  // namespace d2g
