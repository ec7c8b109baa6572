// head_loss, CUDA: the formulas and the gradient derivation are those of head_loss.cpp.
//
// Launches (bracketed: only with features, for the head grad-norm):
//   head_rows_kernel      one warp per row of the N logits: softmax, CE, KL, block partial sums; the final
//                         CE/KL gradient of every row, except clean rows with features: E = P - C and lse
//   [head_gram_kernel]    partial G_ext = E^T [Phi, 1] over slices of rows
//   [head_gram_reduce]    G_ext = sum of the slices, and partial sums of ||G_ext||^2
//   head_finalize_kernel  one block: terms, loss, and a = w_gn / (B sqrt S)
//   [head_gn_kernel]      one block per clean row: m_i = G_ext [phi_i, 1], the row's full logit gradient, and
//                         grad_Phi_i = a E_i G
// All reductions are fixed-order (no atomics): results are deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "../common.h"
#include "common.cuh"

namespace tldr_fast {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // head_rows_kernel: one warp per row
constexpr int kGramThreads = 128;  // head_gram_kernel: one thread per column of [Phi, 1]
constexpr int kGramK = 16;         // head_gram_kernel: classes per block; E is zero-padded to Kp = a multiple
constexpr int kReduceThreads = 256;
constexpr int kFinalThreads = 512;
constexpr int kGnThreads = 128;

template <typename scalar_t, typename acc_t>
__global__ void head_rows_kernel(const scalar_t* __restrict__ logits,  // [N, K]
                                 const acc_t* __restrict__ condition,     // [B, K]
                                 const int64_t* __restrict__ labels,   // [B]
                                 const acc_t* __restrict__ weights,    // [5]
                                 scalar_t* __restrict__ grad_logits,   // [N, K]
                                 acc_t* __restrict__ e_pad,            // [B, Kp], nullptr without features
                                 acc_t* __restrict__ lse_out,          // [B], nullptr without features
                                 acc_t* __restrict__ partial,          // [gridDim.x, 4]: ce, kl, ce', kl' sums
                                 int64_t n, int64_t b, int k, int kp) {
  __shared__ acc_t red[4][kRowsPerBlock];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + warp;
  const bool clean = r < b;
  acc_t ce = 0, kl = 0;
  if (r < n) {  // warp-uniform
    const int64_t i = clean ? r : r - b;
    const scalar_t* z = logits + r * k;
    const acc_t* c = condition + i * k;
    const int64_t y = labels[i];
    CUDA_KERNEL_ASSERT(y >= 0 && y < k);
    // online max and sum of exp per lane, merged across the warp
    acc_t mx = -INFINITY, se = 0;
    for (int j = lane; j < k; j += kWarp) {
      const acc_t v = static_cast<acc_t>(z[j]);
      if (v > mx) {
        se = se * dev_exp(mx - v) + acc_t(1);
        mx = v;
      } else {
        se += dev_exp(v - mx);
      }
    }
    const acc_t mall = warp_max(mx);
    se = warp_sum(mx == -INFINITY ? acc_t(0) : se * dev_exp(mx - mall));
    const acc_t lse = mall + dev_log(se);
    acc_t sc = 0;
    for (int j = lane; j < k; j += kWarp) {
      const acc_t cj = c[j];
      kl += (cj == acc_t(0) ? acc_t(0) : cj * dev_log(cj)) - cj * (static_cast<acc_t>(z[j]) - lse);
      sc += cj;
    }
    kl = warp_sum(kl);
    sc = warp_sum(sc);
    ce = lse - static_cast<acc_t>(z[y]);
    if (clean && e_pad != nullptr) {  // the gradient of this row waits for G (head_gn_kernel)
      for (int j = lane; j < kp; j += kWarp)
        e_pad[i * kp + j] = j < k ? dev_exp(static_cast<acc_t>(z[j]) - lse) - c[j] : acc_t(0);
      if (lane == 0) lse_out[i] = lse;
    } else {
      const acc_t wce = weights[clean ? 0 : 2] / acc_t(b), wkl = weights[clean ? 1 : 3] / acc_t(b);
      for (int j = lane; j < k; j += kWarp) {
        const acc_t p = dev_exp(static_cast<acc_t>(z[j]) - lse);
        grad_logits[r * k + j] = static_cast<scalar_t>(wce * (p - acc_t(j == y)) + wkl * (p * sc - c[j]));
      }
    }
  }
  if (lane == 0) {
    red[0][warp] = clean ? ce : acc_t(0);
    red[1][warp] = clean ? kl : acc_t(0);
    red[2][warp] = clean ? acc_t(0) : ce;
    red[3][warp] = clean ? acc_t(0) : kl;
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    acc_t t = 0;
    for (int w = 0; w < kRowsPerBlock; ++w) t += red[threadIdx.x][w];
    partial[int64_t(blockIdx.x) * 4 + threadIdx.x] = t;
  }
}

// Partial G_ext = E^T Phi_ext over one slice of rows, Phi_ext = [Phi, 1] with a head bias (its last column
// gives s = sum_i e_i, so that ||G_ext||^2 = ||G||^2 + ||s||^2 and G_ext phi_ext_i = G phi_i + s).
// grid (ceil(De / kGramThreads), Kp / kGramK, splits); each thread keeps kGramK classes of one column.
template <typename scalar_t, typename acc_t>
__global__ void head_gram_kernel(const acc_t* __restrict__ e_pad,   // [B, Kp]
                                 const scalar_t* __restrict__ phi,  // [B, D]
                                 acc_t* __restrict__ partial,       // [splits, Kp, De]
                                 int64_t b, int d, int de, int kp, int64_t rows_per_split) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= de) return;
  const int k0 = blockIdx.y * kGramK;
  const int64_t i0 = int64_t(blockIdx.z) * rows_per_split;
  const int64_t i1 = i0 + rows_per_split < b ? i0 + rows_per_split : b;
  acc_t acc[kGramK];
#pragma unroll
  for (int t = 0; t < kGramK; ++t) acc[t] = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const acc_t x = col < d ? static_cast<acc_t>(phi[i * d + col]) : acc_t(1);
    const acc_t* e = e_pad + i * kp + k0;  // the same kGramK values for the whole block: broadcast loads
#pragma unroll
    for (int t = 0; t < kGramK; ++t) acc[t] += e[t] * x;
  }
  acc_t* out = partial + (int64_t(blockIdx.z) * kp + k0) * de + col;
#pragma unroll
  for (int t = 0; t < kGramK; ++t) out[int64_t(t) * de] = acc[t];
}

// G_ext [K, De] = the sum of the slices' partials (the padding classes k >= K are dropped), and one partial
// sum of ||G_ext||^2 per block.
template <typename acc_t>
__global__ void head_gram_reduce_kernel(const acc_t* __restrict__ partial,  // [splits, Kp, De]
                                        acc_t* __restrict__ g,              // [K, De]
                                        acc_t* __restrict__ sq_partial,     // [gridDim.x]
                                        int splits, int64_t size, int64_t split_stride) {
  __shared__ acc_t smem[kWarp];
  acc_t sq = 0;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < size;
       idx += int64_t(gridDim.x) * blockDim.x) {
    acc_t v = 0;
    for (int s = 0; s < splits; ++s) v += partial[s * split_stride + idx];
    g[idx] = v;
    sq += v * v;
  }
  sq = block_sum(sq, smem);
  if (threadIdx.x == 0) sq_partial[blockIdx.x] = sq;
}

// One block: the terms, the loss and (with features) the grad-norm scale a = w_gn / (B sqrt S).
template <typename acc_t>
__global__ void head_finalize_kernel(const acc_t* __restrict__ row_partial,  // [row_blocks, 4]
                                     int row_blocks,
                                     const acc_t* __restrict__ sq_partial,  // [sq_blocks]
                                     int sq_blocks,
                                     const acc_t* __restrict__ weights,  // [5]
                                     int64_t b,
                                     acc_t* __restrict__ loss,   // []
                                     acc_t* __restrict__ terms,  // [5]
                                     acc_t* __restrict__ scale)  // [1], nullptr without features
{
  __shared__ acc_t smem[kWarp];
  acc_t s[4] = {0, 0, 0, 0};
  acc_t sq = 0;
  for (int j = threadIdx.x; j < row_blocks; j += blockDim.x)
    for (int t = 0; t < 4; ++t) s[t] += row_partial[int64_t(j) * 4 + t];
  for (int j = threadIdx.x; j < sq_blocks; j += blockDim.x) sq += sq_partial[j];
  for (int t = 0; t < 4; ++t) s[t] = block_sum(s[t], smem);
  sq = block_sum(sq, smem);
  if (threadIdx.x == 0) {
    const acc_t bf = acc_t(b), root = sqrt(sq);
    const acc_t t5[5] = {s[0] / bf, s[1] / bf, s[2] / bf, s[3] / bf, root / bf};
    acc_t total = 0;
    for (int t = 0; t < 5; ++t) {
      terms[t] = t5[t];
      total += weights[t] * t5[t];
    }
    *loss = total;
    if (scale != nullptr) *scale = sq > acc_t(0) ? weights[4] / (bf * root) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void head_gn_kernel(const scalar_t* __restrict__ logits,  // [N, K], clean rows first
                               const acc_t* __restrict__ condition,     // [B, K]
                               const int64_t* __restrict__ labels,   // [B]
                               const scalar_t* __restrict__ phi,     // [B, D]
                               const acc_t* __restrict__ e_pad,      // [B, Kp]
                               const acc_t* __restrict__ lse,        // [B]
                               const acc_t* __restrict__ g,          // [K, De]
                               const acc_t* __restrict__ weights,    // [5]
                               const acc_t* __restrict__ scale,      // [1]
                               acc_t* __restrict__ m_buf,            // [B, K] scratch
                               scalar_t* __restrict__ grad_logits,   // [N, K]
                               scalar_t* __restrict__ grad_phi,      // [B, D]
                               int64_t b, int k, int kp, int d, int de) {
  __shared__ acc_t smem[kWarp];
  const int64_t i = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const scalar_t* z = logits + i * k;
  const acc_t* c = condition + i * k;
  const scalar_t* ph = phi + i * d;
  const acc_t* e = e_pad + i * kp;
  acc_t* m = m_buf + i * k;
  const acc_t a = *scale, l = lse[i];
  // m_ik = g_k . [phi_i, 1]: one warp per class
  for (int kk = warp; kk < k; kk += warps) {
    const acc_t* gk = g + int64_t(kk) * de;
    acc_t t = 0;
    for (int col = lane; col < de; col += kWarp) t += (col < d ? static_cast<acc_t>(ph[col]) : acc_t(1)) * gk[col];
    t = warp_sum(t);
    if (lane == 0) m[kk] = t;
  }
  __syncthreads();  // m is read by the whole block below
  acc_t sc = 0, mp = 0;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    sc += c[j];
    mp += m[j] * dev_exp(static_cast<acc_t>(z[j]) - l);
  }
  sc = block_sum(sc, smem);
  mp = block_sum(mp, smem);
  const int64_t y = labels[i];
  const acc_t wce = weights[0] / acc_t(b), wkl = weights[1] / acc_t(b);
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const acc_t p = dev_exp(static_cast<acc_t>(z[j]) - l);
    grad_logits[i * k + j] =
        static_cast<scalar_t>(wce * (p - acc_t(j == y)) + wkl * (p * sc - c[j]) + a * p * (m[j] - mp));
  }
  for (int col = threadIdx.x; col < d; col += blockDim.x) {
    acc_t t = 0;
    for (int kk = 0; kk < k; ++kk) t += e[kk] * g[int64_t(kk) * de + col];
    grad_phi[i * d + col] = static_cast<scalar_t>(a * t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_loss_cuda(
    const at::Tensor& logits, const at::Tensor& condition, const at::Tensor& labels,
    const std::optional<at::Tensor>& features, const at::Tensor& weights, bool head_bias) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const HeadLossInputs in = prepare_head_loss(logits, condition, labels, features, weights);
  TORCH_CHECK(in.k < (1 << 30) && in.d < (1 << 30), "head_loss: K and D must be < 2^30");
  const bool gn = in.features.defined();
  const int64_t n = in.n, b = in.b;
  const int k = int(in.k), d = int(in.d);
  const int kp = (k + kGramK - 1) / kGramK * kGramK;
  const int de = d + (head_bias ? 1 : 0);
  const auto acc_opts = in.condition.options();
  at::Tensor loss = at::empty({}, acc_opts);
  at::Tensor terms = at::empty({5}, acc_opts);
  at::Tensor grad_logits = at::empty_like(in.logits);
  at::Tensor grad_features = gn ? at::empty_like(in.features) : at::empty({0}, logits.options());

  // Launch shapes, and the Gram product's split of the rows: about two blocks per SM in all.
  const int row_blocks = int((n + kRowsPerBlock - 1) / kRowsPerBlock);
  const int col_blocks = (de + kGramThreads - 1) / kGramThreads, k_blocks = kp / kGramK;
  int64_t splits = 1, rows_per_split = b;
  int reduce_blocks = 0;
  if (gn) {
    const int64_t want = std::max<int64_t>(1, 2 * int64_t(sm_count()) / (int64_t(col_blocks) * k_blocks));
    splits = std::min<int64_t>(want, (b + 31) / 32);
    rows_per_split = (b + splits - 1) / splits;
    splits = (b + rows_per_split - 1) / rows_per_split;
    reduce_blocks = grid_size(int64_t(k) * de, kReduceThreads, 4);
  }
  // One workspace in the accumulation dtype, carved below.
  const int64_t n_part = int64_t(row_blocks) * 4;
  const int64_t n_e = gn ? b * kp : 0, n_lse = gn ? b : 0, n_gpart = gn ? splits * kp * de : 0;
  const int64_t n_g = gn ? int64_t(k) * de : 0, n_sq = reduce_blocks, n_scale = gn ? 1 : 0, n_m = gn ? b * k : 0;
  at::Tensor ws = at::empty({n_part + n_e + n_lse + n_gpart + n_g + n_sq + n_scale + n_m}, acc_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "head_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* part = ws.mutable_data_ptr<acc_t>();
    acc_t* e_pad = gn ? part + n_part : nullptr;
    acc_t* lse = gn ? e_pad + n_e : nullptr;
    acc_t* gpart = gn ? lse + n_lse : nullptr;
    acc_t* g = gn ? gpart + n_gpart : nullptr;
    acc_t* sq = gn ? g + n_g : nullptr;
    acc_t* scale = gn ? sq + n_sq : nullptr;
    acc_t* m = gn ? scale + n_scale : nullptr;
    const scalar_t* z = in.logits.const_data_ptr<scalar_t>();
    const acc_t* c = in.condition.const_data_ptr<acc_t>();
    const int64_t* y = in.labels.const_data_ptr<int64_t>();
    const acc_t* w = in.weights.const_data_ptr<acc_t>();
    scalar_t* gz = grad_logits.mutable_data_ptr<scalar_t>();

    head_rows_kernel<scalar_t, acc_t><<<row_blocks, kRowsPerBlock * kWarp, 0, stream>>>(
        z, c, y, w, gz, e_pad, lse, part, n, b, k, kp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (gn) {
      const scalar_t* phi = in.features.const_data_ptr<scalar_t>();
      head_gram_kernel<scalar_t, acc_t><<<dim3(col_blocks, k_blocks, unsigned(splits)), kGramThreads, 0, stream>>>(
          e_pad, phi, gpart, b, d, de, kp, rows_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      head_gram_reduce_kernel<acc_t><<<reduce_blocks, kReduceThreads, 0, stream>>>(
          gpart, g, sq, int(splits), int64_t(k) * de, int64_t(kp) * de);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    head_finalize_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
        part, row_blocks, sq, reduce_blocks, w, b, loss.mutable_data_ptr<acc_t>(), terms.mutable_data_ptr<acc_t>(),
        scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (gn) {
      head_gn_kernel<scalar_t, acc_t><<<unsigned(b), kGnThreads, 0, stream>>>(
          z, c, y, in.features.const_data_ptr<scalar_t>(), e_pad, lse, g, w, scale, m, gz,
          grad_features.mutable_data_ptr<scalar_t>(), b, k, kp, d, de);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, terms, grad_logits.to(logits.scalar_type()),
          gn ? grad_features.to(features->scalar_type()) : grad_features};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tldr_fast, CUDA, m) { m.impl("head_loss", &cuda::head_loss_cuda); }

}  // namespace tldr_fast
