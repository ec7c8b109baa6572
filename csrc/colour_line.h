// colour_line: the principal direction of an image's [3, 3] colour covariance and the variance off it, shared by
// the CPU (cpu/colour_line.cpp) and CUDA (cuda/colour_line.cu) kernels (declaration: tldr_fast/ops/colour_line.py;
// the input check: common.h, prepare_colour_line).
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define TLDR_FAST_HOST_DEVICE __host__ __device__
#else
#define TLDR_FAST_HOST_DEVICE
#endif

namespace tldr_fast {
namespace colour {

// S^(2^k) by k squarings of S / tr S, each renormalised by its trace, tends to v v^T: the other eigenvalues'
// share falls as (lambda_2 / lambda_1)^(2^k). The Rayleigh quotient v^T S v is then within
// (lambda_1 - lambda_2) sin^2(theta) of lambda_1, at most about lambda_1 / (e 2^(k+1)) over every eigenvalue ratio:
// 2e-13 of lambda_1 for k = 40 (the sums are fp64).
constexpr int kSquarings = 40;

// From the sums of an image's N pixels d_p = x_p - K (K a colour of the image): s[3] = sum d_p and
// ss[6] = sum d d^T as (00, 01, 02, 11, 12, 22), in double. Writes m[3] = K + mean d (the mean colour) and v[3]
// (the unit principal direction: the column of S^(2^k) with the largest diagonal entry, normalised; (1, 0, 0) for
// a flat image) and returns tr S - v^T S v (>= 0).
TLDR_FAST_HOST_DEVICE inline double principal_line(const double* s, const double* ss, const double* k, double n,
                                                   double* m, double* v) {
  const double e0 = s[0] / n, e1 = s[1] / n, e2 = s[2] / n;
  const double e[3] = {e0, e1, e2};
  double a[3][3];
  const int idx[3][3] = {{0, 1, 2}, {1, 3, 4}, {2, 4, 5}};
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) a[r][c] = ss[idx[r][c]] / n - e[r] * e[c];
  for (int r = 0; r < 3; ++r) {
    a[r][r] = a[r][r] > 0 ? a[r][r] : 0.0;
    m[r] = k[r] + e[r];
  }
  const double tr = a[0][0] + a[1][1] + a[2][2];
  double q[3][3];
  const double inv = tr > 0 ? 1.0 / tr : 0.0;
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) q[r][c] = a[r][c] * inv;
  for (int it = 0; it < kSquarings; ++it) {  // q <- q^2 / tr(q^2)
    double p[3][3];
    double t = 0;
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 3; ++c) {
        p[r][c] = q[r][0] * q[0][c] + q[r][1] * q[1][c] + q[r][2] * q[2][c];
        if (r == c) t += p[r][c];
      }
    const double rt = t > 0 ? 1.0 / t : 0.0;
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 3; ++c) q[r][c] = p[r][c] * rt;
  }
  int j = 0;
  if (q[1][1] > q[j][j]) j = 1;
  if (q[2][2] > q[j][j]) j = 2;
  const double norm = sqrt(q[0][j] * q[0][j] + q[1][j] * q[1][j] + q[2][j] * q[2][j]);
  for (int r = 0; r < 3; ++r) v[r] = norm > 0 ? q[r][j] / norm : (r == 0 ? 1.0 : 0.0);
  double rayleigh = 0;
  for (int r = 0; r < 3; ++r) rayleigh += v[r] * (a[r][0] * v[0] + a[r][1] * v[1] + a[r][2] * v[2]);
  const double off = tr - rayleigh;
  return off > 0 ? off : 0.0;
}

}  // namespace colour

}  // namespace tldr_fast
