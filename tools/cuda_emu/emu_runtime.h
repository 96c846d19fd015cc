// Minimal CPU emulation of the CUDA execution model, for checking kernel logic on machines
// without a GPU (see emulate.py): one std::thread per CUDA thread of a block, blocks one after
// another (x fastest, then y, then z), __syncthreads = a block barrier, __shfl_xor_sync /
// __shfl_down_sync = a per-warp exchange through memory between two per-warp barriers, atomicAdd =
// std::atomic_ref, __shared__ = static (one copy, reused block after block). Threads of 2-D and
// 3-D blocks are numbered as in CUDA (x fastest) and grouped into warps by that linear index.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using std::max;
using std::min;
inline thread_local EmuDim threadIdx;
inline thread_local EmuDim blockIdx;
inline thread_local int emu_linear_tid = 0;
inline EmuDim blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
inline double emu_shfl[32][32];

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int offset) {
  const int w = emu_linear_tid / 32, l = emu_linear_tid % 32;
  emu_shfl[w][l] = static_cast<double>(v);
  emu_warp_barriers[w]->arrive_and_wait();
  const T r = static_cast<T>(emu_shfl[w][l ^ offset]);
  emu_warp_barriers[w]->arrive_and_wait();
  return r;
}

template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
  const int w = emu_linear_tid / 32, l = emu_linear_tid % 32;
  emu_shfl[w][l] = static_cast<double>(v);
  emu_warp_barriers[w]->arrive_and_wait();
  const T r = l + offset < 32 ? static_cast<T>(emu_shfl[w][l + offset]) : v;
  emu_warp_barriers[w]->arrive_and_wait();
  return r;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

namespace emu {
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  blockDim = {block.x, block.y, block.z};
  gridDim = {grid.x, grid.y, grid.z};
  std::barrier<> block_barrier(threads);
  emu_block_barrier = &block_barrier;
  emu_warp_barriers.clear();
  for (int w = 0; w < (threads + 31) / 32; ++w)  // a last partial warp has fewer lanes
    emu_warp_barriers.emplace_back(new std::barrier<>(std::min(32, threads - 32 * w)));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx.x = t % block.x;
      threadIdx.y = (t / block.x) % block.y;
      threadIdx.z = t / (block.x * block.y);
      emu_linear_tid = t;
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx.x = bx;
            blockIdx.y = by;
            blockIdx.z = bz;
            body();
            block_barrier.arrive_and_wait();  // the block ends before the next one starts
          }
    });
  for (auto& th : pool) th.join();
}
}  // namespace emu
