// Device helpers shared by the CUDA kernels: warp and block reductions, 16-byte vector packs, launch sizes.
// Only light headers: this file must compile against a CPU-only torch's headers too (CI compile check).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace tldr_fast {
namespace cuda {

constexpr int kWarp = 32;

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32; every thread of the
// block must call it (it synchronises). smem: kWarp elements of scratch, reusable right after the call.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? smem[lane] : T(0));
}

// N consecutive elements loaded or stored with one (up to 16-byte) memory instruction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Streaming multiprocessors of the current device (cached per device: the attribute query is a host call).
inline int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cache[dev] = n;
  return n;
}

// Blocks for a grid-stride loop over `work` items of `per_block` each: enough to fill the GPU, no more.
inline int grid_size(int64_t work, int per_block, int blocks_per_sm = 8) {
  const int64_t needed = (work + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sm_count()) * blocks_per_sm)));
}

// Launch a kernel templated on its pack width: `launch(std::integral_constant<int, VEC>{})` with the widest VEC
// (16 bytes of scalar_t, halved down to 1) that divides `len` (the contiguous run each pack must stay inside) and
// to which every non-null pointer of `ptrs` is aligned; then the launch check.
template <typename scalar_t, int VEC = int(16 / sizeof(scalar_t)), typename Launch>
void launch_widest_pack(int64_t len, std::initializer_list<const void*> ptrs, Launch&& launch) {
  if constexpr (VEC > 1) {
    bool fits = len % VEC == 0;
    for (const void* p : ptrs) fits = fits && (p == nullptr || reinterpret_cast<uintptr_t>(p) % (VEC * sizeof(scalar_t)) == 0);
    if (!fits) {
      launch_widest_pack<scalar_t, VEC / 2>(len, ptrs, launch);
      return;
    }
  }
  launch(std::integral_constant<int, VEC>{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace tldr_fast
