// feature_loss, CUDA: the formulas and the gradient derivation are those of feature_loss.cpp.
//
// Launches:
//   feature_norms_kernel     one warp per row: r_i and 1 / max(r_i, eps)
//   S = Phi^T (1 / rc), Gram = Phi^T Phi (or Phi Phi^T), Phi Phi^T Phi   (cuBLAS through ATen, fp32/fp64)
//   sum_squares_kernel       partial sums of ||Gram||_F^2
//   feature_finalize_kernel  one block: ||S||^2, ||Phi||_F^2, the terms and the loss
//   feature_grad_kernel      one warp per row: phi_i . S, then the row's gradient
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

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
                                     int64_t b, int64_t d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= b) return;  // warp-uniform, no block-level synchronisation in this kernel
  const scalar_t* row = phi + r * d;
  acc_t sq = 0;
  for (int64_t j = lane; j < d; j += kWarp) {
    const acc_t v = static_cast<acc_t>(row[j]);
    sq += v * v;
  }
  sq = warp_sum(sq);
  if (lane == 0) {
    const acc_t n = sqrt(sq);
    nrm[r] = n;
    inv[r] = acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
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

template <typename acc_t>
__global__ void feature_finalize_kernel(const acc_t* __restrict__ s,             // [D]
                                        const acc_t* __restrict__ nrm,           // [B]
                                        const acc_t* __restrict__ gram_partial,  // [gram_blocks]
                                        const acc_t* __restrict__ weights,       // [2]
                                        int64_t b, int64_t d, int gram_blocks,
                                        acc_t* __restrict__ loss,    // []
                                        acc_t* __restrict__ terms) {  // [2]
  __shared__ acc_t smem[kWarp];
  acc_t s2 = 0, f2 = 0, g2 = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) s2 += s[j] * s[j];
  for (int64_t j = threadIdx.x; j < b; j += blockDim.x) f2 += nrm[j] * nrm[j];
  for (int j = threadIdx.x; j < gram_blocks; j += blockDim.x) g2 += gram_partial[j];
  s2 = block_sum(s2, smem);
  f2 = block_sum(f2, smem);
  g2 = block_sum(g2, smem);
  if (threadIdx.x == 0) {
    const acc_t bf = acc_t(b);
    const acc_t cos = (s2 - bf) / (bf * (bf - 1)), ortho = (g2 - 2 * f2 + bf) / (bf * bf);
    terms[0] = cos;
    terms[1] = ortho;
    *loss = weights[0] * cos + weights[1] * ortho;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void feature_grad_kernel(const scalar_t* __restrict__ phi,   // [B, D]
                                    const acc_t* __restrict__ s,        // [D]
                                    const acc_t* __restrict__ prod,     // [B, D] Phi Phi^T Phi
                                    const acc_t* __restrict__ nrm,      // [B]
                                    const acc_t* __restrict__ weights,  // [2]
                                    scalar_t* __restrict__ grad,        // [B, D]
                                    int64_t b, int64_t d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= b) return;  // warp-uniform
  const scalar_t* row = phi + r * d;
  const acc_t* pr = prod + r * d;
  scalar_t* out = grad + r * d;
  const acc_t bf = acc_t(b);
  const acc_t cs = 2 * weights[0] / (bf * (bf - 1)), co = 4 * weights[1] / (bf * bf);
  acc_t dot = 0;
  for (int64_t j = lane; j < d; j += kWarp) dot += static_cast<acc_t>(row[j]) * s[j];
  dot = warp_sum(dot);
  const acc_t rn = nrm[r];
  const bool unclamped = rn >= acc_t(kNormEps);
  const acc_t a = unclamped ? cs / rn : cs / acc_t(kNormEps);
  const acc_t us = unclamped ? dot / (rn * rn) : acc_t(0);  // u_id (u_i . S) = phi_id (phi_i . S) / r^2
  for (int64_t j = lane; j < d; j += kWarp) {
    const acc_t v = static_cast<acc_t>(row[j]);
    out[j] = static_cast<scalar_t>(a * (s[j] - v * us) + co * (pr[j] - v));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_loss_cuda(const at::Tensor& features,
                                                                  const at::Tensor& weights) {
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor feats = prepare_feature_loss(features);
  const at::ScalarType acc = acc_dtype(feats.scalar_type());
  const at::Tensor phi = feats.to(acc);  // fp32/fp64 operand of the cuBLAS products (no copy for fp32/fp64)
  const at::Tensor w = prepare_weights(weights, 2, feats, acc);
  const int64_t b = feats.size(0), d = feats.size(1);
  const auto acc_opts = phi.options();
  at::Tensor loss = at::empty({}, acc_opts);
  at::Tensor terms = at::empty({2}, acc_opts);
  at::Tensor grad = at::empty_like(feats);
  at::Tensor nrm = at::empty({b}, acc_opts), inv = at::empty({b}, acc_opts);
  const int row_blocks = int((b + kRowsPerBlock - 1) / kRowsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "feature_norms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    feature_norms_kernel<scalar_t, acc_t><<<row_blocks, kRowsPerBlock * kWarp, 0, stream>>>(
        feats.const_data_ptr<scalar_t>(), nrm.mutable_data_ptr<acc_t>(), inv.mutable_data_ptr<acc_t>(), b, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor s = at::mv(phi.t(), inv);                                       // [D]
  const at::Tensor gram = d <= b ? at::mm(phi.t(), phi) : at::mm(phi, phi.t());  // [D, D] or [B, B]
  const at::Tensor prod = d <= b ? at::mm(phi, gram) : at::mm(gram, phi);        // [B, D]
  const int gram_blocks = grid_size(gram.numel(), kThreads, 4);
  at::Tensor gram_partial = at::empty({gram_blocks}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "feature_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sum_squares_kernel<acc_t><<<gram_blocks, kThreads, 0, stream>>>(
        gram.const_data_ptr<acc_t>(), gram.numel(), gram_partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    feature_finalize_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
        s.const_data_ptr<acc_t>(), nrm.const_data_ptr<acc_t>(), gram_partial.const_data_ptr<acc_t>(),
        w.const_data_ptr<acc_t>(), b, d, gram_blocks, loss.mutable_data_ptr<acc_t>(), terms.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    feature_grad_kernel<scalar_t, acc_t><<<row_blocks, kRowsPerBlock * kWarp, 0, stream>>>(
        feats.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), prod.const_data_ptr<acc_t>(),
        nrm.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), grad.mutable_data_ptr<scalar_t>(), b, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, terms, grad};  // grad: in the features' dtype
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tldr_fast, CUDA, m) { m.impl("feature_loss", &cuda::feature_loss_cuda); }

}  // namespace tldr_fast
