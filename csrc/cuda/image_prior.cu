// image_prior, CUDA: the formulas and the gradient are those of image_prior.cpp.
//
// One kernel, image_prior_kernel, walks the images by packs of VEC pixels of one image row (16-byte loads and
// stores when W allows), grid-stride, in one of three passes:
//   kPlain  (without moments) TV and Pix partial sums per block, gradient written in the same pass (it needs
//           no global quantity: only the weights)
//   kStats  (with moments) grid (blocks, C): block (., c) walks the rows of channel c; TV, Pix and the
//           channel's shifted sums sum (v - K_c), sum (v - K_c)^2 per block; no gradient
//   kGrad   (with moments) the same walk, writing the whole gradient, Moments' part alpha_c + beta_c (v - M_c)
//           included (one rounding of the gradient); no sums
// Launches: kPlain, image_prior_finalize_kernel (one block: the terms and the loss); with moments kStats,
// image_prior_finalize_kernel (also per channel the mean, the variance, the Moments term and alpha, beta, M),
// kGrad. Without moments the op costs what it did before the Moments term.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../common.h"
#include "common.cuh"

namespace tldr_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kFinalThreads = 512;

template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t x) {
  return x > acc_t(0) ? x : acc_t(0);
}

enum class Pass { kPlain, kStats, kGrad };

template <typename scalar_t, int VEC, Pass PASS>
__global__ void image_prior_kernel(const scalar_t* __restrict__ x,  // [B*C*H, W]
                                   scalar_t* __restrict__ grad,     // [B*C*H, W]
                                   const at::opmath_type<scalar_t>* __restrict__ weights,  // [3]
                                   const at::opmath_type<scalar_t>* __restrict__ coef,     // kGrad: [C, 3] alpha, beta, M
                                   at::opmath_type<scalar_t>* __restrict__ partial,  // kPlain: [blocks, 2] tv, pix;
                                                                                     // kStats: [C * blocks, 4] + s1, s2
                                   int64_t rows,  // rows a block column walks: B*C*H (kPlain), B*H (channel c)
                                   int h, int w, int c, int64_t b, double lo_, double hi_) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ acc_t smem[kWarp];
  const acc_t lo = acc_t(lo_), hi = acc_t(hi_);
  const acc_t ctv = weights[0] * acc_t(2) / acc_t(b), cpix = weights[1];
  const int ch = blockIdx.y;  // kStats, kGrad: the channel of this block's rows
  // kStats: the shift K_c = x[0, c, 0, 0]; kGrad: the channel's Moments coefficients
  const acc_t shift = PASS == Pass::kStats ? static_cast<acc_t>(x[int64_t(ch) * h * w]) : acc_t(0);
  const acc_t alpha = PASS == Pass::kGrad ? coef[3 * ch] : acc_t(0);
  const acc_t beta = PASS == Pass::kGrad ? coef[3 * ch + 1] : acc_t(0);
  const acc_t center = PASS == Pass::kGrad ? coef[3 * ch + 2] : acc_t(0);
  const int64_t packs = w / VEC, total = rows * packs;
  acc_t tv = 0, pix = 0, s1 = 0, s2 = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t q = idx / packs;  // the walk's q-th row
    const int col = int(idx - q * packs) * VEC;
    int64_t row;
    int hh;
    if constexpr (PASS == Pass::kPlain) {
      row = q;
      hh = int(q % h);
    } else {  // row hh of image q / h, channel ch
      const int64_t img = q / h;
      hh = int(q - img * h);
      row = (img * c + ch) * h + hh;
    }
    const scalar_t* rp = x + row * w + col;
    // missing neighbours (image border) are the pixel itself: their difference is 0
    const P cur = *reinterpret_cast<const P*>(rp);
    const P up = hh > 0 ? *reinterpret_cast<const P*>(rp - w) : cur;
    const P dn = hh + 1 < h ? *reinterpret_cast<const P*>(rp + w) : cur;
    const acc_t left = col > 0 ? static_cast<acc_t>(rp[-1]) : static_cast<acc_t>(cur.v[0]);
    const acc_t right = col + VEC < w ? static_cast<acc_t>(rp[VEC]) : static_cast<acc_t>(cur.v[VEC - 1]);
    P out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t v = static_cast<acc_t>(cur.v[j]);
      const acc_t l = j > 0 ? static_cast<acc_t>(cur.v[j - 1]) : left;
      const acc_t r = j + 1 < VEC ? static_cast<acc_t>(cur.v[j + 1]) : right;
      const acc_t u = static_cast<acc_t>(up.v[j]), d = static_cast<acc_t>(dn.v[j]);
      if constexpr (PASS != Pass::kGrad) {
        tv += (d - v) * (d - v) + (r - v) * (r - v);
        pix += relu(v - hi) + relu(lo - v);
      }
      if constexpr (PASS == Pass::kStats) {
        s1 += v - shift;
        s2 += (v - shift) * (v - shift);
      } else {
        acc_t g = ctv * (4 * v - u - d - l - r) + cpix * (acc_t(v > hi) - acc_t(v < lo));
        if constexpr (PASS == Pass::kGrad) g += alpha + beta * (v - center);
        out.v[j] = static_cast<scalar_t>(g);
      }
    }
    if constexpr (PASS != Pass::kStats) *reinterpret_cast<P*>(grad + row * w + col) = out;
  }
  if constexpr (PASS != Pass::kGrad) {
    constexpr int kCols = PASS == Pass::kStats ? 4 : 2;
    acc_t* part = partial + kCols * (int64_t(blockIdx.y) * gridDim.x + blockIdx.x);
    tv = block_sum(tv, smem);
    pix = block_sum(pix, smem);
    if constexpr (PASS == Pass::kStats) {
      s1 = block_sum(s1, smem);
      s2 = block_sum(s2, smem);
      if (threadIdx.x == 0) {
        part[2] = s1;
        part[3] = s2;
      }
    }
    if (threadIdx.x == 0) {
      part[0] = tv;
      part[1] = pix;
    }
  }
}

// Without moments (null): partial [blocks, 2]. With moments [2, C]: partial [C * blocks, 4] (blocks per
// channel), and per channel c, over its N = B H W pixels: M = K_c + s1 / N (the mean in pixel units),
// var = (s2 / N - (s1 / N)^2) / R^2, m = (M - lo) / R, s = sqrt(max(var, eps)), the term's part, and
// coef[c] = (alpha, beta, M) with alpha = w_2 2 (m - mu) / (C sigma^2 R N),
// beta = w_2 [var >= eps] 2 (s - sigma) / (s C sigma^2 R^2 N) (image_prior.cpp's derivation).
template <typename scalar_t>
__global__ void image_prior_finalize_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                            int blocks,
                                            const at::opmath_type<scalar_t>* __restrict__ weights,  // [3]
                                            int64_t b,
                                            const scalar_t* __restrict__ x,                         // the shifts K_c
                                            const at::opmath_type<scalar_t>* __restrict__ moments,  // [2, C] or null
                                            int c, int64_t hw, double lo, double hi,
                                            at::opmath_type<scalar_t>* __restrict__ loss,    // []
                                            at::opmath_type<scalar_t>* __restrict__ terms,   // [3]
                                            at::opmath_type<scalar_t>* __restrict__ coef) {  // [C, 3]
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kWarp];
  const int cols = moments != nullptr ? 4 : 2;
  const int64_t rows = moments != nullptr ? int64_t(blocks) * c : blocks;
  acc_t tv = 0, pix = 0, mom = 0;
  for (int64_t j = threadIdx.x; j < rows; j += blockDim.x) {
    tv += partial[cols * j];
    pix += partial[cols * j + 1];
  }
  tv = block_sum(tv, smem);
  pix = block_sum(pix, smem);
  if (moments != nullptr) {  // uniform: every thread takes part in the block sums
    const acc_t n = acc_t(b * hw), range = acc_t(hi - lo);
    for (int ch = 0; ch < c; ++ch) {
      acc_t s1 = 0, s2 = 0;
      for (int64_t j = threadIdx.x; j < blocks; j += blockDim.x) {
        s1 += partial[4 * (int64_t(ch) * blocks + j) + 2];
        s2 += partial[4 * (int64_t(ch) * blocks + j) + 3];
      }
      s1 = block_sum(s1, smem) / n;
      s2 = block_sum(s2, smem) / n;
      if (threadIdx.x == 0) {
        const acc_t center = static_cast<acc_t>(x[ch * hw]) + s1;
        const acc_t var = (s2 - s1 * s1 > acc_t(0) ? s2 - s1 * s1 : acc_t(0)) / (range * range);
        const acc_t m = (center - acc_t(lo)) / range;
        const acc_t sd = sqrt(var > acc_t(kMomentVarEps) ? var : acc_t(kMomentVarEps));
        const acc_t mu = moments[ch], sigma = moments[c + ch];
        mom += ((m - mu) * (m - mu) + (sd - sigma) * (sd - sigma)) / (sigma * sigma);
        const acc_t scale = weights[2] / (acc_t(c) * sigma * sigma * range * n);
        coef[3 * ch] = 2 * (m - mu) * scale;
        coef[3 * ch + 1] = var >= acc_t(kMomentVarEps) ? 2 * (sd - sigma) / (sd * range) * scale : acc_t(0);
        coef[3 * ch + 2] = center;
      }
    }
    mom /= acc_t(c);
  }
  if (threadIdx.x == 0) {
    tv /= acc_t(b);
    terms[0] = tv;
    terms[1] = pix;
    terms[2] = mom;
    *loss = weights[0] * tv + weights[1] * pix + weights[2] * mom;
  }
}

// The widest pack (launch_widest_pack) that divides W and keeps both pointers aligned.
template <typename scalar_t, Pass PASS>
void launch_image_prior(const scalar_t* x, scalar_t* grad, const at::opmath_type<scalar_t>* weights,
                        const at::opmath_type<scalar_t>* coef, at::opmath_type<scalar_t>* partial, dim3 grid,
                        int64_t rows, int h, int w, int c, int64_t b, double lo, double hi, cudaStream_t stream) {
  launch_widest_pack<scalar_t>(w, {x, grad}, [&](auto vec) {
    image_prior_kernel<scalar_t, decltype(vec)::value, PASS>
        <<<grid, kThreads, 0, stream>>>(x, grad, weights, coef, partial, rows, h, w, c, b, lo, hi);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> image_prior_cuda(const at::Tensor& images, const at::Tensor& weights,
                                                                double lo, double hi,
                                                                const std::optional<at::Tensor>& moments) {
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor x = prepare_image_prior(images);
  TORCH_CHECK(x.size(2) < (1 << 30) && x.size(3) < (1 << 30), "image_prior: H and W must be < 2^30");
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor w = prepare_weights(weights, 3, x, acc);
  const at::Tensor mom = moments.has_value() ? prepare_moments(*moments, x, acc) : at::Tensor();
  TORCH_CHECK(!mom.defined() || x.size(1) < 65536, "image_prior with moments: C must be < 65536");
  const int64_t b = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  const int h = int(x.size(2)), wd = int(x.size(3));
  at::Tensor loss = at::empty({}, x.options().dtype(acc));
  at::Tensor terms = at::empty({3}, x.options().dtype(acc));
  at::Tensor grad = at::empty_like(x);
  // grid sized for the widest pack; a narrower pack only gives each thread more iterations
  const int blocks = grid_size(x.numel() / (16 / x.element_size()) + 1, kThreads);
  const int per_channel = int((blocks + c - 1) / c);  // with moments: grid (per_channel, C)
  at::Tensor partial = mom.defined() ? at::empty({c * per_channel, 4}, x.options().dtype(acc))
                                     : at::empty({blocks, 2}, x.options().dtype(acc));
  at::Tensor coef = mom.defined() ? at::empty({c, 3}, x.options().dtype(acc)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "image_prior_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    if (!mom.defined()) {
      launch_image_prior<scalar_t, Pass::kPlain>(xp, gp, wp, nullptr, pp, dim3(blocks), b * c * h, h, wd, int(c), b, lo,
                                                 hi, stream);
    } else {
      launch_image_prior<scalar_t, Pass::kStats>(xp, gp, wp, nullptr, pp, dim3(per_channel, c), b * h, h, wd, int(c),
                                                 b, lo, hi, stream);
    }
    image_prior_finalize_kernel<scalar_t><<<1, kFinalThreads, 0, stream>>>(
        pp, mom.defined() ? per_channel : blocks, wp, b, xp, mom.defined() ? mom.const_data_ptr<acc_t>() : nullptr,
        int(c), hw, lo, hi, loss.mutable_data_ptr<acc_t>(), terms.mutable_data_ptr<acc_t>(),
        mom.defined() ? coef.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (mom.defined()) {
      launch_image_prior<scalar_t, Pass::kGrad>(xp, gp, wp, coef.const_data_ptr<acc_t>(), nullptr, dim3(per_channel, c),
                                                b * h, h, wd, int(c), b, lo, hi, stream);
    }
  });
  return {loss, terms, grad};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tldr_fast, CUDA, m) { m.impl("image_prior", &cuda::image_prior_cuda); }

}  // namespace tldr_fast
