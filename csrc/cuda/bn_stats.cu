// bn_stats, CUDA: the formulas, the shift K_c and the rounding of the statistics are those of bn_stats.cpp.
//
// One kernel, bn_stats_kernel, walks grid (blocks, C): block (j, c) walks channel c's N planes of S elements by
// packs of VEC elements (16-byte loads and stores when S allows), grid-stride, in one of two passes:
//   kStats  per block the fp64 shifted sums sum (x - K_c), sum (x - K_c)^2 of its elements -> partial
//   kGrad   (bn_stats_backward) grad_x = grad (a_c + b_c (x - mean_c)), in x's dtype
// bn_stats launches kStats, then bn_stats_finish_kernel (one block: per channel, a warp sums its blocks' partials,
// then mu_c, var_c; then the two norms, coef and the value); bn_stats_backward launches kGrad. Each thread's walk
// and every reduction have a fixed order: the value is the same from run to run on a device.
// [N, C] (S = 1) reads channel c with stride C: uncoalesced, but such activations (a head's BatchNorm1d) are
// small next to the convolutions'.
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

enum class Pass { kStats, kGrad };

template <typename scalar_t, int VEC, Pass PASS>
__global__ void bn_stats_kernel(const scalar_t* __restrict__ x,                             // [N, C, S]
                                scalar_t* __restrict__ grad_x,                              // kGrad: [N, C, S]
                                const at::opmath_type<scalar_t>* __restrict__ grad,         // kGrad: []
                                const at::opmath_type<scalar_t>* __restrict__ mean,         // kGrad: [C]
                                const at::opmath_type<scalar_t>* __restrict__ coef,         // kGrad: [2, C] a, b
                                double* __restrict__ partial,                               // kStats: [C, blocks, 2]
                                int64_t n, int c, int64_t s) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ double smem[kWarp];
  const int ch = blockIdx.y;
  // kStats: the shift K_c = x[0, c, 0]; kGrad: the upstream gradient and the channel's coefficients
  const double shift = PASS == Pass::kStats ? static_cast<double>(static_cast<acc_t>(x[int64_t(ch) * s])) : 0.0;
  const acc_t g = PASS == Pass::kGrad ? *grad : acc_t(0);
  const acc_t a = PASS == Pass::kGrad ? coef[ch] : acc_t(0);
  const acc_t b = PASS == Pass::kGrad ? coef[c + ch] : acc_t(0);
  const acc_t center = PASS == Pass::kGrad ? mean[ch] : acc_t(0);
  const int64_t packs = s / VEC, total = n * packs;  // packs per plane, in the channel
  double s1 = 0, s2 = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t row = idx / packs;  // the plane (row, ch)
    const int64_t off = (row * c + ch) * s + (idx - row * packs) * VEC;
    const P v = *reinterpret_cast<const P*>(x + off);
    P out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if constexpr (PASS == Pass::kStats) {
        const double d = static_cast<double>(static_cast<acc_t>(v.v[j])) - shift;
        s1 += d;
        s2 += d * d;
      } else {
        out.v[j] = static_cast<scalar_t>(g * (a + b * (static_cast<acc_t>(v.v[j]) - center)));
      }
    }
    if constexpr (PASS == Pass::kGrad) *reinterpret_cast<P*>(grad_x + off) = out;
  }
  if constexpr (PASS == Pass::kStats) {
    s1 = block_sum(s1, smem);
    s2 = block_sum(s2, smem);
    if (threadIdx.x == 0) {
      double* part = partial + 2 * (int64_t(ch) * gridDim.x + blockIdx.x);
      part[0] = s1;
      part[1] = s2;
    }
  }
}

// partial [C, blocks, 2] -> per channel c (one warp: its lanes stride over the blocks, then a warp sum), over its
// M = N S elements: mu_c = K_c + s1 / M, var_c = s2 / M - (s1 / M)^2, both rounded to acc_t; then ||dm||, ||dv||
// (block sums) and coef [2, C] = (dm_c / (M ||dm||), 2 dv_c / (M ||dv||)) (0 where the norm is 0), value [] =
// ||dm|| + ||dv||.
template <typename scalar_t>
__global__ void bn_stats_finish_kernel(const double* __restrict__ partial, int blocks,
                                       const scalar_t* __restrict__ x,  // [N, C, S]: the shifts K_c
                                       int64_t s, int c, double m,
                                       const at::opmath_type<scalar_t>* __restrict__ running_mean,  // [C]
                                       const at::opmath_type<scalar_t>* __restrict__ running_var,   // [C]
                                       at::opmath_type<scalar_t>* __restrict__ value,               // []
                                       at::opmath_type<scalar_t>* __restrict__ mean,                // [C]
                                       at::opmath_type<scalar_t>* coef) {                           // [2, C]
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double smem[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  double sq_m = 0, sq_v = 0;  // lane 0 of each warp: its channels' dm^2, dv^2
  // coef[c + ch] holds var_c between the two loops (each channel stays with its warp's lane 0)
  for (int ch = warp; ch < c; ch += warps) {
    double t1 = 0, t2 = 0;
    for (int j = lane; j < blocks; j += kWarp) {
      t1 += partial[2 * (int64_t(ch) * blocks + j)];
      t2 += partial[2 * (int64_t(ch) * blocks + j) + 1];
    }
    t1 = warp_sum(t1);
    t2 = warp_sum(t2);
    if (lane == 0) {
      const double e1 = t1 / m;
      const double var = t2 / m - e1 * e1;
      const acc_t mean_c = static_cast<acc_t>(static_cast<double>(static_cast<acc_t>(x[int64_t(ch) * s])) + e1);
      const acc_t var_c = static_cast<acc_t>(var > 0.0 ? var : 0.0);
      mean[ch] = mean_c;
      coef[c + ch] = var_c;
      const double dm = static_cast<double>(mean_c) - static_cast<double>(running_mean[ch]);
      const double dv = static_cast<double>(var_c) - static_cast<double>(running_var[ch]);
      sq_m += dm * dm;
      sq_v += dv * dv;
    }
  }
  const double nm = sqrt(block_sum(sq_m, smem));
  const double nv = sqrt(block_sum(sq_v, smem));
  if (lane == 0) {
    for (int ch = warp; ch < c; ch += warps) {
      const double dm = static_cast<double>(mean[ch]) - static_cast<double>(running_mean[ch]);
      const double dv = static_cast<double>(coef[c + ch]) - static_cast<double>(running_var[ch]);
      coef[ch] = nm > 0.0 ? static_cast<acc_t>(dm / (m * nm)) : acc_t(0);
      coef[c + ch] = nv > 0.0 ? static_cast<acc_t>(2.0 * dv / (m * nv)) : acc_t(0);
    }
  }
  if (threadIdx.x == 0) *value = static_cast<acc_t>(nm + nv);
}

// The widest pack (launch_widest_pack) that divides S and keeps the pointers aligned.
template <typename scalar_t, Pass PASS>
void launch_bn_stats(const scalar_t* x, scalar_t* grad_x, const at::opmath_type<scalar_t>* grad,
                     const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* coef, double* partial,
                     dim3 grid, int64_t n, int c, int64_t s, cudaStream_t stream) {
  launch_widest_pack<scalar_t>(s, {x, grad_x}, [&](auto vec) {
    bn_stats_kernel<scalar_t, decltype(vec)::value, PASS>
        <<<grid, kThreads, 0, stream>>>(x, grad_x, grad, mean, coef, partial, n, c, s);
  });
}

// Blocks per channel of the grid (blocks, C): the GPU filled (sized for the widest pack), and no more blocks
// than the channel has packs for.
int blocks_per_channel(const at::Tensor& x) {
  const int64_t c = x.size(1), per_channel = x.numel() / c;
  const int64_t vec = 16 / x.element_size();
  const int64_t blocks = grid_size(x.numel() / vec + 1, kThreads);
  const int64_t most = (per_channel / vec + kThreads) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min((blocks + c - 1) / c, most)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& activations,
                                                             const at::Tensor& running_mean,
                                                             const at::Tensor& running_var) {
  const c10::cuda::CUDAGuard guard(activations.device());
  const at::Tensor x = prepare_bn_stats(activations);  // [N, C, S]
  TORCH_CHECK(x.size(1) < 65536, "bn_stats: C must be < 65536 on CUDA, got ", x.size(1));
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor rm = prepare_channel_stat(running_mean, "running_mean", x, acc);
  const at::Tensor rv = prepare_channel_stat(running_var, "running_var", x, acc);
  const int64_t n = x.size(0), s = x.size(2);
  const int c = int(x.size(1));
  at::Tensor value = at::empty({}, x.options().dtype(acc));
  at::Tensor mean = at::empty({c}, x.options().dtype(acc));
  at::Tensor coef = at::empty({2, c}, x.options().dtype(acc));
  const int blocks = blocks_per_channel(x);
  at::Tensor partial = at::empty({c, blocks, 2}, x.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    double* pp = partial.mutable_data_ptr<double>();
    launch_bn_stats<scalar_t, Pass::kStats>(xp, nullptr, nullptr, nullptr, nullptr, pp, dim3(blocks, c), n, c, s,
                                            stream);
    bn_stats_finish_kernel<scalar_t><<<1, kFinalThreads, 0, stream>>>(
        pp, blocks, xp, s, c, double(n * s), rm.const_data_ptr<acc_t>(), rv.const_data_ptr<acc_t>(),
        value.mutable_data_ptr<acc_t>(), mean.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {value, mean, coef};
}

at::Tensor bn_stats_backward_cuda(const at::Tensor& grad, const at::Tensor& activations, const at::Tensor& mean,
                                  const at::Tensor& coef) {
  const c10::cuda::CUDAGuard guard(activations.device());
  const at::Tensor x = prepare_bn_stats(activations);  // [N, C, S]
  TORCH_CHECK(x.size(1) < 65536, "bn_stats: C must be < 65536 on CUDA, got ", x.size(1));
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor g = prepare_scalar_grad(grad, x, acc);  // read on the device: no host sync
  const at::Tensor mu = prepare_channel_stat(mean, "mean", x, acc);
  const at::Tensor k = prepare_small(coef, "coef", {2, x.size(1)}, "[2, C]", "C", x.size(1), x, acc);
  const int64_t n = x.size(0), s = x.size(2);
  const int c = int(x.size(1));
  at::Tensor out = at::empty_like(x);
  const int blocks = blocks_per_channel(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_bn_stats<scalar_t, Pass::kGrad>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                           g.const_data_ptr<acc_t>(), mu.const_data_ptr<acc_t>(),
                                           k.const_data_ptr<acc_t>(), nullptr, dim3(blocks, c), n, c, s, stream);
  });
  return out.view(activations.sizes());
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(tldr_fast, CUDA, m) {
  m.impl("bn_stats", &cuda::bn_stats_cuda);
  m.impl("bn_stats_backward", &cuda::bn_stats_backward_cuda);
}

}  // namespace tldr_fast
