// colour_line, CPU: the variance of each image's colours off their principal line and its elementwise backward
// (tldr_fast/ops/colour_line.py declares both ops; the 3 x 3 solve is colour::principal_line, ../colour_line.h).
//
// x [B, 3, N] (N = H W, contiguous). Per image i, one task: the fp64 sums of d_p = x_p - K (K = the image's
// first pixel) and of d_p d_p^T, then principal_line -> value_i, coef[i] = (m_i, v_i); value = (1/B) sum_i
// value_i, summed in order (the result does not depend on the thread count).
//   colour_line_backward(grad, x, coef): d/dx_p = grad (2 / (B N)) ((x_p - m_i) - v_i (v_i . (x_p - m_i))), in
//   x's dtype; tasks = images.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../colour_line.h"
#include "../common.h"

namespace tldr_fast {
namespace {

template <typename scalar_t>
void colour_line_cpu_kernel(const at::Tensor& x, at::Tensor& value, at::Tensor& coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = x.size(0), n = x.size(2) * x.size(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();  // [B, 3, N]
  acc_t* cp = coef.mutable_data_ptr<acc_t>();         // [B, 2, 3]
  std::vector<double> per_image(b);
  at::parallel_for(0, b, parallel_grain(3 * n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* __restrict__ r = xp + i * 3 * n;
      const scalar_t* __restrict__ g = r + n;
      const scalar_t* __restrict__ bl = g + n;
      const double k[3] = {double(acc_t(r[0])), double(acc_t(g[0])), double(acc_t(bl[0]))};
      double s0 = 0, s1 = 0, s2 = 0, s00 = 0, s01 = 0, s02 = 0, s11 = 0, s12 = 0, s22 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s00, s01, s02, s11, s12, s22)
      for (int64_t p = 0; p < n; ++p) {
        const double d0 = double(acc_t(r[p])) - k[0], d1 = double(acc_t(g[p])) - k[1], d2 = double(acc_t(bl[p])) - k[2];
        s0 += d0;
        s1 += d1;
        s2 += d2;
        s00 += d0 * d0;
        s01 += d0 * d1;
        s02 += d0 * d2;
        s11 += d1 * d1;
        s12 += d1 * d2;
        s22 += d2 * d2;
      }
      const double s[3] = {s0, s1, s2}, ss[6] = {s00, s01, s02, s11, s12, s22};
      double m[3], v[3];
      per_image[i] = colour::principal_line(s, ss, k, double(n), m, v);
      for (int c = 0; c < 3; ++c) {
        cp[i * 6 + c] = static_cast<acc_t>(m[c]);
        cp[i * 6 + 3 + c] = static_cast<acc_t>(v[c]);
      }
    }
  });
  double total = 0;
  for (int64_t i = 0; i < b; ++i) total += per_image[i];
  *value.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total / double(b));
}

template <typename scalar_t>
void colour_line_backward_cpu_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& coef,
                                     at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = x.size(0), n = x.size(2) * x.size(3);
  const acc_t scale = *grad.const_data_ptr<acc_t>() * static_cast<acc_t>(2.0 / (double(b) * double(n)));
  const acc_t* __restrict__ cp = coef.const_data_ptr<acc_t>();  // [B, 2, 3]
  const scalar_t* xp = x.const_data_ptr<scalar_t>();           // [B, 3, N]
  scalar_t* op = out.mutable_data_ptr<scalar_t>();             // [B, 3, N]
  at::parallel_for(0, b, parallel_grain(3 * n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t* c = cp + i * 6;
      const acc_t m0 = c[0], m1 = c[1], m2 = c[2], v0 = c[3], v1 = c[4], v2 = c[5];
      const scalar_t* __restrict__ x0 = xp + i * 3 * n;
      const scalar_t* __restrict__ x1 = x0 + n;
      const scalar_t* __restrict__ x2 = x1 + n;
      scalar_t* __restrict__ o0 = op + i * 3 * n;
      scalar_t* __restrict__ o1 = o0 + n;
      scalar_t* __restrict__ o2 = o1 + n;
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) {
        const acc_t d0 = acc_t(x0[p]) - m0, d1 = acc_t(x1[p]) - m1, d2 = acc_t(x2[p]) - m2;
        const acc_t t = v0 * d0 + v1 * d1 + v2 * d2;
        o0[p] = static_cast<scalar_t>(scale * (d0 - v0 * t));
        o1[p] = static_cast<scalar_t>(scale * (d1 - v1 * t));
        o2[p] = static_cast<scalar_t>(scale * (d2 - v2 * t));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> colour_line_cpu(const at::Tensor& images) {
  const at::Tensor x = prepare_colour_line(images);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  at::Tensor value = at::empty({}, x.options().dtype(acc));
  at::Tensor coef = at::empty({x.size(0), 2, 3}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "colour_line_cpu", [&] {
    colour_line_cpu_kernel<scalar_t>(x, value, coef);
  });
  return {value, coef};
}

at::Tensor colour_line_backward_cpu(const at::Tensor& grad, const at::Tensor& images, const at::Tensor& coef) {
  const at::Tensor x = prepare_colour_line(images);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor g = prepare_scalar_grad(grad, x, acc);
  const at::Tensor k = prepare_small(coef, "coef", {x.size(0), 2, 3}, "[B, 2, 3]", "B", x.size(0), x, acc);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "colour_line_backward_cpu", [&] {
    colour_line_backward_cpu_kernel<scalar_t>(g, x, k, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tldr_fast, CPU, m) {
  m.impl("colour_line", &colour_line_cpu);
  m.impl("colour_line_backward", &colour_line_backward_cpu);
}

}  // namespace tldr_fast
