// mode_seek, CPU: the mode-seeking term of a paired batch and its elementwise backward (tldr_fast/ops/mode_seek.py
// declares both ops).
//
// x [B, P] (the images, contiguous), z [B, Q] (the latents, in the accumulation dtype), h = B // 2; pair i is rows
// (i, i + h), an unpaired last row of an odd B is left out:
//   dx_i = mean_p |x_i - x_{i+h}|,  dz_i = max(mean_q |z_i - z_{i+h}|, 1e-12),  S = mean_i dx_i / dz_i
//   value = 1 / (S + 1e-5),  coef_i = -1 / (h P dz_i (S + 1e-5)^2)                       (both in the acc dtype)
//   mode_seek_backward(grad, x, coef): d/dx_i = grad coef_i sign(x_i - x_{i+h}), d/dx_{i+h} = -that (sign(0) = 0,
//   as autograd's abs), 0 on the unpaired row; in x's dtype.
// The sums are fp64 (the pass is memory-bound either way), rounded once at the end.
//
// Forward: tasks = (pair, chunk of kChunk elements of the row), sized from the shape alone, each writing the fp64
// sum of its chunk into part[h, chunks]; the latents' sums per pair; then the chunks summed in order and the pairs
// in order. The result does not depend on the thread count. Backward: the same tasks, elementwise.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../common.h"

namespace tldr_fast {
namespace {

constexpr int64_t kChunk = 16384;

template <typename scalar_t>
void mode_seek_cpu_kernel(const at::Tensor& x, const at::Tensor& z, at::Tensor& value, at::Tensor& coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = x.size(0), p = x.size(1), q = z.size(1), h = b / 2;
  const int64_t chunk = std::min(p, kChunk), chunks = (p + chunk - 1) / chunk;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();  // [B, P]
  const acc_t* zp = z.const_data_ptr<acc_t>();        // [B, Q]
  std::vector<double> part(h * chunks);               // [h, chunks]: sum |x_i - x_{i+h}| over a chunk
  at::parallel_for(0, h * chunks, parallel_grain(chunk), [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t i = task / chunks, k = task % chunks;
      const int64_t e0 = k * chunk, len = std::min(p, e0 + chunk) - e0;
      const scalar_t* __restrict__ xa = xp + i * p + e0;
      const scalar_t* __restrict__ xb = xa + h * p;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t e = 0; e < len; ++e)
        s += std::abs(static_cast<double>(static_cast<acc_t>(xa[e])) - static_cast<double>(static_cast<acc_t>(xb[e])));
      part[task] = s;
    }
  });
  std::vector<double> dz(h);  // [h] max(mean |z_i - z_{i+h}|, eps)
  at::parallel_for(0, h, parallel_grain(q), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t* __restrict__ za = zp + i * q;
      const acc_t* __restrict__ zb = za + h * q;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t e = 0; e < q; ++e) s += std::abs(static_cast<double>(za[e]) - static_cast<double>(zb[e]));
      dz[i] = std::max(s / static_cast<double>(q), kModeSeekDzEps);
    }
  });
  double sum_r = 0;
  for (int64_t i = 0; i < h; ++i) {
    double sx = 0;
    for (int64_t k = 0; k < chunks; ++k) sx += part[i * chunks + k];
    sum_r += (sx / static_cast<double>(p)) / dz[i];
  }
  const double se = sum_r / static_cast<double>(h) + kModeSeekEps;
  acc_t* c = coef.mutable_data_ptr<acc_t>();  // [h]
  for (int64_t i = 0; i < h; ++i)
    c[i] = static_cast<acc_t>(-1.0 / (static_cast<double>(h) * static_cast<double>(p) * dz[i] * se * se));
  *value.mutable_data_ptr<acc_t>() = static_cast<acc_t>(1.0 / se);
}

// out [B, P]: rows i and i + h = +-grad coef_i sign(x_i - x_{i+h}), over the tasks (pair, chunk); the unpaired row 0.
template <typename scalar_t>
void mode_seek_backward_cpu_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& coef,
                                   at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = x.size(0), p = x.size(1), h = b / 2;
  const int64_t chunk = std::min(p, kChunk), chunks = (p + chunk - 1) / chunk;
  const acc_t g = *grad.const_data_ptr<acc_t>();            // []
  const acc_t* __restrict__ c = coef.const_data_ptr<acc_t>();  // [h]
  const scalar_t* xp = x.const_data_ptr<scalar_t>();        // [B, P]
  scalar_t* op = out.mutable_data_ptr<scalar_t>();          // [B, P]
  at::parallel_for(0, h * chunks, parallel_grain(chunk), [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t i = task / chunks, k = task % chunks;
      const int64_t e0 = k * chunk, len = std::min(p, e0 + chunk) - e0;
      const acc_t gc = g * c[i];
      const scalar_t* __restrict__ xa = xp + i * p + e0;
      const scalar_t* __restrict__ xb = xa + h * p;
      scalar_t* __restrict__ oa = op + i * p + e0;
      scalar_t* __restrict__ ob = oa + h * p;
#pragma omp simd
      for (int64_t e = 0; e < len; ++e) {
        const acc_t d = static_cast<acc_t>(xa[e]) - static_cast<acc_t>(xb[e]);
        const acc_t v = gc * (static_cast<acc_t>(d > acc_t(0)) - static_cast<acc_t>(d < acc_t(0)));
        oa[e] = static_cast<scalar_t>(v);
        ob[e] = static_cast<scalar_t>(-v);
      }
    }
  });
  if (b % 2 == 1) std::fill(op + (b - 1) * p, op + b * p, static_cast<scalar_t>(0));
}

std::tuple<at::Tensor, at::Tensor> mode_seek_cpu(const at::Tensor& images, const at::Tensor& latents) {
  const at::Tensor x = prepare_mode_seek_images(images);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor z = prepare_mode_seek_latents(latents, x, acc);
  at::Tensor value = at::empty({}, x.options().dtype(acc));
  at::Tensor coef = at::empty({x.size(0) / 2}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mode_seek_cpu", [&] {
    mode_seek_cpu_kernel<scalar_t>(x, z, value, coef);
  });
  return {value, coef};
}

at::Tensor mode_seek_backward_cpu(const at::Tensor& grad, const at::Tensor& images, const at::Tensor& coef) {
  const at::Tensor x = prepare_mode_seek_images(images);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor g = prepare_scalar_grad(grad, x, acc);
  const at::Tensor k = prepare_small(coef, "coef", {x.size(0) / 2}, "[h]", "h = B // 2", x.size(0) / 2, x, acc);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mode_seek_backward_cpu", [&] {
    mode_seek_backward_cpu_kernel<scalar_t>(g, x, k, out);
  });
  return out.view(images.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(tldr_fast, CPU, m) {
  m.impl("mode_seek", &mode_seek_cpu);
  m.impl("mode_seek_backward", &mode_seek_backward_cpu);
}

}  // namespace tldr_fast
