// image_prior, CPU: total variation and pixel-range penalty in one pass over the images, gradient written in
// the same pass; with moments, the Moments term in two passes (its gradient needs the batch's statistics).
//
// x [B, C, H, W]. With each missing neighbour replaced by the pixel itself (so that its difference is 0):
//   TV  = (1/B) sum (d - v)^2 + (r - v)^2          (v = x[h, w], d = x[h+1, w], r = x[h, w+1])
//   Pix = sum relu(v - hi) + relu(lo - v)
//   dTV/dv  = (2/B) (4 v - u - d - l - r)           (u = x[h-1, w], l = x[h, w-1]: the 4-neighbour Laplacian)
//   dPix/dv = [v > hi] - [v < lo]
// Moments, with R = hi - lo, x01 = (x - lo) / R and, per channel c over its N = B H W pixels, the mean m_c and
// the population variance var_c of x01, s_c = sqrt(max(var_c, eps)), (mu, sigma) = moments:
//   Moments = (1/C) sum_c ((m_c - mu_c)^2 + (s_c - sigma_c)^2) / sigma_c^2
//   dMoments/dv = [2 (m_c - mu_c) / N + [var_c >= eps] 2 (s_c - sigma_c) (x01 - m_c) / (N s_c)] / (C sigma_c^2 R)
//               = alpha_c + beta_c (v - M_c)      (M_c = lo + R m_c: the channel's mean in pixel units)
//   (dm/dx01 = 1/N, dvar/dx01 = 2 (x01 - m) / N, ds/dvar = [var >= eps] / (2 s): clamp_min passes the gradient
//   where var >= eps, as torch's does).
// Passes (image_prior_pass): kPlain (no moments) sums TV and Pix and writes the gradient; with moments, kStats
// sums TV, Pix and per plane the shifted sums sum (v - K_c), sum (v - K_c)^2 (K_c = x[0, c, 0, 0]: a value of
// the channel, so that var = E[(v-K)^2] - E[v-K]^2 does not cancel badly, and is exactly 0 on a flat channel),
// then the host finishes alpha, beta, M per channel and kGrad writes the whole gradient (one rounding).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../common.h"

namespace tldr_fast {
namespace {

enum class Pass { kPlain, kStats, kGrad };

// Per channel, the Moments part of the gradient: dMoments/dv * w_moments = alpha + beta (v - center).
template <typename acc_t>
struct MomentCoef {
  acc_t alpha, beta, center;
};

// One pass over the planes of x [B*C, H, W]. part [planes, 4] (kPlain, kStats): per plane tv, pix and (kStats)
// the shifted sums; coef [C] (kGrad).
template <typename scalar_t, Pass PASS>
void image_prior_pass(const at::Tensor& images, const at::opmath_type<scalar_t>* w, double lo_, double hi_,
                      const MomentCoef<at::opmath_type<scalar_t>>* coef, double* pp, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = images.size(0), c = images.size(1), planes = b * c, h = images.size(2), wd = images.size(3);
  const scalar_t* x = images.const_data_ptr<scalar_t>();  // [B*C, H, W]
  scalar_t* g = grad.mutable_data_ptr<scalar_t>();        // [B*C, H, W]
  const acc_t lo = acc_t(lo_), hi = acc_t(hi_);
  const acc_t ctv = w[0] * acc_t(2) / acc_t(b), cpix = w[1];

  // One image row: pixels [j0, j1) of `row`, whose left and right neighbours are at offsets -dl and +dr
  // (0 at the image border: a missing neighbour is the pixel itself). Branch-free, so that it vectorises.
  // sums: tv, pix, sum (v - shift), sum (v - shift)^2 of the plane; mc: the plane's channel's coefficients.
  const auto run = [=](const scalar_t* __restrict__ row, const scalar_t* __restrict__ up,
                       const scalar_t* __restrict__ dn, scalar_t* __restrict__ out, int64_t j0, int64_t j1,
                       int64_t dl, int64_t dr, acc_t shift, MomentCoef<acc_t> mc, double* sums) {
    acc_t tv = 0, pix = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : tv, pix, s1, s2)
    for (int64_t j = j0; j < j1; ++j) {
      const acc_t v = row[j], l = row[j - dl], r = row[j + dr], u = up[j], d = dn[j];
      if constexpr (PASS != Pass::kGrad) {
        tv += (d - v) * (d - v) + (r - v) * (r - v);
        pix += std::max(v - hi, acc_t(0)) + std::max(lo - v, acc_t(0));
      }
      if constexpr (PASS == Pass::kStats) {
        s1 += v - shift;
        s2 += (v - shift) * (v - shift);
      }
      if constexpr (PASS != Pass::kStats) {
        acc_t gv = ctv * (4 * v - u - d - l - r) + cpix * (acc_t(v > hi) - acc_t(v < lo));
        if constexpr (PASS == Pass::kGrad) gv += mc.alpha + mc.beta * (v - mc.center);
        out[j] = static_cast<scalar_t>(gv);
      }
    }
    sums[0] += tv;
    sums[1] += pix;
    sums[2] += s1;
    sums[3] += s2;
  };
  at::parallel_for(0, planes, parallel_grain(h * wd), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t ch = p % c;
      const acc_t shift = PASS == Pass::kStats ? static_cast<acc_t>(x[ch * h * wd]) : acc_t(0);
      const MomentCoef<acc_t> mc = PASS == Pass::kGrad ? coef[ch] : MomentCoef<acc_t>{0, 0, 0};
      double sums[4] = {0, 0, 0, 0};  // per plane; each row is summed in acc_t
      for (int64_t i = 0; i < h; ++i) {
        const scalar_t* row = x + (p * h + i) * wd;
        const scalar_t* up = i > 0 ? row - wd : row;
        const scalar_t* dn = i + 1 < h ? row + wd : row;
        scalar_t* out = g + (p * h + i) * wd;
        if (wd == 1) {
          run(row, up, dn, out, 0, 1, 0, 0, shift, mc, sums);
        } else {
          run(row, up, dn, out, 0, 1, 0, 1, shift, mc, sums);
          run(row, up, dn, out, 1, wd - 1, 1, 1, shift, mc, sums);
          run(row, up, dn, out, wd - 1, wd, 1, 0, shift, mc, sums);
        }
      }
      if constexpr (PASS != Pass::kGrad) std::copy(sums, sums + 4, pp + 4 * p);
    }
  });
}

template <typename scalar_t>
void image_prior_cpu_kernel(const at::Tensor& images, const at::Tensor& weights, double lo, double hi,
                            const at::Tensor& moments, at::Tensor& loss, at::Tensor& terms, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = images.size(0), c = images.size(1), planes = b * c, hw = images.size(2) * images.size(3);
  const acc_t* w = weights.const_data_ptr<acc_t>();  // [3]
  at::Tensor part = at::empty({planes, 4}, at::TensorOptions().dtype(at::kDouble));  // per plane, see image_prior_pass
  double* pp = part.mutable_data_ptr<double>();
  if (!moments.defined()) {
    image_prior_pass<scalar_t, Pass::kPlain>(images, w, lo, hi, nullptr, pp, grad);
  } else {
    image_prior_pass<scalar_t, Pass::kStats>(images, w, lo, hi, nullptr, pp, grad);
  }
  double tv = 0, pix = 0;
  for (int64_t p = 0; p < planes; ++p) {
    tv += pp[4 * p];
    pix += pp[4 * p + 1];
  }
  double mom = 0;
  if (moments.defined()) {
    const acc_t* mu = moments.const_data_ptr<acc_t>();  // [2, C]: mu, then sigma
    const acc_t* sigma = mu + c;
    const scalar_t* x = images.const_data_ptr<scalar_t>();
    const double n = double(b * hw), range = hi - lo;
    std::vector<MomentCoef<acc_t>> coef(c);
    for (int64_t ch = 0; ch < c; ++ch) {
      double s1 = 0, s2 = 0;
      for (int64_t p = ch; p < planes; p += c) {
        s1 += pp[4 * p + 2];
        s2 += pp[4 * p + 3];
      }
      const double center = static_cast<acc_t>(x[ch * hw]) + s1 / n;  // the mean in pixel units
      const double var = std::max(s2 / n - (s1 / n) * (s1 / n), 0.0) / (range * range);
      const double m = (center - lo) / range, sd = std::sqrt(std::max(var, kMomentVarEps));
      const double sg2 = double(sigma[ch]) * double(sigma[ch]), scale = double(w[2]) / (double(c) * sg2 * range * n);
      mom += ((m - mu[ch]) * (m - mu[ch]) + (sd - sigma[ch]) * (sd - sigma[ch])) / sg2;
      coef[ch] = {static_cast<acc_t>(2 * (m - mu[ch]) * scale),
                  static_cast<acc_t>(var >= kMomentVarEps ? 2 * (sd - sigma[ch]) / (sd * range) * scale : 0.0),
                  static_cast<acc_t>(center)};
    }
    mom /= double(c);
    image_prior_pass<scalar_t, Pass::kGrad>(images, w, lo, hi, coef.data(), pp, grad);
  }
  acc_t* t = terms.mutable_data_ptr<acc_t>();
  t[0] = static_cast<acc_t>(tv / double(b));
  t[1] = static_cast<acc_t>(pix);
  t[2] = static_cast<acc_t>(mom);
  *loss.mutable_data_ptr<acc_t>() = w[0] * t[0] + w[1] * t[1] + w[2] * t[2];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> image_prior_cpu(const at::Tensor& images, const at::Tensor& weights,
                                                               double lo, double hi,
                                                               const std::optional<at::Tensor>& moments) {
  const at::Tensor x = prepare_image_prior(images);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor w = prepare_weights(weights, 3, x, acc);
  const at::Tensor mom = moments.has_value() ? prepare_moments(*moments, x, acc) : at::Tensor();
  at::Tensor loss = at::empty({}, x.options().dtype(acc));
  at::Tensor terms = at::empty({3}, x.options().dtype(acc));
  at::Tensor grad = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "image_prior_cpu", [&] {
    image_prior_cpu_kernel<scalar_t>(x, w, lo, hi, mom, loss, terms, grad);
  });
  return {loss, terms, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(tldr_fast, CPU, m) { m.impl("image_prior", &image_prior_cpu); }

}  // namespace tldr_fast
