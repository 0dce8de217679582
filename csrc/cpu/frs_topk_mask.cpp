// frs_topk_mask on the CPU: Dense Teacher's learning region (Eq. 3-4).
//
// Pass 1 (parallel over fixed row blocks): the maximum logit of every row, its ordered key, and a histogram
// of the key's top 12 bits. Selection (serial, O(R)): the top digit from the merged histogram, then the
// candidates sharing it (few, unless many scores are equal) are narrowed 8 bits at a time to the exact
// k-th key (select.h). Pass 2 (parallel): the mask, and per block the sum of sigmoid(max) over the selected
// rows, merged in block order so that fg is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../select.h"
#include "../ssod_math.h"
#include "vectorize.h"

namespace ssod {
namespace {

constexpr int64_t kRowsPerBlock = 16384;
constexpr int kTopBits = 12;

template <typename T>
SSOD_ALWAYS_INLINE void row_max_impl(const T* x, int64_t rows, int64_t C, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * C;
    T m = row[0];
#pragma omp simd reduction(max : m)
    for (int64_t c = 1; c < C; ++c) m = row[c] > m ? row[c] : m;
    out[r] = m;
  }
}

SSOD_CPU_CLONES void row_max(const float* x, int64_t rows, int64_t C, float* out) {
  row_max_impl(x, rows, C, out);
}

SSOD_CPU_CLONES void row_max(const double* x, int64_t rows, int64_t C, double* out) {
  row_max_impl(x, rows, C, out);
}

template <typename T>
void frs_topk_mask_kernel(const T* logits, int64_t R, int64_t C, int64_t k, bool* mask, T* fg_out) {
  using Key = std::conditional_t<std::is_same_v<T, float>, uint32_t, uint64_t>;
  constexpr int kKeyBits = 8 * sizeof(Key);
  constexpr int64_t kTopSize = int64_t(1) << kTopBits;
  const int64_t blocks = (R + kRowsPerBlock - 1) / kRowsPerBlock;

  // Pass 1: row maxima, keys, and per-block histograms of the top digit.
  std::vector<T> row_maxima(R);
  std::vector<Key> keys(R);
  std::vector<int32_t> block_hist(blocks * kTopSize, 0);  // (blocks, 2^12)
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kRowsPerBlock, end = std::min(R, begin + kRowsPerBlock);
      row_max(logits + begin * C, end - begin, C, row_maxima.data() + begin);
      int32_t* hist = &block_hist[b * kTopSize];
      for (int64_t i = begin; i < end; ++i) {
        const Key key = ordered_key(row_maxima[i]);
        keys[i] = key;
        hist[key >> (kKeyBits - kTopBits)] += 1;
      }
    }
  });

  // Selection of the threshold key T and of the last tied row taken.
  std::vector<int64_t> hist(kTopSize, 0);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t d = 0; d < kTopSize; ++d) hist[d] += block_hist[b * kTopSize + d];
  }
  int64_t remaining = k;
  int shift = kKeyBits - kTopBits;
  Key prefix = static_cast<Key>(pick_digit(hist.data(), kTopSize, remaining)) << shift;
  std::vector<int64_t> candidates;  // row indices sharing the prefix, in index order
  for (int64_t i = 0; i < R; ++i) {
    if ((keys[i] >> shift) == (prefix >> shift)) candidates.push_back(i);
  }
  while (shift > 0) {
    const int width = std::min(shift, 8);
    shift -= width;
    const Key digit_mask = (Key(1) << width) - 1;
    int64_t digit_hist[256] = {0};
    for (const int64_t i : candidates) digit_hist[(keys[i] >> shift) & digit_mask] += 1;
    const Key digit = static_cast<Key>(pick_digit(digit_hist, int64_t(1) << width, remaining));
    prefix |= digit << shift;
    std::vector<int64_t> kept;
    kept.reserve(static_cast<size_t>(digit_hist[digit]));
    for (const int64_t i : candidates) {
      if (((keys[i] >> shift) & digit_mask) == digit) kept.push_back(i);
    }
    candidates.swap(kept);
  }
  // Every candidate now has key == T; the first `remaining` of them in index order are taken.
  const Key threshold = prefix;
  const int64_t last_tie = candidates[remaining - 1];

  // Pass 2: the mask and fg.
  std::vector<double> block_fg(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kRowsPerBlock, end = std::min(R, begin + kRowsPerBlock);
      double fg = 0.0;
      for (int64_t i = begin; i < end; ++i) {
        const bool selected = keys[i] > threshold || (keys[i] == threshold && i <= last_tie);
        mask[i] = selected;
        if (selected) fg += static_cast<double>(sigmoid(row_maxima[i]));
      }
      block_fg[b] = fg;
    }
  });
  double fg = 0.0;
  for (int64_t b = 0; b < blocks; ++b) fg += block_fg[b];
  *fg_out = static_cast<T>(fg);
}

std::tuple<at::Tensor, at::Tensor> frs_topk_mask_cpu(const at::Tensor& logits, int64_t k) {
  check_frs_inputs(logits, k, at::kCPU, "frs_topk_mask");
  const int64_t R = logits.size(0), C = logits.size(1);
  at::Tensor mask = at::zeros({R}, logits.options().dtype(at::kBool));
  at::Tensor fg = at::zeros({}, logits.options());
  if (k == 0) return {mask, fg};
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "frs_topk_mask_cpu", [&] {
    frs_topk_mask_kernel(logits.const_data_ptr<scalar_t>(), R, C, k, mask.mutable_data_ptr<bool>(),
                         fg.mutable_data_ptr<scalar_t>());
  });
  return {mask, fg};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssod_ops, CPU, m) {
  m.impl("frs_topk_mask", &frs_topk_mask_cpu);
}

}  // namespace ssod
