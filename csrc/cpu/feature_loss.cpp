// feature_loss, CPU: mean pairwise cosine similarity and orthogonality of the penultimate features by their
// closed forms, over all pairs of the batch or over the pairs of the same label, and the activation loss (DAFL,
// Chen et al. 2019) over every row; gradient written in the same call.
//
// The rows fall into groups: all B rows, or (with labels) the n_k rows of each label k. A row interacts only
// with the rows of its group, so each group is the all-pairs problem on its own rows, and the terms add up:
// Phi [B, D], r_i = ||phi_i||, rc_i = max(r_i, eps), u_i = phi_i / rc_i; per group k, Phi_k [n_k, D],
// S_k = sum_{i in k} u_i [D], G_k = Phi_k^T Phi_k (or Phi_k Phi_k^T, the smaller one: same Frobenius norm);
// P = sum_k n_k (n_k - 1) ordered pairs, N2 = sum_k n_k^2 (all pairs: P = B (B-1), N2 = B^2):
//   Cos   = (sum_k ||S_k||^2 - B) / max(P, 1)
//   Ortho = (sum_k ||G_k||_F^2 - 2 ||Phi||_F^2 + B) / N2
//   Act   = -(1 / (B D)) sum_{i,d} |phi_id|   (every row, whatever the groups)
// (sum_k ||G_k||^2 = sum_{i,j: y_i = y_j} (phi_i . phi_j)^2, the masked B x B Gram's norm, at the cost of the
// per-label Grams). Gradients (DESIGN.md section 2), for row i of group k:
//   dCos/du_i = 2 S_k / max(P, 1) =: cs S_k, then through the normalisation
//     r_i >= eps: du_i/dphi_i = (I - u_i u_i^T) / r_i  ->  cs (S_k - u_i (u_i . S_k)) / r_i
//     r_i <  eps: u_i = phi_i / eps                     ->  cs S_k / eps   (as clamp_min's gradient)
//   dOrtho/dphi_i = 4 ((Phi_k (Phi_k^T Phi_k))_i - phi_i) / N2 =: co (...)   (= ((Phi_k Phi_k^T) Phi_k)_i)
//   dAct/dphi_id  = -sign(phi_id) / (B D) =: -ca sign(phi_id)   (sign(0) = 0, torch.abs's subgradient)
// sum |phi_id| is taken per row with the row norms (the pass that reads Phi first).
// The Gram (by blocks of its upper triangle, sym_gram), its product with Phi_k and the matrix-vector products
// go through ATen's BLAS; bf16/fp16 features are converted to fp32 once for them. With labels the rows are
// first put in label order (a counting sort and one copy of Phi), so that every group is a block of rows, and
// each gradient row is written back to its row of the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../common.h"

namespace tldr_fast {
namespace {

// x . y over n elements, vectorised (omp simd lets the compiler reorder the sum).
template <typename T>
inline T dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += x[j] * y[j];
  return s;
}

// sum_j |x_j| over n elements, vectorised.
template <typename T>
inline T abs_sum(const T* __restrict__ x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += std::abs(x[j]);
  return s;
}

// x^T x for x [n, m] -> [m, m], symmetric: the upper triangle by row blocks (block i: rows of block i,
// columns from block i on; 4 blocks do 5/8 of a full product's work), then the lower triangle mirrored.
at::Tensor sym_gram(const at::Tensor& x) {
  const int64_t m = x.size(1), h = (m + 3) / 4;
  at::Tensor g = at::empty({m, m}, x.options());
  for (int64_t r0 = 0; r0 < m; r0 += h) {
    const int64_t r1 = std::min(m, r0 + h);
    g.narrow(0, r0, r1 - r0).narrow(1, r0, m - r0).copy_(at::mm(x.narrow(1, r0, r1 - r0).t(), x.narrow(1, r0, m - r0)));
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sym_gram", [&] {
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    for (int64_t r = h; r < m; ++r)
      for (int64_t c = 0; c < r / h * h; ++c) gp[r * m + c] = gp[c * m + r];
  });
  return g;
}

// The rows of each label in label order, by a counting sort: labels [B] int64 in [0, K) (checked) ->
// (order [B]: the batch row of each sorted row, sizes of the non-empty groups).
std::pair<at::Tensor, std::vector<int64_t>> label_groups(const at::Tensor& labels, int64_t k) {
  TORCH_CHECK(k >= 1, "num_classes must be >= 1 with labels, got ", k);
  const int64_t b = labels.size(0);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  std::vector<int64_t> start(k + 1, 0);
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(y[i] >= 0 && y[i] < k, "labels must lie in [0, ", k, "), got ", y[i]);
    ++start[y[i] + 1];
  }
  std::vector<int64_t> sizes;
  for (int64_t c = 0; c < k; ++c) {
    if (start[c + 1] > 0) sizes.push_back(start[c + 1]);
    start[c + 1] += start[c];
  }
  at::Tensor order = at::empty({b}, labels.options());
  int64_t* o = order.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) o[start[y[i]]++] = i;
  return {order, sizes};
}

// phi_t [B, D]: the rows, group after group (`sizes`, summing to B); dest [B]: the output row of each row
// (nullptr: the same row). grad [B, D] in the batch's row order.
template <typename acc_t>
void feature_loss_cpu_kernel(const at::Tensor& phi_t, const std::vector<int64_t>& sizes, const int64_t* dest,
                             const acc_t* w, at::Tensor& loss, at::Tensor& terms, at::Tensor& grad) {
  const int64_t b = phi_t.size(0), d = phi_t.size(1), groups = int64_t(sizes.size());
  const acc_t* phi = phi_t.const_data_ptr<acc_t>();  // [B, D]
  const auto opts = phi_t.options();
  at::Tensor norm_t = at::empty({b}, opts), inv_t = at::empty({b}, opts);
  acc_t* nrm = norm_t.mutable_data_ptr<acc_t>();  // r_i
  acc_t* inv = inv_t.mutable_data_ptr<acc_t>();   // 1 / rc_i
  std::vector<acc_t> l1(b);                        // sum_d |phi_id|
  at::parallel_for(0, b, parallel_grain(d), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      nrm[i] = std::sqrt(dot(phi + i * d, phi + i * d, d));
      inv[i] = acc_t(1) / std::max(nrm[i], acc_t(kNormEps));
      l1[i] = abs_sum(phi + i * d, d);
    }
  });
  at::Tensor s = at::empty({groups, d}, opts);  // [groups, D] S_k
  at::Tensor prod = at::empty({b, d}, opts);    // [B, D] Phi_k Phi_k^T Phi_k, group by group
  std::vector<int64_t> group_of(b);
  double s2 = 0, g2 = 0, pairs = 0, n2 = 0;
  for (int64_t k = 0, r0 = 0; k < groups; r0 += sizes[k], ++k) {
    const int64_t n = sizes[k];
    const at::Tensor pk = phi_t.narrow(0, r0, n);                                 // [n, D]
    at::Tensor sk = s[k], pr = prod.narrow(0, r0, n);                            // views: [D], [n, D]
    at::mv_out(sk, pk.t(), inv_t.narrow(0, r0, n));
    const at::Tensor gram = d <= n ? sym_gram(pk) : sym_gram(pk.t());             // [D, D] or [n, n]
    if (d <= n) {
      at::mm_out(pr, pk, gram);
    } else {
      at::mm_out(pr, gram, pk);
    }
    const acc_t* gp = gram.const_data_ptr<acc_t>();
    const int64_t side = gram.size(0);
    for (int64_t j = 0; j < side; ++j) g2 += dot(gp + j * side, gp + j * side, side);
    s2 += dot(sk.const_data_ptr<acc_t>(), sk.const_data_ptr<acc_t>(), d);
    pairs += double(n) * double(n - 1);
    n2 += double(n) * double(n);
    std::fill(group_of.begin() + r0, group_of.begin() + r0 + n, k);
  }
  double f2 = 0, a1 = 0;
  for (int64_t i = 0; i < b; ++i) {
    f2 += double(nrm[i]) * nrm[i];
    a1 += l1[i];
  }
  const double bd = double(b), p = std::max(pairs, 1.0), size = bd * double(d);
  acc_t* t = terms.mutable_data_ptr<acc_t>();
  t[0] = static_cast<acc_t>((s2 - bd) / p);
  t[1] = static_cast<acc_t>((g2 - 2 * f2 + bd) / n2);
  t[2] = static_cast<acc_t>(-a1 / size);
  *loss.mutable_data_ptr<acc_t>() = w[0] * t[0] + w[1] * t[1] + w[2] * t[2];

  const acc_t cs = acc_t(2 * double(w[0]) / p), co = acc_t(4 * double(w[1]) / n2), ca = acc_t(double(w[2]) / size);
  const acc_t* sp = s.const_data_ptr<acc_t>();
  const acc_t* pp = prod.const_data_ptr<acc_t>();
  acc_t* g = grad.mutable_data_ptr<acc_t>();
  at::parallel_for(0, b, parallel_grain(d), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t* pr = phi + i * d;
      const acc_t* qr = pp + i * d;
      const acc_t* sk = sp + group_of[i] * d;
      acc_t* gr = g + (dest != nullptr ? dest[i] : i) * d;
      const acc_t r = nrm[i];
      // u_id (u_i . S_k) = phi_id (phi_i . S_k) / r^2; a clamped norm (r < eps) has no projection term
      const bool unclamped = r >= acc_t(kNormEps);
      const acc_t a = unclamped ? cs / r : cs / acc_t(kNormEps);
      const acc_t us = unclamped ? dot(pr, sk, d) / (r * r) : acc_t(0);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j)
        gr[j] = a * (sk[j] - pr[j] * us) + co * (qr[j] - pr[j]) - ca * acc_t((pr[j] > 0) - (pr[j] < 0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_loss_cpu(const at::Tensor& features, const at::Tensor& weights,
                                                                const std::optional<at::Tensor>& labels,
                                                                int64_t num_classes) {
  const at::Tensor feats = prepare_feature_loss(features);
  const at::ScalarType acc = acc_dtype(feats.scalar_type());
  at::Tensor phi = feats.to(acc);  // fp32/fp64 copy for BLAS (no copy for fp32/fp64 input)
  const at::Tensor w = prepare_weights(weights, 3, feats, acc);
  std::vector<int64_t> sizes{phi.size(0)};  // one group: all pairs
  at::Tensor order;
  if (labels.has_value()) {
    std::tie(order, sizes) = label_groups(prepare_labels(*labels, feats), num_classes);
    phi = phi.index_select(0, order);  // [B, D] in label order
  }
  at::Tensor loss = at::empty({}, phi.options());
  at::Tensor terms = at::empty({3}, phi.options());  // Cos, Ortho, Act
  at::Tensor grad = at::empty_like(phi);
  AT_DISPATCH_FLOATING_TYPES(acc, "feature_loss_cpu", [&] {
    feature_loss_cpu_kernel<scalar_t>(phi, sizes, order.defined() ? order.const_data_ptr<int64_t>() : nullptr,
                                      w.const_data_ptr<scalar_t>(), loss, terms, grad);
  });
  return {loss, terms, grad.to(features.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(tldr_fast, CPU, m) { m.impl("feature_loss", &feature_loss_cpu); }

}  // namespace tldr_fast
