// feature_loss, CPU: mean pairwise cosine similarity and orthogonality of the penultimate features by their
// closed forms (no B x B matrix when D < B), gradient written in the same call.
//
// Phi [B, D], r_i = ||phi_i||, rc_i = max(r_i, eps), u_i = phi_i / rc_i, S = sum_i u_i [D]:
//   Cos   = (||S||^2 - B) / (B (B-1))
//   Ortho = (||Phi^T Phi||_F^2 - 2 ||Phi||_F^2 + B) / B^2   (the Gram of side min(B, D): same norm)
// Gradients (DESIGN.md section 2):
//   dCos/du_i = 2 S / (B (B-1)) =: cs S, then through the normalisation
//     r_i >= eps: du_i/dphi_i = (I - u_i u_i^T) / r_i  ->  cs (S - u_i (u_i . S)) / r_i
//     r_i <  eps: u_i = phi_i / eps                     ->  cs S / eps   (as clamp_min's gradient)
//   dOrtho/dPhi = 4 (Phi (Phi^T Phi) - Phi) / B^2   (Phi (Phi^T Phi) = (Phi Phi^T) Phi for D > B)
// The Gram (by blocks of its upper triangle, sym_gram), its product with Phi and the matrix-vector products
// go through ATen's BLAS; bf16/fp16 features are converted to fp32 once for them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

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

template <typename acc_t>
void feature_loss_cpu_kernel(const at::Tensor& phi_t, const acc_t* w, at::Tensor& loss, at::Tensor& terms,
                             at::Tensor& grad) {
  const int64_t b = phi_t.size(0), d = phi_t.size(1);
  const acc_t* phi = phi_t.const_data_ptr<acc_t>();  // [B, D]
  const auto opts = phi_t.options();
  at::Tensor norm_t = at::empty({b}, opts), inv_t = at::empty({b}, opts);
  acc_t* nrm = norm_t.mutable_data_ptr<acc_t>();  // r_i
  acc_t* inv = inv_t.mutable_data_ptr<acc_t>();   // 1 / rc_i
  at::parallel_for(0, b, parallel_grain(d), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      nrm[i] = std::sqrt(dot(phi + i * d, phi + i * d, d));
      inv[i] = acc_t(1) / std::max(nrm[i], acc_t(kNormEps));
    }
  });
  const at::Tensor s = at::mv(phi_t.t(), inv_t);                                         // [D] S
  const at::Tensor gram = d <= b ? sym_gram(phi_t) : sym_gram(phi_t.t());                 // [D, D] or [B, B]
  const at::Tensor prod = d <= b ? at::mm(phi_t, gram) : at::mm(gram, phi_t);            // [B, D] Phi Phi^T Phi

  const acc_t* sp = s.const_data_ptr<acc_t>();
  const acc_t* gp = gram.const_data_ptr<acc_t>();
  const int64_t side = gram.size(0);
  double s2 = dot(sp, sp, d), g2 = 0, f2 = 0;
  for (int64_t j = 0; j < side; ++j) g2 += dot(gp + j * side, gp + j * side, side);
  for (int64_t i = 0; i < b; ++i) f2 += double(nrm[i]) * nrm[i];
  const double bd = double(b);
  acc_t* t = terms.mutable_data_ptr<acc_t>();
  t[0] = static_cast<acc_t>((s2 - bd) / (bd * (bd - 1)));
  t[1] = static_cast<acc_t>((g2 - 2 * f2 + bd) / (bd * bd));
  *loss.mutable_data_ptr<acc_t>() = w[0] * t[0] + w[1] * t[1];

  const acc_t cs = acc_t(2 * double(w[0]) / (bd * (bd - 1))), co = acc_t(4 * double(w[1]) / (bd * bd));
  const acc_t* pp = prod.const_data_ptr<acc_t>();
  acc_t* g = grad.mutable_data_ptr<acc_t>();
  at::parallel_for(0, b, parallel_grain(d), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t* pr = phi + i * d;
      const acc_t* qr = pp + i * d;
      acc_t* gr = g + i * d;
      const acc_t r = nrm[i];
      // u_id (u_i . S) = phi_id (phi_i . S) / r^2; a clamped norm (r < eps) has no projection term
      const bool unclamped = r >= acc_t(kNormEps);
      const acc_t a = unclamped ? cs / r : cs / acc_t(kNormEps);
      const acc_t us = unclamped ? dot(pr, sp, d) / (r * r) : acc_t(0);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) gr[j] = a * (sp[j] - pr[j] * us) + co * (qr[j] - pr[j]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_loss_cpu(const at::Tensor& features, const at::Tensor& weights) {
  const at::Tensor feats = prepare_feature_loss(features);
  const at::ScalarType acc = acc_dtype(feats.scalar_type());
  const at::Tensor phi = feats.to(acc);  // fp32/fp64 copy for BLAS (no copy for fp32/fp64 input)
  const at::Tensor w = prepare_weights(weights, 2, feats, acc);
  at::Tensor loss = at::empty({}, phi.options());
  at::Tensor terms = at::empty({2}, phi.options());
  at::Tensor grad = at::empty_like(phi);
  AT_DISPATCH_FLOATING_TYPES(acc, "feature_loss_cpu", [&] {
    feature_loss_cpu_kernel<scalar_t>(phi, w.const_data_ptr<scalar_t>(), loss, terms, grad);
  });
  return {loss, terms, grad.to(features.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(tldr_fast, CPU, m) { m.impl("feature_loss", &feature_loss_cpu); }

}  // namespace tldr_fast
