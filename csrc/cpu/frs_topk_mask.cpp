// frs_topk_mask on the CPU: Dense Teacher's learning region (Eq. 3-4).
//
// Pass 1 (parallel over fixed row blocks): the maximum logit of every row (vectorised along the row), its
// ordered key, and per block a histogram of the key's top 12 bits. Rows are ranked by key, so no sigmoid is
// taken here. Selection (serial, O(R)): the top digit from the merged histograms, then the candidates sharing
// it are narrowed 8 bits at a time to the exact k-th key (select.h). Pass 2 (parallel): the mask, and per
// block the sum of sigmoid(max) over the selected rows (the key gives the maximum back exactly), merged in
// block order so that fg is deterministic. The logits are read once.
// The vector helpers pass GCC vectors by value; they are always inlined, so no call crosses the ABI that
// -Wpsabi warns about.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../select.h"
#include "../ssod_math.h"
#include "vectorize.h"

namespace ssod {
namespace {

constexpr int64_t kRowsPerBlock = 8192;
constexpr int64_t kMinBlocksPerThread = 4;
constexpr int kTopBits = 12;
constexpr int64_t kTopSize = int64_t(1) << kTopBits;

// The float a key was made from (ordered_key of ssod_math.h, inverted; -0 comes back as +0).
SSOD_ALWAYS_INLINE float key_value(uint32_t key) {
  return bits_to_float(static_cast<int32_t>((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key));
}

SSOD_ALWAYS_INLINE double key_value(uint64_t key) {
  const uint64_t bits = (key & 0x8000000000000000ull) ? (key & 0x7fffffffffffffffull) : ~key;
  double x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// row_keys: keys[r] = ordered_key(max_c x[r, c]) and hist[top digit of keys[r]] += 1 for `rows` rows of C
// logits.

// Rows of C >= W float32 logits, W classes at a time: whole vectors, then, when C is not a multiple of W, a
// last vector at C - W that overlaps the one before (a maximum does not mind).
template <int W, int U>
SSOD_ALWAYS_INLINE void row_keys_simd(const float* x, int64_t rows, int64_t C, uint32_t* keys, int32_t* hist) {
  using simd::Float;
  const int64_t whole = C - C % W;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * C;
    Float<W> m = simd::load<W>(row);
    for (int64_t c = W; c < whole; c += W) {
      const Float<W> v = simd::load<W>(row + c);
      m = v > m ? v : m;
    }
    if (whole < C) {
      const Float<W> v = simd::load<W>(row + C - W);
      m = v > m ? v : m;
    }
    const uint32_t key = ordered_key(simd::max_lanes<W>(m));
    keys[r] = key;
    hist[key >> (32 - kTopBits)] += 1;
  }
}

SSOD_SIMD_VERSIONS(void, row_keys_vector, (const float* x, int64_t rows, int64_t C, uint32_t* keys, int32_t* hist),
                   row_keys_simd, (x, rows, C, keys, hist))

// Any C (float64, and float32 rows shorter than a vector): the compiler vectorises the row's reduction.
template <typename T, typename Key>
SSOD_ALWAYS_INLINE void row_keys_impl(const T* x, int64_t rows, int64_t C, Key* keys, int32_t* hist) {
  constexpr int kKeyBits = 8 * sizeof(Key);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * C;
    T m = row[0];
#pragma omp simd reduction(max : m)
    for (int64_t c = 1; c < C; ++c) m = row[c] > m ? row[c] : m;
    const Key key = ordered_key(m);
    keys[r] = key;
    hist[key >> (kKeyBits - kTopBits)] += 1;
  }
}

SSOD_CPU_CLONES void row_keys_scalar(const float* x, int64_t rows, int64_t C, uint32_t* keys, int32_t* hist) {
  row_keys_impl(x, rows, C, keys, hist);
}

SSOD_CPU_CLONES void row_keys_scalar(const double* x, int64_t rows, int64_t C, uint64_t* keys, int32_t* hist) {
  row_keys_impl(x, rows, C, keys, hist);
}

void row_keys(const float* x, int64_t rows, int64_t C, uint32_t* keys, int32_t* hist) {
  if (C >= 16) {  // at least one vector of the widest instruction set
    row_keys_vector(x, rows, C, keys, hist);
  } else {
    row_keys_scalar(x, rows, C, keys, hist);
  }
}

void row_keys(const double* x, int64_t rows, int64_t C, uint64_t* keys, int32_t* hist) {
  row_keys_scalar(x, rows, C, keys, hist);
}

template <typename T>
void frs_topk_mask_kernel(const T* logits, int64_t R, int64_t C, int64_t k, bool* mask, T* fg_out) {
  using Key = std::conditional_t<std::is_same_v<T, float>, uint32_t, uint64_t>;
  constexpr int kKeyBits = 8 * sizeof(Key);
  const int64_t blocks = (R + kRowsPerBlock - 1) / kRowsPerBlock;

  // Pass 1: keys, and per-block histograms of the top digit.
  std::vector<Key> keys(R);
  std::vector<int32_t> block_hist(blocks * kTopSize, 0);  // (blocks, 2^12)
  parallel_blocks(blocks, kMinBlocksPerThread, [&](int64_t b) {
    const int64_t begin = b * kRowsPerBlock, end = std::min(R, begin + kRowsPerBlock);
    row_keys(logits + begin * C, end - begin, C, keys.data() + begin, &block_hist[b * kTopSize]);
  });

  // Selection of the threshold key T and of the last tied row taken.
  std::vector<int64_t> hist(kTopSize, 0);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t d = 0; d < kTopSize; ++d) hist[d] += block_hist[b * kTopSize + d];
  }
  int64_t remaining = k;
  int shift = kKeyBits - kTopBits;
  const Key top = static_cast<Key>(pick_digit(hist.data(), kTopSize, remaining));
  Key prefix = top << shift;
  std::vector<int64_t> candidates;  // row indices sharing the prefix, in index order
  candidates.reserve(static_cast<size_t>(hist[top]));
  for (int64_t i = 0; i < R; ++i) {
    if ((keys[i] >> shift) == top) candidates.push_back(i);
  }
  while (shift > 0) {
    const int width = std::min(shift, 8);
    shift -= width;
    const Key digit_mask = (Key(1) << width) - 1;
    int64_t digit_hist[256] = {0};
    for (const int64_t i : candidates) digit_hist[(keys[i] >> shift) & digit_mask] += 1;
    const Key digit = static_cast<Key>(pick_digit(digit_hist, int64_t(1) << width, remaining));
    prefix |= digit << shift;
    size_t kept = 0;  // filtered in place, in index order
    for (const int64_t i : candidates) {
      if (((keys[i] >> shift) & digit_mask) == digit) candidates[kept++] = i;
    }
    candidates.resize(kept);
  }
  // Every candidate now has key == T; the first `remaining` of them in index order are taken.
  const Key threshold = prefix;
  const int64_t last_tie = candidates[remaining - 1];

  // Pass 2: the mask and fg.
  std::vector<double> block_fg(blocks, 0.0);
  parallel_blocks(blocks, kMinBlocksPerThread, [&](int64_t b) {
    const int64_t begin = b * kRowsPerBlock, end = std::min(R, begin + kRowsPerBlock);
    double fg = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      const bool selected = keys[i] > threshold || (keys[i] == threshold && i <= last_tie);
      mask[i] = selected;
      if (selected) fg += static_cast<double>(sigmoid(static_cast<T>(key_value(keys[i]))));
    }
    block_fg[b] = fg;
  });
  double fg = 0.0;
  for (int64_t b = 0; b < blocks; ++b) fg += block_fg[b];
  *fg_out = static_cast<T>(fg);
}

std::tuple<at::Tensor, at::Tensor> frs_topk_mask_cpu(const at::Tensor& logits, int64_t k) {
  check_frs_inputs(logits, k, at::kCPU, "frs_topk_mask");
  const int64_t R = logits.size(0), C = logits.size(1);
  at::Tensor fg = at::zeros({}, logits.options());
  if (k == 0) return {at::zeros({R}, logits.options().dtype(at::kBool)), fg};
  at::Tensor mask = at::empty({R}, logits.options().dtype(at::kBool));  // every entry is written
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
