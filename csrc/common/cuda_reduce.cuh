#pragma once
// Warp and block sums shared by the CUDA kernels (deterministic: a fixed reduction order, no
// atomics).

namespace d2g {

constexpr int kWarpSize = 32;

// Butterfly over the warp: every lane ends with the same total.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a 1-D block of kBlockThreads threads; the result is valid in thread 0. smem holds
// kBlockThreads / 32 values. Every thread must call it (it has barriers).
template <int kBlockThreads, typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* smem) {
  static_assert(kBlockThreads % kWarpSize == 0, "whole warps only");
  v = warp_sum(v);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0)
    for (int i = 0; i < kBlockThreads / kWarpSize; ++i) total += smem[i];
  return total;
}

}  // namespace d2g
