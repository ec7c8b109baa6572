// pairwise_ssim: the [N, M] SSIM matrix of two image sets (scikit-image's structural_similarity with
// its defaults), the op schema and its CPU kernel. The CUDA kernel is in pairwise_ssim.cu.
//
// SSIM of images x, y at a 7x7 window position p, over the window's 49 pixels q (sample statistics):
//   mu_x = S_x / 49,   var_x = (S_xx - 49 mu_x^2) / 48,   cov = (S_xy - 49 mu_x mu_y) / 48
//   ssim_p = (2 mu_x mu_y + c1)(2 cov + c2) / ((mu_x^2 + mu_y^2 + c1)(var_x + var_y + c2))
// with S_x = sum_q x_q, S_xy = sum_q x_q y_q, c1 = (0.01 R)^2, c2 = (0.03 R)^2 (R = data_range);
// SSIM = mean of ssim_p over the valid (H-6)x(W-6) positions and the channels.
//
// mu and var belong to one image: they are computed once per image. Only the window sums S_xy of the
// products are per pair. Products of two fp32 values are exact in fp64 and the sum of 49 of them
// nearly so, so S_xy - 49 mu_x mu_y is computed in fp64, where its cancellation (the two terms agree
// to many digits in flat bright regions) costs nothing; fp32 would lose ~1e-4 there.
//
// CPU kernel: pairs are processed as one image x_i of `a` against a block of J images of `b` stored
// pixel-major ([C, H, W, J]), so that every operation is one SIMD instruction over J pairs: a scalar
// of x_i times a vector of J pixels. J is the width of the machine's vector registers in doubles
// (8 with AVX-512, 4 with AVX2), chosen at run time. Row by row, the products are summed over
// sliding horizontal 7-windows, and those sums over sliding vertical 7-windows (the row leaving the
// window is subtracted), giving every S_xy with ~6 flops per pixel per pair.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../pairwise_ssim.h"

namespace tldr_fast {
namespace ssim {

at::Tensor unit_images(const at::Tensor& x, at::ScalarType dtype) {  // x: [N, C, H, W] (check_pair's check)
  TORCH_CHECK(x.size(2) >= kWin && x.size(3) >= kWin,
              "pairwise_ssim: SSIM uses a 7x7 window, images must be at least 7x7, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kByte || at::isFloatingType(x.scalar_type()),
              "pairwise_ssim: images must be uint8 or floating point, got ", x.scalar_type());
  at::Tensor out = x.to(dtype).contiguous();
  return x.scalar_type() == at::kByte ? out.div_(255.0) : out;
}

void check_pair(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4, "pairwise_ssim: a and b must be [N, C, H, W] and [M, C, H, W], got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.sizes().slice(1) == b.sizes().slice(1), "pairwise_ssim: a and b must have the same [C, H, W], got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.device() == b.device(), "pairwise_ssim: a and b must be on the same device");
}

namespace {

// Window mean and sample variance of every 7x7 window of one image, by separable sums in fp64.
//   x: [C, H, W] -> mu[p * stride], var[p * stride] for p over [C, H-6, W-6]; tmp: 2 H (W-6)
void window_stats(const double* x, int64_t C, int64_t H, int64_t W, double* mu, double* var, int64_t stride,
                  double* tmp) {
  const int64_t HO = H - kWin + 1, WO = W - kWin + 1;
  double *s1 = tmp, *s2 = tmp + H * WO;  // [H, WO]: horizontal 7-sums of x and x^2
  for (int64_t c = 0; c < C; ++c) {
    const double* xc = x + c * H * W;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < WO; ++w) {
        double a = 0, b = 0;
        for (int d = 0; d < kWin; ++d) {
          const double v = xc[h * W + w + d];
          a += v;
          b += v * v;
        }
        s1[h * WO + w] = a;
        s2[h * WO + w] = b;
      }
    for (int64_t h = 0; h < HO; ++h)
      for (int64_t w = 0; w < WO; ++w) {
        double a = 0, b = 0;
        for (int d = 0; d < kWin; ++d) {
          a += s1[(h + d) * WO + w];
          b += s2[(h + d) * WO + w];
        }
        const int64_t p = (c * HO + h) * WO + w;
        mu[p * stride] = a / (kWin * kWin);
        var[p * stride] = (b - a * a / (kWin * kWin)) / (kWin * kWin - 1);
      }
  }
}

template <int J>
struct Lanes {  // J doubles, one per pair (typedefs: GCC drops vector_size on alias templates)
  typedef double type __attribute__((vector_size(J * sizeof(double))));
  typedef double memory __attribute__((vector_size(J * sizeof(double)), aligned(sizeof(double)), may_alias));
};
template <int J>
using vec = typename Lanes<J>::type;
static_assert(sizeof(vec<8>) == 8 * sizeof(double), "vector extension");

// J consecutive doubles in memory as one vector (any alignment), to read or assign.
template <int J>
__attribute__((always_inline)) inline typename Lanes<J>::memory& lanes(double* p) {
  return *reinterpret_cast<typename Lanes<J>::memory*>(p);
}
template <int J>
__attribute__((always_inline)) inline const typename Lanes<J>::memory& lanes(const double* p) {
  return *reinterpret_cast<const typename Lanes<J>::memory*>(p);
}

// The inputs of the pair loop: a as images, b as blocks of J images side by side.
struct Prepared {
  const double *x, *mux, *varx;  // [N, C, H, W], [N, P], [N, P]
  const double *y, *muy, *vary;  // [MB, C, H, W, J], [MB, P, J], [MB, P, J]
  int64_t N, M, C, H, W;
  double c1, c2;
  double* out;  // [N, M]
};

// SSIM of image i of a against block jb of b (J images), for tasks t = jb * N + i in [begin, end):
// consecutive tasks share the block of b, which stays in cache.
template <int J>
__attribute__((always_inline)) inline void ssim_tasks(const Prepared& s, int64_t begin, int64_t end) {
  using V = vec<J>;
  const int64_t C = s.C, H = s.H, W = s.W, HO = H - kWin + 1, WO = W - kWin + 1, P = C * HO * WO;
  std::vector<double> work((W + (kWin + 1) * WO + J) * J);
  double* prod = work.data();           // [W, J]: products of row h
  double* ring = prod + W * J;          // [7, WO, J]: horizontal 7-sums of the last 7 rows of products
  double* vert = ring + kWin * WO * J;  // [WO, J]: their sum, S_xy of the windows whose last row is h
  double* sums = vert + WO * J;         // [J]
  for (int64_t t = begin; t < end; ++t) {
    const int64_t jb = t / s.N, i = t % s.N;
    const double *x = s.x + i * C * H * W, *mux = s.mux + i * P, *varx = s.varx + i * P;
    const double *y = s.y + jb * C * H * W * J, *muy = s.muy + jb * P * J, *vary = s.vary + jb * P * J;
    V acc = {};
    for (int64_t c = 0; c < C; ++c) {
      std::fill(vert, vert + WO * J, 0.0);
      for (int64_t h = 0; h < H; ++h) {
        const double* xr = x + (c * H + h) * W;
        const double* yr = y + (c * H + h) * W * J;
        for (int64_t w = 0; w < W; ++w) lanes<J>(prod + w * J) = xr[w] * lanes<J>(yr + w * J);
        V hsum = {};  // sliding: sum(w + 1) = sum(w) + p(w + 7) - p(w), exact enough in fp64
        for (int d = 0; d < kWin - 1; ++d) hsum += lanes<J>(prod + d * J);
        double* old = ring + (h % kWin) * WO * J;  // row h-7's sums, which leave the window now
        for (int64_t w = 0; w < WO; ++w) {
          hsum += lanes<J>(prod + (w + kWin - 1) * J);
          const V leaving = h >= kWin ? V(lanes<J>(old + w * J)) : V{};
          lanes<J>(vert + w * J) += hsum - leaving;
          lanes<J>(old + w * J) = hsum;
          hsum -= lanes<J>(prod + w * J);
        }
        if (h < kWin - 1) continue;
        const int64_t p0 = (c * HO + h - kWin + 1) * WO;  // first window position of this output row
        for (int64_t w = 0; w < WO; ++w) {
          const double mx = mux[p0 + w], vx = varx[p0 + w];
          const V my = lanes<J>(muy + (p0 + w) * J), vy = lanes<J>(vary + (p0 + w) * J);
          const V mxy = mx * my;
          const V cov = (lanes<J>(vert + w * J) - double(kWin * kWin) * mxy) * (1.0 / (kWin * kWin - 1));
          acc += ((2 * mxy + s.c1) * (2 * cov + s.c2)) / ((mx * mx + s.c1 + my * my) * (vx + s.c2 + vy));
        }
      }
    }
    lanes<J>(sums) = acc;
    for (int64_t l = 0; l < J && jb * J + l < s.M; ++l) s.out[i * s.M + jb * J + l] = sums[l] / P;
  }
}

// One instance per instruction set, J = its vector width in doubles; picked at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#define SSIM_AVX512 "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"
#define SSIM_AVX2 "avx2,fma"
__attribute__((target(SSIM_AVX512), flatten)) void ssim_tasks_avx512(const Prepared& s, int64_t b, int64_t e) {
  ssim_tasks<8>(s, b, e);
}
__attribute__((target(SSIM_AVX2), flatten)) void ssim_tasks_avx2(const Prepared& s, int64_t b, int64_t e) {
  ssim_tasks<4>(s, b, e);
}
#endif
__attribute__((flatten)) void ssim_tasks_generic(const Prepared& s, int64_t b, int64_t e) { ssim_tasks<8>(s, b, e); }

using TaskFn = void (*)(const Prepared&, int64_t, int64_t);

std::pair<TaskFn, int> pick_kernel() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return {ssim_tasks_avx512, 8};
  if (avx2) return {ssim_tasks_avx2, 4};
#endif
  return {ssim_tasks_generic, 8};
}

at::Tensor pairwise_ssim_cpu(const at::Tensor& a, const at::Tensor& b, double data_range) {
  check_pair(a, b);
  const int64_t N = a.size(0), M = b.size(0), C = a.size(1), H = a.size(2), W = a.size(3);
  const bool fp64 = a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble;  // as the reference
  if (N == 0 || M == 0) return at::empty({N, M}, a.options().dtype(fp64 ? at::kDouble : at::kFloat));
  at::Tensor out = at::empty({N, M}, a.options().dtype(at::kDouble));
  static const std::pair<TaskFn, int> picked = pick_kernel();
  const TaskFn kernel = picked.first;
  const int64_t J = picked.second;
  const int64_t HO = H - kWin + 1, WO = W - kWin + 1, P = C * HO * WO, MB = (M + J - 1) / J, CHW = C * H * W;

  at::Tensor x = unit_images(a, at::kDouble);                 // [N, C, H, W]
  at::Tensor y = unit_images(b, at::kDouble);                 // [M, C, H, W]
  at::Tensor xstats = at::empty({2, N, P}, x.options());      // mu, var of a
  at::Tensor yt = at::zeros({MB, CHW, J}, x.options());       // b, pixel-major blocks of J images
  at::Tensor ystats = at::zeros({2, MB, P, J}, x.options());  // mu, var of b, the same blocks
  double *xs = xstats.data_ptr<double>(), *ys = ystats.data_ptr<double>(), *ytp = yt.data_ptr<double>();
  const double *xp = x.data_ptr<double>(), *yp = y.data_ptr<double>();
  at::parallel_for(0, N + M, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> tmp(2 * H * WO);
    for (int64_t k = begin; k < end; ++k) {
      if (k < N) {
        window_stats(xp + k * CHW, C, H, W, xs + k * P, xs + (N + k) * P, 1, tmp.data());
        continue;
      }
      const int64_t j = k - N, off = (j / J) * P * J + j % J;  // block j / J, lane j % J
      window_stats(yp + j * CHW, C, H, W, ys + off, ys + MB * P * J + off, J, tmp.data());
      double* dst = ytp + (j / J) * CHW * J + j % J;
      for (int64_t q = 0; q < CHW; ++q) dst[q * J] = yp[j * CHW + q];
    }
  });

  const Prepared s{xp, xs, xs + N * P, ytp, ys, ys + MB * P * J, N, M, C, H, W,
                   (kK1 * data_range) * (kK1 * data_range), (kK2 * data_range) * (kK2 * data_range),
                   out.data_ptr<double>()};
  at::parallel_for(0, N * MB, 1, [&](int64_t begin, int64_t end) { kernel(s, begin, end); });
  return fp64 ? out : out.to(at::kFloat);
}

}  // namespace
}  // namespace ssim
}  // namespace tldr_fast

TORCH_LIBRARY_IMPL(tldr_fast, CPU, m) {
  m.impl("pairwise_ssim", &tldr_fast::ssim::pairwise_ssim_cpu);
}
