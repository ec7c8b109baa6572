// mode_seek, CUDA: the formulas are those of mode_seek.cpp (x [B, P], z [B, Q] in the accumulation dtype,
// h = B // 2, pair i = rows (i, i + h)).
//
// One kernel, mode_seek_kernel, walks grid (h, blocks): block (i, j) walks pair i's two rows by packs of VEC
// elements (16-byte loads and stores when P allows), grid-stride over the pair's blocks, in one of two passes:
//   kStats  per block the fp64 sums sum |x_i - x_{i+h}| and sum |z_i - z_{i+h}| of its elements -> partial
//   kGrad   (mode_seek_backward) rows i, i + h = +-grad coef_i sign(x_i - x_{i+h}), in x's dtype
// mode_seek launches kStats, then mode_seek_finish_kernel (one block: per pair, a warp sums its blocks'
// partials into dx_i, dz_i and r_i = dx_i / dz_i; then S, coef and the value); mode_seek_backward launches kGrad
// (and zeroes the unpaired last row of an odd B). Each thread's walk and every reduction have a fixed order:
// the value is the same from run to run on a device.
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
constexpr int kMaxBlocksPerPair = 65535;  // gridDim.y

enum class Pass { kStats, kGrad };

template <typename scalar_t, int VEC, Pass PASS>
__global__ void mode_seek_kernel(const scalar_t* __restrict__ x,                        // [B, P]
                                 const at::opmath_type<scalar_t>* __restrict__ z,       // kStats: [B, Q]
                                 scalar_t* __restrict__ grad_x,                         // kGrad: [B, P]
                                 const at::opmath_type<scalar_t>* __restrict__ grad,    // kGrad: []
                                 const at::opmath_type<scalar_t>* __restrict__ coef,    // kGrad: [h]
                                 double* __restrict__ partial,                          // kStats: [h, blocks, 2]
                                 int64_t p, int64_t q, int64_t h) {
  using acc_t = at::opmath_type<scalar_t>;
  using Pk = Pack<scalar_t, VEC>;
  __shared__ double smem[kWarp];
  const int64_t pair = blockIdx.x;
  const acc_t gc = PASS == Pass::kGrad ? *grad * coef[pair] : acc_t(0);
  const int64_t off_a = pair * p, off_b = (pair + h) * p;
  const int64_t packs = p / VEC;
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  const int64_t start = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  double sx = 0, sz = 0;
  for (int64_t idx = start; idx < packs; idx += stride) {
    const Pk a = *reinterpret_cast<const Pk*>(x + off_a + idx * VEC);
    const Pk b = *reinterpret_cast<const Pk*>(x + off_b + idx * VEC);
    Pk oa, ob;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t d = static_cast<acc_t>(a.v[j]) - static_cast<acc_t>(b.v[j]);
      if constexpr (PASS == Pass::kStats) {
        sx += static_cast<double>(d < acc_t(0) ? -d : d);
      } else {
        const acc_t v = gc * (static_cast<acc_t>(d > acc_t(0)) - static_cast<acc_t>(d < acc_t(0)));
        oa.v[j] = static_cast<scalar_t>(v);
        ob.v[j] = static_cast<scalar_t>(-v);
      }
    }
    if constexpr (PASS == Pass::kGrad) {
      *reinterpret_cast<Pk*>(grad_x + off_a + idx * VEC) = oa;
      *reinterpret_cast<Pk*>(grad_x + off_b + idx * VEC) = ob;
    }
  }
  if constexpr (PASS == Pass::kStats) {
    const acc_t* za = z + pair * q;
    const acc_t* zb = z + (pair + h) * q;
    for (int64_t e = start; e < q; e += stride) {
      const acc_t d = za[e] - zb[e];
      sz += static_cast<double>(d < acc_t(0) ? -d : d);
    }
    sx = block_sum(sx, smem);
    sz = block_sum(sz, smem);
    if (threadIdx.x == 0) {
      double* part = partial + 2 * (pair * gridDim.y + blockIdx.y);
      part[0] = sx;
      part[1] = sz;
    }
  }
}

// partial [h, blocks, 2] -> per pair i (one warp: its lanes stride over the blocks, then a warp sum):
// dx_i = sx / P, dz_i = max(sz / Q, 1e-12), r_i = dx_i / dz_i (dz_i kept in partial[i, 0, 1] for the second
// loop: the same lane 0 reads it back); S = mean_i r_i (a block sum), coef [h] = -1 / (h P dz_i (S + 1e-5)^2),
// value [] = 1 / (S + 1e-5).
template <typename acc_t>
__global__ void mode_seek_finish_kernel(double* __restrict__ partial, int blocks, int64_t h, double p, double q,
                                        acc_t* __restrict__ value,  // []
                                        acc_t* __restrict__ coef) { // [h]
  __shared__ double smem[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  double sum_r = 0;  // lane 0 of each warp: its pairs' r_i
  for (int64_t i = warp; i < h; i += warps) {
    double tx = 0, tz = 0;
    for (int j = lane; j < blocks; j += kWarp) {
      tx += partial[2 * (i * blocks + j)];
      tz += partial[2 * (i * blocks + j) + 1];
    }
    tx = warp_sum(tx);
    tz = warp_sum(tz);
    if (lane == 0) {
      const double dz = fmax(tz / q, kModeSeekDzEps);
      sum_r += (tx / p) / dz;
      partial[2 * (i * blocks) + 1] = dz;
    }
  }
  const double se = block_sum(sum_r, smem) / static_cast<double>(h) + kModeSeekEps;
  if (lane == 0) {
    for (int64_t i = warp; i < h; i += warps) {
      const double dz = partial[2 * (i * blocks) + 1];
      coef[i] = static_cast<acc_t>(-1.0 / (static_cast<double>(h) * p * dz * se * se));
    }
  }
  if (threadIdx.x == 0) *value = static_cast<acc_t>(1.0 / se);
}

// The widest pack (launch_widest_pack) that divides P and keeps the pointers aligned.
template <typename scalar_t, Pass PASS>
void launch_mode_seek(const scalar_t* x, const at::opmath_type<scalar_t>* z, scalar_t* grad_x,
                      const at::opmath_type<scalar_t>* grad, const at::opmath_type<scalar_t>* coef, double* partial,
                      dim3 grid, int64_t p, int64_t q, int64_t h, cudaStream_t stream) {
  launch_widest_pack<scalar_t>(p, {x, grad_x}, [&](auto vec) {
    mode_seek_kernel<scalar_t, decltype(vec)::value, PASS>
        <<<grid, kThreads, 0, stream>>>(x, z, grad_x, grad, coef, partial, p, q, h);
  });
}

// Blocks per pair of the grid (h, blocks): the GPU filled (sized for the widest pack), and no more blocks than
// the pair's row has packs for.
int blocks_per_pair(const at::Tensor& x) {
  const int64_t h = x.size(0) / 2, p = x.size(1);
  const int64_t vec = 16 / x.element_size();
  const int64_t blocks = grid_size(2 * h * p / vec + 1, kThreads);
  const int64_t most = (p / vec + kThreads) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({(blocks + h - 1) / h, most, kMaxBlocksPerPair})));
}

std::tuple<at::Tensor, at::Tensor> mode_seek_cuda(const at::Tensor& images, const at::Tensor& latents) {
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor x = prepare_mode_seek_images(images);  // [B, P]
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor z = prepare_mode_seek_latents(latents, x, acc);  // [B, Q]
  const int64_t h = x.size(0) / 2, p = x.size(1), q = z.size(1);
  TORCH_CHECK(h < (int64_t(1) << 31), "mode_seek: B // 2 must be < 2^31 on CUDA, got ", h);
  at::Tensor value = at::empty({}, x.options().dtype(acc));
  at::Tensor coef = at::empty({h}, x.options().dtype(acc));
  const int blocks = blocks_per_pair(x);
  at::Tensor partial = at::empty({h, blocks, 2}, x.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mode_seek_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    double* pp = partial.mutable_data_ptr<double>();
    launch_mode_seek<scalar_t, Pass::kStats>(x.const_data_ptr<scalar_t>(), z.const_data_ptr<acc_t>(), nullptr,
                                             nullptr, nullptr, pp, dim3(unsigned(h), blocks), p, q, h, stream);
    mode_seek_finish_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
        pp, blocks, h, double(p), double(q), value.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {value, coef};
}

at::Tensor mode_seek_backward_cuda(const at::Tensor& grad, const at::Tensor& images, const at::Tensor& coef) {
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor x = prepare_mode_seek_images(images);  // [B, P]
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor g = prepare_scalar_grad(grad, x, acc);  // read on the device: no host sync
  const at::Tensor k = prepare_small(coef, "coef", {x.size(0) / 2}, "[h]", "h = B // 2", x.size(0) / 2, x, acc);
  const int64_t b = x.size(0), h = b / 2, p = x.size(1);
  TORCH_CHECK(h < (int64_t(1) << 31), "mode_seek: B // 2 must be < 2^31 on CUDA, got ", h);
  at::Tensor out = at::empty_like(x);
  if (b % 2 == 1) out.narrow(0, b - 1, 1).zero_();  // the unpaired last row (on the current stream)
  const int blocks = blocks_per_pair(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mode_seek_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_mode_seek<scalar_t, Pass::kGrad>(x.const_data_ptr<scalar_t>(), nullptr, out.mutable_data_ptr<scalar_t>(),
                                            g.const_data_ptr<acc_t>(), k.const_data_ptr<acc_t>(), nullptr,
                                            dim3(unsigned(h), blocks), p, 0, h, stream);
  });
  return out.view(images.sizes());
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tldr_fast, CUDA, m) {
  m.impl("mode_seek", &cuda::mode_seek_cuda);
  m.impl("mode_seek_backward", &cuda::mode_seek_backward_cuda);
}

}  // namespace tldr_fast
