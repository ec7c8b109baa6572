// pairwise_ssim, CUDA: the formulas are those of pairwise_ssim.cpp (window statistics once per image,
// window sums of products S_xy per pair, S_xy - 49 mu_x mu_y in fp64).
//
// Launch: pairwise_ssim_kernel, one thread per (image j of b, 2 images i of a). A block is 32 x 4
// threads: the 32 lanes of a warp take 32 consecutive j (their loads of b, stored pixel-major
// [C*H*W, M], are one contiguous segment) and share their 2 images of a (one broadcast 16-byte load
// per pixel: a is pixel-major too); the 4 warps take 4 pairs of images of a. Blocks run over tiles (i fastest, so that the blocks running
// together share their tile of b).
//
// Per thread and channel, the output columns are done in strips of SW. For a strip, the thread walks
// down the rows h keeping, per pair, the vertical 7-sums of the products of the strip's SW + 6
// columns in registers (add row h, subtract row h - 7: 2 FMAs per pixel); from row 6 on, sliding
// horizontal 7-sums of those give S_xy of the SW windows whose last row is h, and the SSIM formula
// is accumulated. Products and sums are fp64 (exact products, no cancellation), the formula fp32.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>

#include "common.cuh"
#include "../pairwise_ssim.h"

namespace tldr_fast {
namespace ssim {
namespace {

constexpr int kRI = 2;       // images of a per thread: one 16-byte load (double2) per pixel
constexpr int kSW = 8;       // output columns per strip
constexpr int kLanes = 32;   // images of b per block (one per lane)
constexpr int kGroups = 4;   // groups of kRI images of a per block (one per warp)

struct Args {
  const double* a;     // [C*H*W, Np] pixel-major, zero padded to Np (a multiple of kRI) images
  const double* b;     // [C*H*W, M] pixel-major
  const double* mua;   // [P, Np] window means of a
  const double* mub;   // [P, M]
  const float* vara;   // [P, Np] window sample variances of a
  const float* varb;   // [P, M]
  float* out;          // [N, M]
  int64_t N, Np, M;
  int C, H, W;
  float c1, c2;
};

__host__ __device__ __forceinline__ float fast_div(float x, float y) {
#ifdef __CUDA_ARCH__
  return __fdividef(x, y);  // ~2 ulp; y is in [c1 c2, 9]
#else
  return x / y;
#endif
}

// The SSIM of image j of b against images i0 and i0 + 1 of a (i0 even; those < N are written).
template <int SW>
__host__ __device__ __forceinline__ void ssim_thread(const Args& s, int64_t j, int64_t i0) {
  if (j >= s.M || i0 >= s.N) return;
  const int H = s.H, W = s.W, HO = H - kWin + 1, WO = W - kWin + 1;
  const int64_t Np = s.Np, M = s.M;
  static_assert(kRI == 2, "images of a are loaded in pairs (double2)");
  auto pair_of = [&](const double* base, int64_t k) {  // base[k * Np + i0 .. + 1]: one 16-byte load
    return *reinterpret_cast<const double2*>(base + k * Np + i0);
  };
  double acc[kRI] = {};
  for (int c = 0; c < s.C; ++c) {
    for (int x0 = 0; x0 < WO; x0 += SW) {
      double col[kRI][SW + kWin - 1] = {};  // vertical 7-sums of products, columns x0 .. x0 + SW + 5
      for (int h = 0; h < H; ++h) {
        const int64_t row = int64_t(c * H + h) * W, old = row - kWin * W;  // pixel index of (h, 0), (h-7, 0)
#pragma unroll
        for (int w = 0; w < SW + kWin - 1; ++w) {
          const int xw = x0 + w < W ? x0 + w : W - 1;  // columns past W feed only outputs past WO
          const double bv = s.b[(row + xw) * M + j];
          const double2 av = pair_of(s.a, row + xw);
          col[0][w] = fma(av.x, bv, col[0][w]);
          col[1][w] = fma(av.y, bv, col[1][w]);
          if (h >= kWin) {
            const double bo = s.b[(old + xw) * M + j];
            const double2 ao = pair_of(s.a, old + xw);
            col[0][w] = fma(-ao.x, bo, col[0][w]);
            col[1][w] = fma(-ao.y, bo, col[1][w]);
          }
        }
        if (h < kWin - 1) continue;
        double hs[kRI];  // sliding horizontal 7-sum of col: S_xy of window (h - 6, x0 + x)
#pragma unroll
        for (int r = 0; r < kRI; ++r) {
          hs[r] = 0;
#pragma unroll
          for (int d = 0; d < kWin - 1; ++d) hs[r] += col[r][d];
        }
#pragma unroll
        for (int x = 0; x < SW; ++x) {
#pragma unroll
          for (int r = 0; r < kRI; ++r) hs[r] += col[r][x + kWin - 1];
          if (x0 + x < WO) {
            const int64_t p = int64_t(c * HO + h - kWin + 1) * WO + x0 + x;
            const double mb = s.mub[p * M + j];
            const float vb = s.varb[p * M + j];
            const double2 ma2 = pair_of(s.mua, p);
            const float2 va2 = *reinterpret_cast<const float2*>(s.vara + p * Np + i0);
            const double ma[kRI] = {ma2.x, ma2.y};
            const float va[kRI] = {va2.x, va2.y};
#pragma unroll
            for (int r = 0; r < kRI; ++r) {
              const double mab = ma[r] * mb;
              const float cov = float((hs[r] - (kWin * kWin) * mab) * (1.0 / (kWin * kWin - 1)));
              const float num = (2.0f * float(mab) + s.c1) * (2.0f * cov + s.c2);
              const float den = (float(ma[r] * ma[r] + mb * mb) + s.c1) * (va[r] + vb + s.c2);
              acc[r] += fast_div(num, den);
            }
          }
#pragma unroll
          for (int r = 0; r < kRI; ++r) hs[r] -= col[r][x];
        }
      }
    }
  }
  const double inv_p = 1.0 / (double(s.C) * HO * WO);
#pragma unroll
  for (int r = 0; r < kRI; ++r)
    if (i0 + r < s.N) s.out[(i0 + r) * M + j] = float(acc[r] * inv_p);
}

__global__ void __launch_bounds__(kLanes* kGroups) pairwise_ssim_kernel(Args s, int64_t tiles_n) {
  const int64_t tile = blockIdx.x, tn = tile % tiles_n, tm = tile / tiles_n;
  ssim_thread<kSW>(s, tm * kLanes + threadIdx.x, (tn * kGroups + threadIdx.y) * kRI);
}

// x: [n, C, H, W] fp64 -> (mean [P, n] fp64, sample variance [P, n] fp32) of every 7x7 window.
std::pair<at::Tensor, at::Tensor> window_stats(const at::Tensor& x) {
  const int64_t n = x.size(0);
  const at::Tensor mu = at::avg_pool2d(x, kWin, 1);
  const at::Tensor var = (at::avg_pool2d(x * x, kWin, 1) - mu * mu).mul_(kCovNorm);
  return {mu.reshape({n, -1}).t().contiguous(), var.reshape({n, -1}).t().to(at::kFloat).contiguous()};
}

at::Tensor pairwise_ssim_cuda(const at::Tensor& a, const at::Tensor& b, double data_range) {
  check_pair(a, b);  // one device: this CUDA kernel is reached only with a CUDA input
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t N = a.size(0), M = b.size(0);
  const bool fp64 = a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble;  // as the reference
  at::Tensor out = at::empty({N, M}, a.options().dtype(at::kFloat));
  if (N > 0 && M > 0) {
    const int64_t Np = (N + kRI - 1) / kRI * kRI;
    const at::Tensor x = at::constant_pad_nd(unit_images(a, at::kDouble), {0, 0, 0, 0, 0, 0, 0, Np - N});
    const at::Tensor y = unit_images(b, at::kDouble);
    const auto [mua, vara] = window_stats(x);  // [P, Np]
    const auto [mub, varb] = window_stats(y);  // [P, M]
    const at::Tensor at_ = x.reshape({Np, -1}).t().contiguous(), bt = y.reshape({M, -1}).t().contiguous();
    const float c1 = float((kK1 * data_range) * (kK1 * data_range)), c2 = float((kK2 * data_range) * (kK2 * data_range));
    const Args s{at_.data_ptr<double>(), bt.data_ptr<double>(), mua.data_ptr<double>(), mub.data_ptr<double>(),
                 vara.data_ptr<float>(), varb.data_ptr<float>(), out.data_ptr<float>(), N, Np, M,
                 int(a.size(1)), int(a.size(2)), int(a.size(3)), c1, c2};
    const int64_t tiles_n = (N + kGroups * kRI - 1) / (kGroups * kRI), tiles_m = (M + kLanes - 1) / kLanes;
    TORCH_CHECK(tiles_n * tiles_m < (int64_t(1) << 31), "pairwise_ssim (CUDA): too many pairs for one launch; split b");
    pairwise_ssim_kernel<<<dim3(unsigned(tiles_n * tiles_m)), dim3(kLanes, kGroups), 0,
                           c10::cuda::getCurrentCUDAStream()>>>(s, tiles_n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return fp64 ? out.to(at::kDouble) : out;
}

}  // namespace
}  // namespace ssim
}  // namespace tldr_fast

TORCH_LIBRARY_IMPL(tldr_fast, CUDA, m) { m.impl("pairwise_ssim", &tldr_fast::ssim::pairwise_ssim_cuda); }
