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

constexpr int64_t kGramRows = 128;  // rows per partial of G (a fixed split: deterministic sums)
constexpr int kW = 16;               // columns per vector step (one AVX-512 register of fp32)
constexpr int kKB = 5;               // classes per register block; E and G are zero-padded to Kp = a multiple
constexpr int kRB = 4;               // rows per register block of gn_rows

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TLDR_FAST_CPU_LEVELS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define TLDR_FAST_INLINE inline __attribute__((always_inline))  // compiled into each level's clone
#else
#define TLDR_FAST_CPU_LEVELS
#define TLDR_FAST_INLINE inline
#endif

// The grad-norm's two products with the thin [K, D] matrix G, in the accumulation dtype (K = 10 for most
// classifiers: BLAS is slow at such shapes). They are built once per x86-64 level (AVX-512, AVX2,
// baseline) and the CPU picks one at load time (GCC function multi-versioning): the extension itself is
// compiled for baseline x86-64, whose 4-wide SSE would leave them far slower. Both keep register blocks
// of independent accumulators (kW columns x kKB classes, or x kRB rows) so that neither FMA latency nor
// loads limit them.
//
// gram_rows: out[Kp, D] += sum_{i in [i0, i1)} e_i phi_i^T and, with a head bias, out[Kp*D + k] += sum_i e_ik
// (s; left as it is without one). e: [B, Kp], phi: [B, D].
template <typename T>
TLDR_FAST_INLINE void gram_rows_impl(const T* __restrict__ e, const T* __restrict__ phi, int64_t i0, int64_t i1,
                                     int64_t kp, int64_t d, bool bias, T* __restrict__ out) {
  const int64_t dv = d / kW * kW;
  for (int64_t j0 = 0; j0 < dv; j0 += kW) {
    for (int64_t k0 = 0; k0 < kp; k0 += kKB) {
      T acc[kKB][kW] = {};
      for (int64_t i = i0; i < i1; ++i) {
        const T* p = phi + i * d + j0;
        const T* er = e + i * kp + k0;
#pragma GCC unroll 8
        for (int q = 0; q < kKB; ++q) {
          const T eq = er[q];
#pragma omp simd
          for (int l = 0; l < kW; ++l) acc[q][l] += eq * p[l];
        }
      }
#pragma GCC unroll 8
      for (int q = 0; q < kKB; ++q)
#pragma omp simd
        for (int l = 0; l < kW; ++l) out[(k0 + q) * d + j0 + l] += acc[q][l];
    }
  }
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t q = 0; q < kp; ++q) {
      const T eq = e[i * kp + q];
      if (bias) out[kp * d + q] += eq;
      for (int64_t j = dv; j < d; ++j) out[q * d + j] += eq * phi[i * d + j];
    }
  }
}

// gn_block: rows [i, i + R): m_i[k] = g_k . phi_i (G's rows g_k) and grad_Phi_i = a sum_k e_ik g_k.
template <int R, typename T>
TLDR_FAST_INLINE void gn_block(const T* __restrict__ phi, const T* __restrict__ e, const T* __restrict__ g, int64_t i,
                               int64_t kp, int64_t d, T a, T* __restrict__ m, T* __restrict__ gphi) {
  const int64_t dv = d / kW * kW;
  for (int64_t k0 = 0; k0 < kp; k0 += kKB) {
    T dot[R][kKB][kW] = {};
    for (int64_t j0 = 0; j0 < dv; j0 += kW) {
#pragma GCC unroll 8
      for (int q = 0; q < kKB; ++q) {
        const T* gq = g + (k0 + q) * d + j0;
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const T* pr = phi + (i + r) * d + j0;
#pragma omp simd
          for (int l = 0; l < kW; ++l) dot[r][q][l] += gq[l] * pr[l];
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int q = 0; q < kKB; ++q) {
        T s = 0;
        for (int l = 0; l < kW; ++l) s += dot[r][q][l];
        for (int64_t j = dv; j < d; ++j) s += g[(k0 + q) * d + j] * phi[(i + r) * d + j];
        m[(i + r) * kp + k0 + q] = s;
      }
    }
  }
  for (int64_t j0 = 0; j0 < dv; j0 += kW) {
    T acc[R][kW] = {};
    for (int64_t q = 0; q < kp; ++q) {
      const T* gq = g + q * d + j0;
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const T aq = a * e[(i + r) * kp + q];
#pragma omp simd
        for (int l = 0; l < kW; ++l) acc[r][l] += aq * gq[l];
      }
    }
    for (int r = 0; r < R; ++r)
#pragma omp simd
      for (int l = 0; l < kW; ++l) gphi[(i + r) * d + j0 + l] = acc[r][l];
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t j = dv; j < d; ++j) {
      T s = 0;
      for (int64_t q = 0; q < kp; ++q) s += a * e[(i + r) * kp + q] * g[q * d + j];
      gphi[(i + r) * d + j] = s;
    }
  }
}

// gn_rows: gn_block over rows [i0, i1), kRB rows at a time. m: [B, Kp], gphi: [B, D].
template <typename T>
TLDR_FAST_INLINE void gn_rows_impl(const T* phi, const T* e, const T* g, int64_t i0, int64_t i1, int64_t kp, int64_t d,
                                   T a, T* m, T* gphi) {
  int64_t i = i0;
  for (; i + kRB <= i1; i += kRB) gn_block<kRB>(phi, e, g, i, kp, d, a, m, gphi);
  for (; i < i1; ++i) gn_block<1>(phi, e, g, i, kp, d, a, m, gphi);
}

TLDR_FAST_CPU_LEVELS void gram_rows(const float* e, const float* phi, int64_t i0, int64_t i1, int64_t kp, int64_t d,
                                    bool bias, float* out) {
  gram_rows_impl(e, phi, i0, i1, kp, d, bias, out);
}
void gram_rows(const double* e, const double* phi, int64_t i0, int64_t i1, int64_t kp, int64_t d, bool bias,
               double* out) {
  gram_rows_impl(e, phi, i0, i1, kp, d, bias, out);
}
TLDR_FAST_CPU_LEVELS void gn_rows(const float* phi, const float* e, const float* g, int64_t i0, int64_t i1, int64_t kp,
                                  int64_t d, float a, float* m, float* gphi) {
  gn_rows_impl(phi, e, g, i0, i1, kp, d, a, m, gphi);
}
void gn_rows(const double* phi, const double* e, const double* g, int64_t i0, int64_t i1, int64_t kp, int64_t d,
             double a, double* m, double* gphi) {
  gn_rows_impl(phi, e, g, i0, i1, kp, d, a, m, gphi);
}

template <typename scalar_t>
void head_loss_cpu_kernel(const HeadLossInputs& in, bool head_bias, at::Tensor& loss, at::Tensor& terms,
                          at::Tensor& grad_logits, at::Tensor& grad_features) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = in.n, b = in.b, k = in.k, d = in.d;
  const bool gn = in.features.defined();
  const scalar_t* z = in.logits.const_data_ptr<scalar_t>();  // [N, K]
  const acc_t* c = in.condition.const_data_ptr<acc_t>();        // [B, K]
  const int64_t* y = in.labels.const_data_ptr<int64_t>();    // [B]
  const acc_t* w = in.weights.const_data_ptr<acc_t>();       // [5]
  scalar_t* gz = grad_logits.mutable_data_ptr<scalar_t>();   // [N, K]

  const auto opts = in.condition.options();
  at::Tensor row_ce = at::empty({n}, opts), row_kl = at::empty({n}, opts), row_sc = at::empty({b}, opts);
  at::Tensor row_inv_se = gn ? at::empty({b}, opts) : at::Tensor();  // clean rows: p = ex / sum(ex)
  const int64_t kp = (k + kKB - 1) / kKB * kKB;  // classes padded for the grad-norm's register blocks
  at::Tensor e_mat = gn ? at::zeros({b, kp}, opts) : at::Tensor();  // [B, Kp] E = P - C, zero-padded
  acc_t* ce_r = row_ce.mutable_data_ptr<acc_t>();
  acc_t* kl_r = row_kl.mutable_data_ptr<acc_t>();
  acc_t* sc_r = row_sc.mutable_data_ptr<acc_t>();
  acc_t* inv_se_r = gn ? row_inv_se.mutable_data_ptr<acc_t>() : nullptr;
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
        inv_se_r[i] = inv_se;
        for (int64_t j = 0; j < k; ++j) em[i * kp + j] = er[j] * inv_se - cr[j];
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
    const at::Tensor phi_t = in.features.to(in.acc);  // [B, D], contiguous (no copy for fp32)
    const acc_t* phi = phi_t.const_data_ptr<acc_t>();
    // G and s: fixed chunks of rows, each its own partial, summed in a fixed order (deterministic for any
    // thread count)
    const int64_t chunks = (b + kGramRows - 1) / kGramRows, gsz = kp * (d + 1);
    at::Tensor part_t = at::zeros({chunks, gsz}, opts);  // per chunk: G [Kp, D], then s [Kp]
    acc_t* part = part_t.mutable_data_ptr<acc_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch)
        gram_rows(em, phi, ch * kGramRows, std::min(b, (ch + 1) * kGramRows), kp, d, head_bias, part + ch * gsz);
    });
    at::Tensor gs_t = at::empty({gsz}, opts);  // G [Kp, D] (rows >= K are 0), then s [Kp] (0 without a head bias)
    acc_t* g = gs_t.mutable_data_ptr<acc_t>();
    acc_t* sp = g + kp * d;
    std::copy(part, part + gsz, g);
    for (int64_t ch = 1; ch < chunks; ++ch) {
      const acc_t* pc = part + ch * gsz;
#pragma omp simd
      for (int64_t j = 0; j < gsz; ++j) g[j] += pc[j];
    }
    double sq = 0;
    for (int64_t j = 0; j < gsz; ++j) sq += double(g[j]) * g[j];
    gn_term = std::sqrt(sq) / double(b);
    const acc_t a = sq > 0 ? acc_t(double(w[4]) / (double(b) * std::sqrt(sq))) : acc_t(0);

    // grad_Phi in the accumulation dtype: written in place when the features are in it, else converted
    at::Tensor gphi_t = grad_features.scalar_type() == in.acc ? grad_features : at::empty({b, d}, opts);
    acc_t* gphi = gphi_t.mutable_data_ptr<acc_t>();
    const acc_t wce = w[0] * inv_b, wkl = w[1] * inv_b;
    at::Tensor m_t = at::empty({b, kp}, opts);  // m_i - s = G phi_i: [B, Kp]
    acc_t* mm = m_t.mutable_data_ptr<acc_t>();
    at::parallel_for(0, b, parallel_grain(2 * kp * d), [&](int64_t i0, int64_t i1) {
      gn_rows(phi, em, g, i0, i1, kp, d, a, mm, gphi);
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t* mr = mm + i * kp;
        const acc_t* er = ex + i * k;
        const acc_t* cr = c + i * k;
        acc_t mdotp = 0;
        for (int64_t j = 0; j < k; ++j) mdotp += (mr[j] + sp[j]) * (er[j] * inv_se_r[i]);
        for (int64_t j = 0; j < k; ++j) {
          const acc_t p = er[j] * inv_se_r[i];
          gz[i * k + j] = static_cast<scalar_t>(wce * (p - acc_t(j == y[i])) + wkl * (p * sc_r[i] - cr[j]) +
                                                a * p * (mr[j] + sp[j] - mdotp));
        }
      }
    });
    if (!gphi_t.is_same(grad_features)) grad_features.copy_(gphi_t);
  }

  acc_t* t = terms.mutable_data_ptr<acc_t>();
  for (int j = 0; j < 4; ++j) t[j] = static_cast<acc_t>(sums[j] / double(b));
  t[4] = static_cast<acc_t>(gn_term);
  acc_t total = 0;
  for (int j = 0; j < 5; ++j) total += w[j] * t[j];
  *loss.mutable_data_ptr<acc_t>() = total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_loss_cpu(
    const at::Tensor& logits, const at::Tensor& condition, const at::Tensor& labels,
    const std::optional<at::Tensor>& features, const at::Tensor& weights, bool head_bias) {
  const HeadLossInputs in = prepare_head_loss(logits, condition, labels, features, weights);
  const auto acc_opts = in.condition.options();
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
