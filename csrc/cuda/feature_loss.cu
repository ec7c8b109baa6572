// feature_loss, CUDA: the formulas and the gradient derivation are those of feature_loss.cpp (Act, the
// activation loss, is the same in both forms: -sum |phi| / (B D), gradient -w_act sign(phi) / (B D)).
//
// Launches, all pairs:
//   feature_norms_kernel     one warp per row: r_i, w_i = 1 / max(r_i, eps) and l1_i = sum_d |phi_id|
//   S = Phi^T w, Gram = Phi^T Phi (or Phi Phi^T), Phi Phi^T Phi   (cuBLAS through ATen, fp32/fp64)
//   sum_squares_kernel       partial sums of ||Gram||_F^2
//   feature_finalize_kernel  one block: ||S||^2, ||Phi||_F^2, sum_i l1_i, the terms and the loss
//   feature_grad_kernel      one warp per row: phi_i . S, then the row's gradient
// Same-label pairs, by the masked B x B Gram (no per-label grouping: the labels stay on the device, compared,
// never read by the host nor used as indices). With M_ij = [y_i = y_j],
//   A = [(Phi Phi^T) o M ; M diag(w)]  [2B, B],   A Phi = [((Phi Phi^T) o M) Phi ; S_{y_i} rows]  [2B, D]
// (S_{y_i} = sum_j M_ij u_j, the sum of the row's label), and per row i: g2_i = sum_j ((Phi Phi^T) o M)_ij^2,
// q_i = w_i sum_j ((Phi Phi^T) o M)_ij w_j = u_i . S_{y_i}, n_i = sum_j M_ij = n_{y_i}; so that
// sum_k ||S_k||^2 = sum_i q_i, ||(Phi Phi^T) o M||_F^2 = sum_i g2_i, N2 = sum_k n_k^2 = sum_i n_i, P = N2 - B:
//   feature_norms_kernel
//   Phi Phi^T into A's upper half (cuBLAS)
//   label_mask_kernel        one warp per row: masks the Gram's row, writes M diag(w)'s row, g2_i, q_i, n_i
//   A Phi (cuBLAS)
//   feature_finalize_kernel  one block: the terms, the loss, and the gradient's scales cs, co (they depend on
//                            P and N2, which only the device knows)
//   feature_grad_kernel      one warp per row, with the row's S_{y_i}
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common.h"
#include "common.cuh"

namespace tldr_fast {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp per row
constexpr int kThreads = 256;
constexpr int kFinalThreads = 512;

template <typename scalar_t, typename acc_t>
__global__ void feature_norms_kernel(const scalar_t* __restrict__ phi,  // [B, D]
                                     acc_t* __restrict__ nrm,           // [B] r_i
                                     acc_t* __restrict__ inv,           // [B] 1 / max(r_i, eps)
                                     acc_t* __restrict__ l1,            // [B] sum_d |phi_id|
                                     int64_t b, int64_t d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= b) return;  // warp-uniform, no block-level synchronisation in this kernel
  const scalar_t* row = phi + r * d;
  acc_t sq = 0, ab = 0;
  for (int64_t j = lane; j < d; j += kWarp) {
    const acc_t v = static_cast<acc_t>(row[j]);
    sq += v * v;
    ab += abs(v);
  }
  sq = warp_sum(sq);
  ab = warp_sum(ab);
  if (lane == 0) {
    const acc_t n = sqrt(sq);
    nrm[r] = n;
    inv[r] = acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
    l1[r] = ab;
  }
}

// One partial sum of x^2 per block.
template <typename acc_t>
__global__ void sum_squares_kernel(const acc_t* __restrict__ x, int64_t size, acc_t* __restrict__ partial) {
  __shared__ acc_t smem[kWarp];
  acc_t sq = 0;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < size; idx += int64_t(gridDim.x) * blockDim.x)
    sq += x[idx] * x[idx];
  sq = block_sum(sq, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = sq;
}

// Same-label form: A [2B, B], rows [0, B) holding Phi Phi^T on entry; see the file's comment.
template <typename acc_t>
__global__ void label_mask_kernel(acc_t* __restrict__ a,              // [2B, B]
                                  const int64_t* __restrict__ labels,  // [B]
                                  const acc_t* __restrict__ inv,       // [B] w_j
                                  acc_t* __restrict__ row_sums,        // [3, B]: g2_i, q_i, n_i
                                  int64_t b) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= b) return;  // warp-uniform
  const int64_t y = labels[r];
  acc_t* gram = a + r * b;
  acc_t* mw = a + (b + r) * b;
  acc_t g2 = 0, q = 0, n = 0;
  for (int64_t j = lane; j < b; j += kWarp) {
    const bool same = labels[j] == y;
    const acc_t g = same ? gram[j] : acc_t(0);
    gram[j] = g;
    mw[j] = same ? inv[j] : acc_t(0);
    g2 += g * g;
    q += g * inv[j];
    n += acc_t(same);
  }
  g2 = warp_sum(g2);
  q = warp_sum(q);
  n = warp_sum(n);
  if (lane == 0) {
    row_sums[r] = g2;
    row_sums[b + r] = q * inv[r];
    row_sums[2 * b + r] = n;
  }
}

// s2 = sum_j s_j^2 (all pairs: S [D]) or sum_j s_j (same label: q [B]); g2 = sum of g2_part; N2 = B^2 (counts
// null) or sum counts; P = N2 - B; a1 = sum_i l1_i. Writes the terms, the loss and, with counts, scale = (cs, co).
template <typename acc_t>
__global__ void feature_finalize_kernel(const acc_t* __restrict__ s, int64_t s_len, bool square_s,
                                        const acc_t* __restrict__ nrm,      // [B]
                                        const acc_t* __restrict__ l1,       // [B]
                                        const acc_t* __restrict__ g2_part,  // [g2_len]
                                        int64_t g2_len,
                                        const acc_t* __restrict__ counts,   // [B] n_{y_i}, or null
                                        const acc_t* __restrict__ weights,  // [3]
                                        int64_t b, int64_t d,
                                        acc_t* __restrict__ loss,    // []
                                        acc_t* __restrict__ terms,   // [3]
                                        acc_t* __restrict__ scale) {  // [2] with counts
  __shared__ acc_t smem[kWarp];
  acc_t s2 = 0, f2 = 0, a1 = 0, g2 = 0, n2 = 0;
  for (int64_t j = threadIdx.x; j < s_len; j += blockDim.x) s2 += square_s ? s[j] * s[j] : s[j];
  for (int64_t j = threadIdx.x; j < b; j += blockDim.x) {
    f2 += nrm[j] * nrm[j];
    a1 += l1[j];
  }
  for (int64_t j = threadIdx.x; j < g2_len; j += blockDim.x) g2 += g2_part[j];
  s2 = block_sum(s2, smem);
  f2 = block_sum(f2, smem);
  a1 = block_sum(a1, smem);
  g2 = block_sum(g2, smem);
  if (counts != nullptr) {  // uniform: every thread calls block_sum or none
    for (int64_t j = threadIdx.x; j < b; j += blockDim.x) n2 += counts[j];
    n2 = block_sum(n2, smem);
  }
  if (threadIdx.x == 0) {
    const acc_t bf = acc_t(b);
    if (counts == nullptr) n2 = bf * bf;
    const acc_t pairs = n2 - bf > acc_t(1) ? n2 - bf : acc_t(1);
    const acc_t cos = (s2 - bf) / pairs, ortho = (g2 - 2 * f2 + bf) / n2, act = -a1 / (bf * acc_t(d));
    terms[0] = cos;
    terms[1] = ortho;
    terms[2] = act;
    *loss = weights[0] * cos + weights[1] * ortho + weights[2] * act;
    if (counts != nullptr) {
      scale[0] = 2 * weights[0] / pairs;
      scale[1] = 4 * weights[1] / n2;
    }
  }
}

// The row's S is s + row * s_ld (s_ld = 0: one S for every row); (cs, co) from `scale`, or for all pairs
// (scale null) 2 w_0 / (B (B-1)) and 4 w_1 / B^2; Act's ca = w_2 / (B D) in both forms.
template <typename scalar_t, typename acc_t>
__global__ void feature_grad_kernel(const scalar_t* __restrict__ phi,   // [B, D]
                                    const acc_t* __restrict__ s,        // [D] or [B, D]
                                    int64_t s_ld,
                                    const acc_t* __restrict__ prod,     // [B, D] ((Phi Phi^T) o M) Phi
                                    const acc_t* __restrict__ nrm,      // [B]
                                    const acc_t* __restrict__ weights,  // [3]
                                    const acc_t* __restrict__ scale,    // [2] or null
                                    scalar_t* __restrict__ grad,        // [B, D]
                                    int64_t b, int64_t d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= b) return;  // warp-uniform
  const scalar_t* row = phi + r * d;
  const acc_t* sr = s + r * s_ld;
  const acc_t* pr = prod + r * d;
  scalar_t* out = grad + r * d;
  const acc_t bf = acc_t(b);
  const acc_t cs = scale != nullptr ? scale[0] : 2 * weights[0] / (bf * (bf - 1));
  const acc_t co = scale != nullptr ? scale[1] : 4 * weights[1] / (bf * bf);
  const acc_t ca = weights[2] / (bf * acc_t(d));
  acc_t dot = 0;
  for (int64_t j = lane; j < d; j += kWarp) dot += static_cast<acc_t>(row[j]) * sr[j];
  dot = warp_sum(dot);
  const acc_t rn = nrm[r];
  const bool unclamped = rn >= acc_t(kNormEps);
  const acc_t a = unclamped ? cs / rn : cs / acc_t(kNormEps);
  const acc_t us = unclamped ? dot / (rn * rn) : acc_t(0);  // u_id (u_i . S) = phi_id (phi_i . S) / r^2
  for (int64_t j = lane; j < d; j += kWarp) {
    const acc_t v = static_cast<acc_t>(row[j]);
    const acc_t sign = acc_t((v > acc_t(0)) - (v < acc_t(0)));  // sign(0) = 0
    out[j] = static_cast<scalar_t>(a * (sr[j] - v * us) + co * (pr[j] - v) - ca * sign);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_loss_cuda(const at::Tensor& features, const at::Tensor& weights,
                                                                  const std::optional<at::Tensor>& labels,
                                                                  int64_t /*num_classes: labels are only compared*/) {
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor feats = prepare_feature_loss(features);
  const at::ScalarType acc = acc_dtype(feats.scalar_type());
  const at::Tensor phi = feats.to(acc);  // fp32/fp64 operand of the cuBLAS products (no copy for fp32/fp64)
  const at::Tensor w = prepare_weights(weights, 3, feats, acc);
  const bool by_label = labels.has_value();
  const at::Tensor y = by_label ? prepare_labels(*labels, feats) : at::Tensor();
  const int64_t b = feats.size(0), d = feats.size(1);
  const auto acc_opts = phi.options();
  at::Tensor loss = at::empty({}, acc_opts);
  at::Tensor terms = at::empty({3}, acc_opts);  // Cos, Ortho, Act
  at::Tensor grad = at::empty_like(feats);
  at::Tensor nrm = at::empty({b}, acc_opts), inv = at::empty({b}, acc_opts), l1 = at::empty({b}, acc_opts);
  const int row_blocks = int((b + kRowsPerBlock - 1) / kRowsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "feature_norms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    feature_norms_kernel<scalar_t, acc_t><<<row_blocks, kRowsPerBlock * kWarp, 0, stream>>>(
        feats.const_data_ptr<scalar_t>(), nrm.mutable_data_ptr<acc_t>(), inv.mutable_data_ptr<acc_t>(),
        l1.mutable_data_ptr<acc_t>(), b, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor s, gram, prod, row_sums, scale;  // see the file's comment
  if (!by_label) {
    s = at::mv(phi.t(), inv);                                                    // [D]
    gram = d <= b ? at::mm(phi.t(), phi) : at::mm(phi, phi.t());                 // [D, D] or [B, B]
    prod = d <= b ? at::mm(phi, gram) : at::mm(gram, phi);                       // [B, D]
  } else {
    at::Tensor a = at::empty({2 * b, b}, acc_opts);                              // [2B, B]
    at::Tensor upper = a.narrow(0, 0, b);
    at::mm_out(upper, phi, phi.t());
    row_sums = at::empty({3, b}, acc_opts);                                      // g2_i, q_i, n_i
    AT_DISPATCH_FLOATING_TYPES(acc, "feature_label_mask_cuda", [&] {
      label_mask_kernel<scalar_t><<<row_blocks, kRowsPerBlock * kWarp, 0, stream>>>(
          a.mutable_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), inv.const_data_ptr<scalar_t>(),
          row_sums.mutable_data_ptr<scalar_t>(), b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor both = at::mm(a, phi);                                      // [2B, D]
    prod = both.narrow(0, 0, b);
    s = both.narrow(0, b, b);                                                    // [B, D] S_{y_i}
    scale = at::empty({2}, acc_opts);
  }
  const int gram_blocks = by_label ? 0 : grid_size(gram.numel(), kThreads, 4);
  at::Tensor gram_partial = at::empty({gram_blocks}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "feature_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* rs = by_label ? row_sums.const_data_ptr<acc_t>() : nullptr;  // [3, B]
    if (!by_label) {
      sum_squares_kernel<acc_t><<<gram_blocks, kThreads, 0, stream>>>(
          gram.const_data_ptr<acc_t>(), gram.numel(), gram_partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    feature_finalize_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
        by_label ? rs + b : s.const_data_ptr<acc_t>(), by_label ? b : d, !by_label, nrm.const_data_ptr<acc_t>(),
        l1.const_data_ptr<acc_t>(), by_label ? rs : gram_partial.const_data_ptr<acc_t>(), by_label ? b : gram_blocks,
        by_label ? rs + 2 * b : nullptr, w.const_data_ptr<acc_t>(), b, d, loss.mutable_data_ptr<acc_t>(),
        terms.mutable_data_ptr<acc_t>(), by_label ? scale.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    feature_grad_kernel<scalar_t, acc_t><<<row_blocks, kRowsPerBlock * kWarp, 0, stream>>>(
        feats.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), by_label ? d : 0, prod.const_data_ptr<acc_t>(),
        nrm.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), by_label ? scale.const_data_ptr<acc_t>() : nullptr,
        grad.mutable_data_ptr<scalar_t>(), b, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, terms, grad};  // grad: in the features' dtype
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tldr_fast, CUDA, m) { m.impl("feature_loss", &cuda::feature_loss_cuda); }

}  // namespace tldr_fast
