// colour_line, CUDA: the formulas are those of colour_line.cpp (x [B, 3, N], N = H W; the 3 x 3 solve is
// colour::principal_line, ../colour_line.h).
//
// colour_line_kernel: one block per image; its threads stride over the pixels (a fixed order), each keeping the
// fp64 sums of d_p = x_p - K (K = the image's first pixel) and of d_p d_p^T; nine block sums; thread 0 solves the
// 3 x 3 problem and writes value_i and coef[i] = (m_i, v_i). colour_line_finish_kernel (one block) sums the per-image
// values in a fixed order: the value is the same from run to run on a device. colour_line_backward_kernel: grid
// (images, blocks over the pixels), elementwise, all three channels of a pixel per thread.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../colour_line.h"
#include "../common.h"
#include "common.cuh"

namespace tldr_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksY = 65535;  // gridDim.y

template <typename scalar_t>
__global__ void colour_line_kernel(const scalar_t* __restrict__ x,              // [B, 3, N]
                                   double* __restrict__ per_image,              // [B]
                                   at::opmath_type<scalar_t>* __restrict__ coef,  // [B, 2, 3]
                                   int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double smem[kWarp];
  const int64_t i = blockIdx.x;
  const scalar_t* r = x + i * 3 * n;
  const double k[3] = {double(acc_t(r[0])), double(acc_t(r[n])), double(acc_t(r[2 * n]))};
  double s[3] = {0, 0, 0}, ss[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t p = threadIdx.x; p < n; p += blockDim.x) {
    const double d0 = double(acc_t(r[p])) - k[0], d1 = double(acc_t(r[n + p])) - k[1],
                 d2 = double(acc_t(r[2 * n + p])) - k[2];
    s[0] += d0;
    s[1] += d1;
    s[2] += d2;
    ss[0] += d0 * d0;
    ss[1] += d0 * d1;
    ss[2] += d0 * d2;
    ss[3] += d1 * d1;
    ss[4] += d1 * d2;
    ss[5] += d2 * d2;
  }
#pragma unroll
  for (int j = 0; j < 3; ++j) s[j] = block_sum(s[j], smem);
#pragma unroll
  for (int j = 0; j < 6; ++j) ss[j] = block_sum(ss[j], smem);
  if (threadIdx.x == 0) {
    double m[3], v[3];
    per_image[i] = colour::principal_line(s, ss, k, double(n), m, v);
    for (int c = 0; c < 3; ++c) {
      coef[i * 6 + c] = static_cast<acc_t>(m[c]);
      coef[i * 6 + 3 + c] = static_cast<acc_t>(v[c]);
    }
  }
}

template <typename acc_t>
__global__ void colour_line_finish_kernel(const double* __restrict__ per_image, int64_t b, acc_t* __restrict__ value) {
  __shared__ double smem[kWarp];
  double t = 0;
  for (int64_t i = threadIdx.x; i < b; i += blockDim.x) t += per_image[i];
  t = block_sum(t, smem);
  if (threadIdx.x == 0) *value = static_cast<acc_t>(t / double(b));
}

template <typename scalar_t>
__global__ void colour_line_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad,  // []
                                            const scalar_t* __restrict__ x,                      // [B, 3, N]
                                            const at::opmath_type<scalar_t>* __restrict__ coef,  // [B, 2, 3]
                                            scalar_t* __restrict__ out,                          // [B, 3, N]
                                            int64_t n, double inv_bn2) {                         // 2 / (B N)
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x;
  const acc_t scale = *grad * static_cast<acc_t>(inv_bn2);
  const acc_t* c = coef + i * 6;
  const acc_t m0 = c[0], m1 = c[1], m2 = c[2], v0 = c[3], v1 = c[4], v2 = c[5];
  const scalar_t* r = x + i * 3 * n;
  scalar_t* o = out + i * 3 * n;
  for (int64_t p = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; p < n; p += int64_t(gridDim.y) * blockDim.x) {
    const acc_t d0 = acc_t(r[p]) - m0, d1 = acc_t(r[n + p]) - m1, d2 = acc_t(r[2 * n + p]) - m2;
    const acc_t t = v0 * d0 + v1 * d1 + v2 * d2;
    o[p] = static_cast<scalar_t>(scale * (d0 - v0 * t));
    o[n + p] = static_cast<scalar_t>(scale * (d1 - v1 * t));
    o[2 * n + p] = static_cast<scalar_t>(scale * (d2 - v2 * t));
  }
}

void check_batch(const at::Tensor& x) {
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31), "colour_line: B must be < 2^31 on CUDA, got ", x.size(0));
}

std::tuple<at::Tensor, at::Tensor> colour_line_cuda(const at::Tensor& images) {
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor x = prepare_colour_line(images);  // [B, 3, H, W]
  check_batch(x);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const int64_t b = x.size(0), n = x.size(2) * x.size(3);
  at::Tensor value = at::empty({}, x.options().dtype(acc));
  at::Tensor coef = at::empty({b, 2, 3}, x.options().dtype(acc));
  at::Tensor per_image = at::empty({b}, x.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "colour_line_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    colour_line_kernel<scalar_t><<<unsigned(b), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), per_image.mutable_data_ptr<double>(), coef.mutable_data_ptr<acc_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    colour_line_finish_kernel<acc_t><<<1, 512, 0, stream>>>(per_image.const_data_ptr<double>(), b,
                                                            value.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {value, coef};
}

at::Tensor colour_line_backward_cuda(const at::Tensor& grad, const at::Tensor& images, const at::Tensor& coef) {
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor x = prepare_colour_line(images);
  check_batch(x);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor g = prepare_scalar_grad(grad, x, acc);  // read on the device: no host sync
  const at::Tensor k = prepare_small(coef, "coef", {x.size(0), 2, 3}, "[B, 2, 3]", "B", x.size(0), x, acc);
  const int64_t b = x.size(0), n = x.size(2) * x.size(3);
  at::Tensor out = at::empty_like(x);
  const int blocks_y = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocksY));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "colour_line_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    colour_line_backward_kernel<scalar_t><<<dim3(unsigned(b), blocks_y), kThreads, 0, stream>>>(
        g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), k.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>(), n, 2.0 / (double(b) * double(n)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tldr_fast, CUDA, m) {
  m.impl("colour_line", &cuda::colour_line_cuda);
  m.impl("colour_line_backward", &cuda::colour_line_backward_cuda);
}

}  // namespace tldr_fast
