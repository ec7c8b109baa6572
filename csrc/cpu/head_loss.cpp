// head_loss, CPU: CE and KL(c||p) on clean and perturbed logits, and the closed-form head grad-norm, with
// the gradient of the weighted loss written in the same call (formulas: DESIGN.md section 2).
//
// Per row r (clean rows i = r < B use w_ce, w_kl; perturbed rows i = r - B use w_ce', w_kl'), with
// p = softmax(z_r), lp = log p, c = target_i, y = labels_i, sc = sum_k c_k (1 for a distribution):
//   CE_r = lse - z_y                          dCE_r/dz_k = p_k - [k == y]
//   KL_r = sum_k xlogy(c_k, c_k) - c_k lp_k    dKL_r/dz_k = p_k sc - c_k
// and every term is a mean over the B rows of its half.
//
// Head grad-norm (clean rows): E = P - C [B, K], Phi [B, D], G = E^T Phi [K, D], s = sum_i e_i [K],
//   S = ||G||^2 + ||s||^2 (the bias part only with a head bias),  GN = sqrt(S) / B.
//   dS/dPhi = 2 E G,   dS/dE_ik = 2 (phi_i . g_k + s_k) =: 2 m_ik,
//   and through the softmax (dE_i/dz_i = diag(p_i) - p_i p_i^T): dS/dz_ik = 2 p_ik (m_ik - <m_i, p_i>).
//   With a = w_gn / (B sqrt S) (dGN/dS = 1 / (2 B sqrt S)):
//   grad_Phi = a E G,   grad_z_ik += a p_ik (m_ik - <m_i, p_i>).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../common.h"

namespace tldr_fast {
namespace {

template <typename acc_t>
inline acc_t xlogx(acc_t c) {
  return c == acc_t(0) ? acc_t(0) : c * std::log(c);  // 0 log 0 = 0, as torch.xlogy
}

template <typename scalar_t>
void head_loss_cpu_kernel(const HeadLossInputs& in, bool head_bias, at::Tensor& loss, at::Tensor& terms,
                          at::Tensor& grad_logits, at::Tensor& grad_features) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = in.n, b = in.b, k = in.k, d = in.d;
  const bool gn = in.features.defined();
  const scalar_t* z = in.logits.const_data_ptr<scalar_t>();  // [N, K]
  const acc_t* c = in.target.const_data_ptr<acc_t>();        // [B, K]
  const int64_t* y = in.labels.const_data_ptr<int64_t>();    // [B]
  const acc_t* w = in.weights.const_data_ptr<acc_t>();       // [5]
  scalar_t* gz = grad_logits.mutable_data_ptr<scalar_t>();   // [N, K]

  const auto opts = in.target.options();
  at::Tensor row_ce = at::empty({n}, opts), row_kl = at::empty({n}, opts), row_sc = at::empty({b}, opts);
  at::Tensor p_mat = gn ? at::empty({b, k}, opts) : at::Tensor();  // [B, K] softmax of the clean rows
  at::Tensor e_mat = gn ? at::empty({b, k}, opts) : at::Tensor();  // [B, K] E = P - C
  acc_t* ce_r = row_ce.mutable_data_ptr<acc_t>();
  acc_t* kl_r = row_kl.mutable_data_ptr<acc_t>();
  acc_t* sc_r = row_sc.mutable_data_ptr<acc_t>();
  acc_t* pm = gn ? p_mat.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* em = gn ? e_mat.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t inv_b = acc_t(1) / acc_t(b);

  // exp(z - rowmax) of every logit: the shifts in a loop, the exponentials by ATen's vectorised exp.
  at::Tensor ex_t = at::empty({n, k}, opts), mx_t = at::empty({n}, opts);
  acc_t* ex = ex_t.mutable_data_ptr<acc_t>();
  acc_t* mxr = mx_t.mutable_data_ptr<acc_t>();
  at::parallel_for(0, n, parallel_grain(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* zr = z + r * k;
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < k; ++j) mx = std::max(mx, static_cast<acc_t>(zr[j]));
      for (int64_t j = 0; j < k; ++j) ex[r * k + j] = static_cast<acc_t>(zr[j]) - mx;
      mxr[r] = mx;
    }
  });
  ex_t.exp_();

  // Pass over the rows: softmax, CE, KL, and the CE/KL gradient of every row whose gradient is final now.
  at::parallel_for(0, n, parallel_grain(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bool clean = r < b;
      const int64_t i = clean ? r : r - b;
      const scalar_t* zr = z + r * k;
      const acc_t* er = ex + r * k;
      const acc_t* cr = c + i * k;
      const int64_t yi = y[i];
      TORCH_CHECK(yi >= 0 && yi < k, "head_loss: label ", yi, " out of range [0, ", k, ")");
      acc_t se = 0;
      for (int64_t j = 0; j < k; ++j) se += er[j];
      const acc_t lse = mxr[r] + std::log(se), inv_se = acc_t(1) / se;
      acc_t kl = 0, sc = 0;
      for (int64_t j = 0; j < k; ++j) {
        const acc_t cj = cr[j];
        kl += xlogx(cj) - cj * (static_cast<acc_t>(zr[j]) - lse);
        sc += cj;
      }
      ce_r[r] = lse - static_cast<acc_t>(zr[yi]);
      kl_r[r] = kl;
      if (clean && gn) {  // the gradient of these rows waits for G
        sc_r[i] = sc;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t p = er[j] * inv_se;
          pm[i * k + j] = p;
          em[i * k + j] = p - cr[j];
        }
      } else {
        const acc_t wce = w[clean ? 0 : 2] * inv_b, wkl = w[clean ? 1 : 3] * inv_b;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t p = er[j] * inv_se;
          gz[r * k + j] = static_cast<scalar_t>(wce * (p - acc_t(j == yi)) + wkl * (p * sc - cr[j]));
        }
      }
    }
  });

  double sums[4] = {0, 0, 0, 0};  // ce, kl, ce', kl'
  for (int64_t r = 0; r < n; ++r) {
    sums[r < b ? 0 : 2] += ce_r[r];
    sums[r < b ? 1 : 3] += kl_r[r];
  }
  double gn_term = 0;

  if (gn) {
    // The three products go through ATen's BLAS, in the accumulation dtype.
    const at::Tensor phi = in.features.to(in.acc);                         // [B, D]
    const at::Tensor g = at::mm(e_mat.t(), phi);                           // [K, D]
    const at::Tensor s = head_bias ? e_mat.sum(0) : at::zeros({k}, opts);  // [K]
    const at::Tensor mt = at::mm(g, phi.t());                              // [K, B] (m - s)^T: BLAS is faster
    double sq = 0;
    const acc_t* gp = g.const_data_ptr<acc_t>();
    for (int64_t j = 0; j < k * d; ++j) sq += double(gp[j]) * gp[j];
    const acc_t* sp = s.const_data_ptr<acc_t>();
    for (int64_t j = 0; j < k; ++j) sq += double(sp[j]) * sp[j];
    gn_term = std::sqrt(sq) / double(b);
    const acc_t a = sq > 0 ? acc_t(double(w[4]) / (double(b) * std::sqrt(sq))) : acc_t(0);
    if (grad_features.scalar_type() == in.acc) {
      at::mm_out(grad_features, e_mat, g * a);  // [B, D]
    } else {
      grad_features.copy_(at::mm(e_mat, g * a));
    }

    const acc_t* mtp = mt.const_data_ptr<acc_t>();
    const acc_t wce = w[0] * inv_b, wkl = w[1] * inv_b;
    at::parallel_for(0, b, parallel_grain(k), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t* pr = pm + i * k;
        const acc_t* cr = c + i * k;
        acc_t mdotp = 0;
        for (int64_t j = 0; j < k; ++j) mdotp += (mtp[j * b + i] + sp[j]) * pr[j];
        for (int64_t j = 0; j < k; ++j) {
          const acc_t p = pr[j];
          gz[i * k + j] = static_cast<scalar_t>(wce * (p - acc_t(j == y[i])) + wkl * (p * sc_r[i] - cr[j]) +
                                                a * p * (mtp[j * b + i] + sp[j] - mdotp));
        }
      }
    });
  }

  acc_t* t = terms.mutable_data_ptr<acc_t>();
  for (int j = 0; j < 4; ++j) t[j] = static_cast<acc_t>(sums[j] / double(b));
  t[4] = static_cast<acc_t>(gn_term);
  acc_t total = 0;
  for (int j = 0; j < 5; ++j) total += w[j] * t[j];
  *loss.mutable_data_ptr<acc_t>() = total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_loss_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& labels,
    const std::optional<at::Tensor>& features, const at::Tensor& weights, bool head_bias) {
  const HeadLossInputs in = prepare_head_loss(logits, target, labels, features, weights);
  const auto acc_opts = in.target.options();
  at::Tensor loss = at::empty({}, acc_opts);
  at::Tensor terms = at::empty({5}, acc_opts);
  at::Tensor grad_logits = at::empty_like(in.logits);
  at::Tensor grad_features = in.features.defined() ? at::empty_like(in.features) : at::empty({0}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "head_loss_cpu", [&] {
    head_loss_cpu_kernel<scalar_t>(in, head_bias, loss, terms, grad_logits, grad_features);
  });
  return {loss, terms, grad_logits.to(logits.scalar_type()),
          features.has_value() ? grad_features.to(features->scalar_type()) : grad_features};
}

}  // namespace

TORCH_LIBRARY_IMPL(tldr_fast, CPU, m) { m.impl("head_loss", &head_loss_cpu); }

}  // namespace tldr_fast
