// pairwise_ssim: the constants and input checks shared by the CPU (pairwise_ssim.cpp) and CUDA
// (pairwise_ssim.cu) kernels. scikit-image's structural_similarity defaults.
#pragma once

#include <ATen/ATen.h>

namespace tldr_fast {
namespace ssim {

constexpr int kWin = 7;                                   // uniform 7x7 window
constexpr double kK1 = 0.01, kK2 = 0.03;                  // c1 = (K1 R)^2, c2 = (K2 R)^2
constexpr double kCovNorm = kWin * kWin / (kWin * kWin - 1.0);  // sample covariance: 49 / 48

// [N, C, H, W] uint8 (divided by 255) or floating images as a contiguous tensor of `dtype`.
at::Tensor unit_images(const at::Tensor& x, at::ScalarType dtype);

// a: [N, C, H, W] and b: [M, C, H, W] with the same [C, H, W], on one device.
void check_pair(const at::Tensor& a, const at::Tensor& b);

}  // namespace ssim
}  // namespace tldr_fast
