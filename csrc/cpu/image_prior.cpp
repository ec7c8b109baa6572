// image_prior, CPU: total variation and pixel-range penalty in one pass over the images, gradient written in
// the same pass.
//
// x [B, C, H, W]. With each missing neighbour replaced by the pixel itself (so that its difference is 0):
//   TV  = (1/B) sum (d - v)^2 + (r - v)^2          (v = x[h, w], d = x[h+1, w], r = x[h, w+1])
//   Pix = sum relu(v - hi) + relu(lo - v)
//   dTV/dv  = (2/B) (4 v - u - d - l - r)           (u = x[h-1, w], l = x[h, w-1]: the 4-neighbour Laplacian)
//   dPix/dv = [v > hi] - [v < lo]
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common.h"

namespace tldr_fast {
namespace {

template <typename scalar_t>
void image_prior_cpu_kernel(const at::Tensor& images, const at::Tensor& weights, double lo_, double hi_,
                            at::Tensor& loss, at::Tensor& terms, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = images.size(0), planes = b * images.size(1), h = images.size(2), wd = images.size(3);
  const scalar_t* x = images.const_data_ptr<scalar_t>();  // [B*C, H, W]
  scalar_t* g = grad.mutable_data_ptr<scalar_t>();        // [B*C, H, W]
  const acc_t* w = weights.const_data_ptr<acc_t>();       // [2]
  const acc_t lo = acc_t(lo_), hi = acc_t(hi_);
  const acc_t ctv = w[0] * acc_t(2) / acc_t(b), cpix = w[1];
  at::Tensor part = at::empty({planes, 2}, at::TensorOptions().dtype(at::kDouble));  // per plane: tv, pix
  double* pp = part.mutable_data_ptr<double>();

  // One image row: pixels [j0, j1) of `row`, whose left and right neighbours are at offsets -dl and +dr
  // (0 at the image border: a missing neighbour is the pixel itself). Branch-free, so that it vectorises.
  const auto run = [=](const scalar_t* __restrict__ row, const scalar_t* __restrict__ up,
                       const scalar_t* __restrict__ dn, scalar_t* __restrict__ out, int64_t j0, int64_t j1,
                       int64_t dl, int64_t dr, double& tv_out, double& pix_out) {
    acc_t tv = 0, pix = 0;
#pragma omp simd reduction(+ : tv, pix)
    for (int64_t j = j0; j < j1; ++j) {
      const acc_t v = row[j], l = row[j - dl], r = row[j + dr], u = up[j], d = dn[j];
      tv += (d - v) * (d - v) + (r - v) * (r - v);
      pix += std::max(v - hi, acc_t(0)) + std::max(lo - v, acc_t(0));
      out[j] = static_cast<scalar_t>(ctv * (4 * v - u - d - l - r) + cpix * (acc_t(v > hi) - acc_t(v < lo)));
    }
    tv_out += tv;
    pix_out += pix;
  };
  at::parallel_for(0, planes, parallel_grain(h * wd), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      double tv = 0, pix = 0;  // per plane; each row is summed in acc_t
      for (int64_t i = 0; i < h; ++i) {
        const scalar_t* row = x + (p * h + i) * wd;
        const scalar_t* up = i > 0 ? row - wd : row;
        const scalar_t* dn = i + 1 < h ? row + wd : row;
        scalar_t* out = g + (p * h + i) * wd;
        if (wd == 1) {
          run(row, up, dn, out, 0, 1, 0, 0, tv, pix);
        } else {
          run(row, up, dn, out, 0, 1, 0, 1, tv, pix);
          run(row, up, dn, out, 1, wd - 1, 1, 1, tv, pix);
          run(row, up, dn, out, wd - 1, wd, 1, 0, tv, pix);
        }
      }
      pp[2 * p] = tv;
      pp[2 * p + 1] = pix;
    }
  });

  double tv = 0, pix = 0;
  for (int64_t p = 0; p < planes; ++p) {
    tv += pp[2 * p];
    pix += pp[2 * p + 1];
  }
  acc_t* t = terms.mutable_data_ptr<acc_t>();
  t[0] = static_cast<acc_t>(tv / double(b));
  t[1] = static_cast<acc_t>(pix);
  *loss.mutable_data_ptr<acc_t>() = w[0] * t[0] + w[1] * t[1];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> image_prior_cpu(const at::Tensor& images, const at::Tensor& weights,
                                                               double lo, double hi) {
  const at::Tensor x = prepare_image_prior(images);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor w = prepare_weights(weights, 2, x, acc);
  at::Tensor loss = at::empty({}, x.options().dtype(acc));
  at::Tensor terms = at::empty({2}, x.options().dtype(acc));
  at::Tensor grad = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "image_prior_cpu", [&] {
    image_prior_cpu_kernel<scalar_t>(x, w, lo, hi, loss, terms, grad);
  });
  return {loss, terms, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(tldr_fast, CPU, m) { m.impl("image_prior", &image_prior_cpu); }

}  // namespace tldr_fast
