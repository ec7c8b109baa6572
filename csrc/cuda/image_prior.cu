// image_prior, CUDA: the formulas and the gradient are those of image_prior.cpp.
//
// Launches:
//   image_prior_kernel           grid-stride over packs of VEC pixels of one image row (16-byte loads and
//                                stores when W allows): TV and Pix partial sums per block, gradient written
//                                in the same pass (it needs no global quantity: only the weights)
//   image_prior_finalize_kernel  one block: the terms and the loss
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
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

template <typename scalar_t, int VEC>
__global__ void image_prior_kernel(const scalar_t* __restrict__ x,  // [B*C*H, W]
                                   scalar_t* __restrict__ grad,     // [B*C*H, W]
                                   const at::opmath_type<scalar_t>* __restrict__ weights,  // [2]
                                   at::opmath_type<scalar_t>* __restrict__ partial,        // [gridDim.x, 2]: tv, pix
                                   int64_t rows, int h, int w, int64_t b, double lo_, double hi_) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ acc_t smem[kWarp];
  const acc_t lo = acc_t(lo_), hi = acc_t(hi_);
  const acc_t ctv = weights[0] * acc_t(2) / acc_t(b), cpix = weights[1];
  const int64_t packs = w / VEC, total = rows * packs;
  acc_t tv = 0, pix = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t row = idx / packs;
    const int col = int(idx - row * packs) * VEC;
    const int hh = int(row % h);
    const scalar_t* rp = x + row * w + col;
    // missing neighbours (image border) are the pixel itself: their difference is 0
    const P c = *reinterpret_cast<const P*>(rp);
    const P up = hh > 0 ? *reinterpret_cast<const P*>(rp - w) : c;
    const P dn = hh + 1 < h ? *reinterpret_cast<const P*>(rp + w) : c;
    const acc_t left = col > 0 ? static_cast<acc_t>(rp[-1]) : static_cast<acc_t>(c.v[0]);
    const acc_t right = col + VEC < w ? static_cast<acc_t>(rp[VEC]) : static_cast<acc_t>(c.v[VEC - 1]);
    P out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t v = static_cast<acc_t>(c.v[j]);
      const acc_t l = j > 0 ? static_cast<acc_t>(c.v[j - 1]) : left;
      const acc_t r = j + 1 < VEC ? static_cast<acc_t>(c.v[j + 1]) : right;
      const acc_t u = static_cast<acc_t>(up.v[j]), d = static_cast<acc_t>(dn.v[j]);
      tv += (d - v) * (d - v) + (r - v) * (r - v);
      pix += relu(v - hi) + relu(lo - v);
      out.v[j] = static_cast<scalar_t>(ctv * (4 * v - u - d - l - r) + cpix * (acc_t(v > hi) - acc_t(v < lo)));
    }
    *reinterpret_cast<P*>(grad + row * w + col) = out;
  }
  tv = block_sum(tv, smem);
  pix = block_sum(pix, smem);
  if (threadIdx.x == 0) {
    partial[2 * int64_t(blockIdx.x)] = tv;
    partial[2 * int64_t(blockIdx.x) + 1] = pix;
  }
}

template <typename acc_t>
__global__ void image_prior_finalize_kernel(const acc_t* __restrict__ partial,  // [blocks, 2]
                                            int blocks,
                                            const acc_t* __restrict__ weights,  // [2]
                                            int64_t b,
                                            acc_t* __restrict__ loss,    // []
                                            acc_t* __restrict__ terms) {  // [2]
  __shared__ acc_t smem[kWarp];
  acc_t tv = 0, pix = 0;
  for (int j = threadIdx.x; j < blocks; j += blockDim.x) {
    tv += partial[2 * int64_t(j)];
    pix += partial[2 * int64_t(j) + 1];
  }
  tv = block_sum(tv, smem);
  pix = block_sum(pix, smem);
  if (threadIdx.x == 0) {
    tv /= acc_t(b);
    terms[0] = tv;
    terms[1] = pix;
    *loss = weights[0] * tv + weights[1] * pix;
  }
}

// The widest pack (<= 16 bytes) that divides W and keeps both pointers aligned: VEC, VEC/2, ..., 1.
template <typename scalar_t, int VEC = int(16 / sizeof(scalar_t))>
void launch_image_prior(const scalar_t* x, scalar_t* grad, const at::opmath_type<scalar_t>* weights,
                        at::opmath_type<scalar_t>* partial, int blocks, int64_t rows, int h, int w, int64_t b,
                        double lo, double hi, cudaStream_t stream) {
  if constexpr (VEC > 1) {
    const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % (VEC * sizeof(scalar_t)) == 0; };
    if (w % VEC != 0 || !aligned(x) || !aligned(grad)) {
      launch_image_prior<scalar_t, VEC / 2>(x, grad, weights, partial, blocks, rows, h, w, b, lo, hi, stream);
      return;
    }
  }
  image_prior_kernel<scalar_t, VEC><<<blocks, kThreads, 0, stream>>>(x, grad, weights, partial, rows, h, w, b, lo, hi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> image_prior_cuda(const at::Tensor& images, const at::Tensor& weights,
                                                                double lo, double hi) {
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor x = prepare_image_prior(images);
  TORCH_CHECK(x.size(2) < (1 << 30) && x.size(3) < (1 << 30), "image_prior: H and W must be < 2^30");
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor w = prepare_weights(weights, 2, x, acc);
  const int64_t b = x.size(0), rows = x.size(0) * x.size(1) * x.size(2);
  const int h = int(x.size(2)), wd = int(x.size(3));
  at::Tensor loss = at::empty({}, x.options().dtype(acc));
  at::Tensor terms = at::empty({2}, x.options().dtype(acc));
  at::Tensor grad = at::empty_like(x);
  // grid sized for the widest pack; a narrower pack only gives each thread more iterations
  const int blocks = grid_size(x.numel() / (16 / x.element_size()) + 1, kThreads);
  at::Tensor partial = at::empty({blocks, 2}, x.options().dtype(acc));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "image_prior_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_image_prior<scalar_t>(x.const_data_ptr<scalar_t>(), grad.mutable_data_ptr<scalar_t>(),
                                 w.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>(), blocks, rows, h, wd, b,
                                 lo, hi, stream);
    image_prior_finalize_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), blocks, w.const_data_ptr<acc_t>(), b, loss.mutable_data_ptr<acc_t>(),
        terms.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, terms, grad};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tldr_fast, CUDA, m) { m.impl("image_prior", &cuda::image_prior_cuda); }

}  // namespace tldr_fast
