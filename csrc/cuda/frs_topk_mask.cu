// frs_topk_mask on CUDA: Dense Teacher's learning region (Eq. 3-4).
//
// 1. One thread per row: the maximum logit and its ordered key.
// 2. Radix select (select.h), 8 bits per pass from the top: a histogram of the digit over the keys sharing
//    the prefix so far (integer atomics: exact counts), read by the host to pick the digit.
// 3. Ties at the threshold go to the lower index: per-chunk tie counts, a host scan to find the chunk of
//    the last tie taken, and one thread to find it inside that chunk.
// 4. The mask, and fg as per-block tree sums merged by one block in a fixed order (deterministic).
// The host reads a few small arrays per call; the region is chosen once per iteration, so that is cheap.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../select.h"
#include "../ssod_math.h"
#include "cuda_utils.cuh"

namespace ssod {
namespace {

constexpr int kDigitBits = 8;
constexpr int64_t kTieChunk = 4096;

template <typename T, typename Key>
__global__ void row_max_kernel(const T* __restrict__ logits, int64_t R, int64_t C, T* __restrict__ row_max,
                               Key* __restrict__ keys) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < R; r += int64_t(gridDim.x) * blockDim.x) {
    const T* row = logits + r * C;
    T m = row[0];
    for (int64_t c = 1; c < C; ++c) m = row[c] > m ? row[c] : m;
    row_max[r] = m;
    keys[r] = ordered_key(m);
  }
}

template <typename Key>
__global__ void digit_hist_kernel(const Key* __restrict__ keys, int64_t R, Key prefix, Key prefix_mask, int shift,
                                  int32_t* __restrict__ hist) {
  __shared__ int32_t local[1 << kDigitBits];
  for (int d = threadIdx.x; d < (1 << kDigitBits); d += blockDim.x) local[d] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < R; i += int64_t(gridDim.x) * blockDim.x) {
    const Key key = keys[i];
    if ((key & prefix_mask) == prefix) atomicAdd(&local[(key >> shift) & Key((1 << kDigitBits) - 1)], 1);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < (1 << kDigitBits); d += blockDim.x) {
    if (local[d] > 0) atomicAdd(&hist[d], local[d]);
  }
}

template <typename Key>
__global__ void tie_count_kernel(const Key* __restrict__ keys, int64_t R, Key threshold, int64_t* __restrict__ counts) {
  __shared__ int64_t shared[kThreads];
  const int64_t begin = blockIdx.x * kTieChunk, end = min(R, begin + kTieChunk);
  int64_t count = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) count += keys[i] == threshold ? 1 : 0;
  const int64_t total = block_sum(count, shared);
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

template <typename Key>
__global__ void find_tie_kernel(const Key* __restrict__ keys, int64_t begin, int64_t end, Key threshold,
                                int64_t wanted, int64_t* __restrict__ index) {
  int64_t seen = 0;
  for (int64_t i = begin; i < end; ++i) {
    seen += keys[i] == threshold ? 1 : 0;
    if (seen == wanted) {
      *index = i;
      return;
    }
  }
}

template <typename T, typename Key>
__global__ void mask_kernel(const Key* __restrict__ keys, const T* __restrict__ row_max, int64_t R, Key threshold,
                            int64_t last_tie, bool* __restrict__ mask, double* __restrict__ block_fg) {
  __shared__ double shared[kThreads];
  double fg = 0.0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < R; i += int64_t(gridDim.x) * blockDim.x) {
    const Key key = keys[i];
    const bool selected = key > threshold || (key == threshold && i <= last_tie);
    mask[i] = selected;
    if (selected) fg += static_cast<double>(sigmoid(row_max[i]));
  }
  const double total = block_sum(fg, shared);
  if (threadIdx.x == 0) block_fg[blockIdx.x] = total;
}

// One block merges the per-block sums (block_sum_strided: a fixed order).
template <typename T>
__global__ void sum_blocks_kernel(const double* __restrict__ block_fg, int64_t blocks, T* __restrict__ fg) {
  __shared__ double shared[kThreads];
  const double total = block_sum_strided(block_fg, blocks, 1, shared);
  if (threadIdx.x == 0) *fg = static_cast<T>(total);
}

template <typename T>
void frs_topk_mask_launch(const at::Tensor& logits, int64_t k, at::Tensor& mask, at::Tensor& fg) {
  using Key = std::conditional_t<std::is_same_v<T, float>, uint32_t, uint64_t>;
  constexpr int kKeyBits = 8 * sizeof(Key);
  const at::ScalarType key_dtype = std::is_same_v<T, float> ? at::kInt : at::kLong;  // same bytes as Key
  const int64_t R = logits.size(0), C = logits.size(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto options = logits.options();

  at::Tensor row_max = at::empty({R}, options);
  at::Tensor keys_tensor = at::empty({R}, options.dtype(key_dtype));
  Key* keys = reinterpret_cast<Key*>(keys_tensor.data_ptr());
  row_max_kernel<T, Key><<<grid_for(R, 1, 65535), kThreads, 0, stream>>>(logits.const_data_ptr<T>(), R, C,
                                                                          row_max.mutable_data_ptr<T>(), keys);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // The k-th largest key, digit by digit.
  int64_t remaining = k;
  Key prefix = 0, prefix_mask = 0;
  at::Tensor hist = at::empty({1 << kDigitBits}, options.dtype(at::kInt));
  for (int shift = kKeyBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    hist.zero_();
    digit_hist_kernel<Key><<<grid_for(R, 8, 1024), kThreads, 0, stream>>>(keys, R, prefix, prefix_mask, shift,
                                                                           hist.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor host_hist = hist.cpu();
    const Key digit = static_cast<Key>(pick_digit(host_hist.const_data_ptr<int32_t>(), 1 << kDigitBits, remaining));
    prefix |= digit << shift;
    prefix_mask |= Key((1 << kDigitBits) - 1) << shift;
  }
  const Key threshold = prefix;

  // The `remaining`-th row with key == threshold, in index order.
  const int64_t chunks = (R + kTieChunk - 1) / kTieChunk;
  at::Tensor chunk_counts = at::empty({chunks}, options.dtype(at::kLong));
  tie_count_kernel<Key><<<chunks, kThreads, 0, stream>>>(keys, R, threshold, chunk_counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host_counts = chunk_counts.cpu();
  const int64_t* counts = host_counts.const_data_ptr<int64_t>();
  int64_t chunk = 0;
  while (counts[chunk] < remaining) remaining -= counts[chunk++];
  at::Tensor last_tie = at::empty({}, options.dtype(at::kLong));
  find_tie_kernel<Key><<<1, 1, 0, stream>>>(keys, chunk * kTieChunk, std::min(R, (chunk + 1) * kTieChunk), threshold,
                                            remaining, last_tie.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t last = last_tie.item<int64_t>();

  const int64_t blocks = grid_for(R, 4, 4096);
  at::Tensor block_fg = at::empty({blocks}, options.dtype(at::kDouble));
  mask_kernel<T, Key><<<blocks, kThreads, 0, stream>>>(keys, row_max.const_data_ptr<T>(), R, threshold, last,
                                                       mask.mutable_data_ptr<bool>(),
                                                       block_fg.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_blocks_kernel<T><<<1, kThreads, 0, stream>>>(block_fg.const_data_ptr<double>(), blocks, fg.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> frs_topk_mask_cuda(const at::Tensor& logits, int64_t k) {
  check_frs_inputs(logits, k, at::kCUDA, "frs_topk_mask");
  TORCH_CHECK(logits.size(0) < (int64_t(1) << 31), "ssod_ops.frs_topk_mask: at most 2^31 - 1 rows on CUDA");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor mask = at::zeros({logits.size(0)}, logits.options().dtype(at::kBool));
  at::Tensor fg = at::zeros({}, logits.options());
  if (k == 0) return {mask, fg};
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "frs_topk_mask_cuda",
                             [&] { frs_topk_mask_launch<scalar_t>(logits, k, mask, fg); });
  return {mask, fg};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssod_ops, CUDA, m) {
  m.impl("frs_topk_mask", &frs_topk_mask_cuda);
}

}  // namespace ssod
