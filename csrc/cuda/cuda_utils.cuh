// Launch helpers shared by the CUDA kernels. Only c10 headers: the kernels need no CUDA library beyond
// the runtime (ATen/cuda/CUDAContext.h would pull in cuBLAS and cuSPARSE headers).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace ssod {

constexpr int kThreads = 256;

// A grid for `items` work items, `per_thread` per thread, capped so that grid-stride loops cover the rest.
// It depends only on the problem size, so the order of every reduction is fixed.
inline int64_t grid_for(int64_t items, int64_t per_thread = 1, int64_t max_blocks = 4096) {
  const int64_t per_block = kThreads * per_thread;
  return std::max<int64_t>(1, std::min<int64_t>(max_blocks, (items + per_block - 1) / per_block));
}

// Deterministic tree sum of one value per thread of a block of kThreads threads; every thread gets the
// result. `shared` holds kThreads values.
template <typename T>
__device__ T block_sum(T value, T* shared) {
  const int tid = threadIdx.x;
  shared[tid] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) shared[tid] += shared[tid + stride];
    __syncthreads();
  }
  const T total = shared[0];
  __syncthreads();  // `shared` may be reused right after
  return total;
}

// Sum of values[i * stride], i in [0, count), by one block of kThreads threads in a fixed order: thread t
// adds i = t, t + kThreads, ... in turn, then the tree of block_sum. The result (in every thread) is the same
// on every run; the loads of the threads overlap, where one thread summing all would wait on each in turn.
template <typename T>
__device__ T block_sum_strided(const T* values, int64_t count, int64_t stride, T* shared) {
  T partial = T(0);
  for (int64_t i = threadIdx.x; i < count; i += kThreads) partial += values[i * stride];
  return block_sum(partial, shared);
}

}  // namespace ssod
