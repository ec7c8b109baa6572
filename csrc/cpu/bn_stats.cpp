// bn_stats, CPU: the BatchNorm-statistics prior of one layer, its per-channel statistics in one pass, and the
// elementwise backward (tldr_fast/ops/bn_stats.py declares both ops).
//
// x [N, C, S] (the activations [N, C, ...], contiguous), M = N S elements per channel, (rm, rv) the running mean
// and variance [C]. Per channel c, with the shift K_c = x[0, c, 0] (a value of the channel, so that
// var = E[(x-K)^2] - E[x-K]^2 does not cancel badly, and is exactly 0 on a flat channel):
//   s1_c = sum (x - K_c),  s2_c = sum (x - K_c)^2,  mu_c = K_c + s1_c / M,  var_c = s2_c / M - (s1_c / M)^2
//   value = ||dm|| + ||dv||            (dm = mu - rm, dv = var - rv, norms over the channels)
//   d value / d x[n, c, s] = a_c + b_c (x - mu_c),   a_c = dm_c / (M ||dm||),   b_c = 2 dv_c / (M ||dv||)
//   (d mu_c / d x = 1 / M, d var_c / d x = 2 (x - mu_c) / M; a norm of exactly 0 gives coefficient 0, as
//   autograd's norm does). bn_stats returns (value [], mean [C] = mu, coef [2, C] = (a, b)) in the accumulation
//   dtype; bn_stats_backward(grad, x, mean, coef) = grad (a_c + b_c (x - mean_c)) in x's dtype.
// mu and var are rounded to the accumulation dtype before dm and dv are taken, as the reference's fp32 var_mean
// gives them: a running mean equal to the batch mean then gives dm = 0 exactly (not a rounding residue, whose
// direction would be noise scaled to 1 / M). For that the sums are fp64 whatever the input (a fp32 sum of the
// channel would miss the correctly rounded mean by an ulp or more); the pass stays memory-bound.
//
// Forward: tasks = (a chunk of rows, a group of channels), both sized from the shape alone (about 16k elements
// a task), each writing the fp64 shifted sums of its rows into part[chunk, 2, C]; then per channel the chunks
// are summed in order. The result does not depend on the thread count. Backward: one elementwise pass over the
// planes.
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

constexpr int64_t kTaskElements = 16384;

// The forward's tasks over x [N, C, S]: chunks of `rows` rows times groups of `channels` channels.
struct Tiling {
  int64_t rows, channels, chunks, groups;
};

Tiling bn_tiling(int64_t n, int64_t c, int64_t s) {
  Tiling t;
  t.rows = std::clamp<int64_t>(kTaskElements / (c * s), 1, n);
  t.channels = t.rows > 1 ? c : std::clamp<int64_t>(kTaskElements / s, 1, c);  // whole rows, else channel groups
  t.chunks = (n + t.rows - 1) / t.rows;
  t.groups = (c + t.channels - 1) / t.channels;
  return t;
}

template <typename scalar_t>
void bn_stats_cpu_kernel(const at::Tensor& x, const at::Tensor& running_mean, const at::Tensor& running_var,
                         at::Tensor& value, at::Tensor& mean, at::Tensor& coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();  // [N, C, S]
  std::vector<double> shift(c);                       // [C] K_c = x[0, c, 0]
  for (int64_t ch = 0; ch < c; ++ch) shift[ch] = static_cast<acc_t>(xp[ch * s]);
  const Tiling t = bn_tiling(n, c, s);
  std::vector<double> part(t.chunks * 2 * c);  // [chunks, 2, C]: sum (x - K_c), sum (x - K_c)^2 over a chunk's rows
  at::parallel_for(0, t.chunks * t.groups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t k = task / t.groups, c0 = (task % t.groups) * t.channels, c1 = std::min(c, c0 + t.channels);
      double* __restrict__ s1 = part.data() + k * 2 * c;  // [C] of chunk k; this task owns [c0, c1)
      double* __restrict__ s2 = s1 + c;
      const double* __restrict__ kc = shift.data();
      std::fill(s1 + c0, s1 + c1, 0.0);
      std::fill(s2 + c0, s2 + c1, 0.0);
      for (int64_t row = k * t.rows; row < std::min(n, (k + 1) * t.rows); ++row) {
        const scalar_t* __restrict__ xr = xp + row * c * s;  // [C, S]
        if (s == 1) {  // [N, C]: vectorised over the channels
#pragma omp simd
          for (int64_t ch = c0; ch < c1; ++ch) {
            const double d = static_cast<double>(static_cast<acc_t>(xr[ch])) - kc[ch];
            s1[ch] += d;
            s2[ch] += d * d;
          }
        } else {  // a plane of S elements per channel: vectorised over the plane
          for (int64_t ch = c0; ch < c1; ++ch) {
            const scalar_t* __restrict__ plane = xr + ch * s;
            const double kk = kc[ch];
            double a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
            for (int64_t j = 0; j < s; ++j) {
              const double d = static_cast<double>(static_cast<acc_t>(plane[j])) - kk;
              a1 += d;
              a2 += d * d;
            }
            s1[ch] += a1;
            s2[ch] += a2;
          }
        }
      }
    }
  });

  // Per channel: the chunks in order, then the statistics rounded to acc_t, dm and dv (exact in fp64).
  const double m = static_cast<double>(n * s);
  const acc_t* rm = running_mean.const_data_ptr<acc_t>();  // [C]
  const acc_t* rv = running_var.const_data_ptr<acc_t>();   // [C]
  acc_t* mu = mean.mutable_data_ptr<acc_t>();              // [C]
  acc_t* a = coef.mutable_data_ptr<acc_t>();               // [2, C]: a, then b
  acc_t* b = a + c;
  std::vector<double> dm(c), dv(c);
  at::parallel_for(0, c, parallel_grain(2 * t.chunks), [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      double t1 = 0, t2 = 0;
      for (int64_t k = 0; k < t.chunks; ++k) {
        t1 += part[k * 2 * c + ch];
        t2 += part[k * 2 * c + c + ch];
      }
      const double e1 = t1 / m;
      const acc_t mean_c = static_cast<acc_t>(shift[ch] + e1);
      const acc_t var_c = static_cast<acc_t>(std::max(t2 / m - e1 * e1, 0.0));
      mu[ch] = mean_c;
      dm[ch] = static_cast<double>(mean_c) - static_cast<double>(rm[ch]);
      dv[ch] = static_cast<double>(var_c) - static_cast<double>(rv[ch]);
    }
  });
  double nm = 0, nv = 0;
  for (int64_t ch = 0; ch < c; ++ch) {
    nm += dm[ch] * dm[ch];
    nv += dv[ch] * dv[ch];
  }
  nm = std::sqrt(nm);
  nv = std::sqrt(nv);
  for (int64_t ch = 0; ch < c; ++ch) {
    a[ch] = nm > 0 ? static_cast<acc_t>(dm[ch] / (m * nm)) : acc_t(0);
    b[ch] = nv > 0 ? static_cast<acc_t>(2 * dv[ch] / (m * nv)) : acc_t(0);
  }
  *value.mutable_data_ptr<acc_t>() = static_cast<acc_t>(nm + nv);
}

// out [N, C, S] = grad (a_c + b_c (x - mean_c)), over the planes (n, c); a task's planes are cut into runs of
// consecutive channels so that [N, C] (S = 1) vectorises over the channels and [N, C, S] over each plane.
template <typename scalar_t>
void bn_stats_backward_cpu_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& coef, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  const acc_t g = *grad.const_data_ptr<acc_t>();                  // []
  const acc_t* __restrict__ mu = mean.const_data_ptr<acc_t>();    // [C]
  const acc_t* __restrict__ a = coef.const_data_ptr<acc_t>();     // [2, C]: a, then b
  const acc_t* __restrict__ b = a + c;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();              // [N, C, S]
  scalar_t* op = out.mutable_data_ptr<scalar_t>();                // [N, C, S]
  at::parallel_for(0, n * c, parallel_grain(s), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1;) {
      const int64_t ch0 = p % c, len = std::min(p1 - p, c - ch0);  // planes p .. p+len-1: channels ch0 ..
      const scalar_t* __restrict__ xq = xp + p * s;
      scalar_t* __restrict__ oq = op + p * s;
      if (s == 1) {
#pragma omp simd
        for (int64_t j = 0; j < len; ++j)
          oq[j] = static_cast<scalar_t>(g * (a[ch0 + j] + b[ch0 + j] * (static_cast<acc_t>(xq[j]) - mu[ch0 + j])));
      } else {
        for (int64_t j = 0; j < len; ++j) {
          const acc_t aj = a[ch0 + j], bj = b[ch0 + j], mj = mu[ch0 + j];
          const scalar_t* __restrict__ xr = xq + j * s;
          scalar_t* __restrict__ orow = oq + j * s;
#pragma omp simd
          for (int64_t e = 0; e < s; ++e)
            orow[e] = static_cast<scalar_t>(g * (aj + bj * (static_cast<acc_t>(xr[e]) - mj)));
        }
      }
      p += len;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& activations,
                                                            const at::Tensor& running_mean,
                                                            const at::Tensor& running_var) {
  const at::Tensor x = prepare_bn_stats(activations);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor rm = prepare_channel_stat(running_mean, "running_mean", x, acc);
  const at::Tensor rv = prepare_channel_stat(running_var, "running_var", x, acc);
  at::Tensor value = at::empty({}, x.options().dtype(acc));
  at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(acc));
  at::Tensor coef = at::empty({2, x.size(1)}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    bn_stats_cpu_kernel<scalar_t>(x, rm, rv, value, mean, coef);
  });
  return {value, mean, coef};
}

at::Tensor bn_stats_backward_cpu(const at::Tensor& grad, const at::Tensor& activations, const at::Tensor& mean,
                                 const at::Tensor& coef) {
  const at::Tensor x = prepare_bn_stats(activations);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor g = prepare_scalar_grad(grad, x, acc);
  const at::Tensor mu = prepare_channel_stat(mean, "mean", x, acc);
  const at::Tensor k = prepare_small(coef, "coef", {2, x.size(1)}, "[2, C]", "C", x.size(1), x, acc);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_backward_cpu", [&] {
    bn_stats_backward_cpu_kernel<scalar_t>(g, x, mu, k, out);
  });
  return out.view(activations.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(tldr_fast, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_stats_backward", &bn_stats_backward_cpu);
}

}  // namespace tldr_fast
