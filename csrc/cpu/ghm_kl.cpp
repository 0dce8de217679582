// ghm_kl on the CPU: SED's re-weighted KL (Eq. 5) and its gradient.
//
// Forward, one pass: the data is cut into fixed blocks (independent of the thread count); each block
// accumulates, per gradient-norm bin j, the count R_j and the KL sum S_j; the blocks are merged in index
// order, and loss = (1/M) sum_j S_j / R_j, which equals (1/M) sum_i KL_i / R_bin(g_i). Integer counts and
// a fixed summation order make the result deterministic.
// Backward, one pass: dL/ds_i = grad * (p_s - p_t)_i / (M R_bin(g_i)), elementwise (sigmoid) or per row.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../ssod_math.h"
#include "vectorize.h"

namespace ssod {
namespace {

constexpr int64_t kBlock = 1 << 15;  // elements per block of the fixed-order reduction
constexpr int64_t kChunk = 256;      // elements per vectorised step (their KL and bins stay in L1)
constexpr int32_t kMaskedBins = 32;  // up to this many bins, accumulate with vector compares, not scatters

// One block of sigmoid-mode elements: counts[j] += #{i: bin_i = j}, sums[j] += sum_{bin_i = j} KL_i.
template <typename T>
SSOD_ALWAYS_INLINE void sigmoid_block_impl(const T* s, const T* t, int64_t n, int32_t bins, int64_t* counts,
                                           double* sums) {
  alignas(64) T kl[kChunk];
  alignas(64) int32_t bin[kChunk];
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      T kl_i, g_i;
      bernoulli_kl(s[start + i], t[start + i], kl_i, g_i);
      kl[i] = kl_i;
      bin[i] = gradient_bin(g_i, bins);
    }
    if (bins <= kMaskedBins) {
      for (int32_t j = 0; j < bins; ++j) {
        T sum = T(0);
        int32_t count = 0;
#pragma omp simd reduction(+ : sum, count)
        for (int64_t i = 0; i < len; ++i) {
          const bool hit = bin[i] == j;
          sum += hit ? kl[i] : T(0);
          count += hit ? 1 : 0;
        }
        sums[j] += static_cast<double>(sum);
        counts[j] += count;
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        sums[bin[i]] += static_cast<double>(kl[i]);
        counts[bin[i]] += 1;
      }
    }
  }
}

SSOD_CPU_CLONES void sigmoid_block(const float* s, const float* t, int64_t n, int32_t bins, int64_t* counts,
                                   double* sums) {
  sigmoid_block_impl(s, t, n, bins, counts, sums);
}

SSOD_CPU_CLONES void sigmoid_block(const double* s, const double* t, int64_t n, int32_t bins, int64_t* counts,
                                   double* sums) {
  sigmoid_block_impl(s, t, n, bins, counts, sums);
}

template <typename T>
SSOD_ALWAYS_INLINE void sigmoid_grad_impl(const T* s, const T* t, int64_t n, int32_t bins, const T* scale,
                                          T* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T g;
    const T d = bernoulli_kl_grad(s[i], t[i], g);
    out[i] = d * scale[gradient_bin(g, bins)];
  }
}

SSOD_CPU_CLONES void sigmoid_grad(const float* s, const float* t, int64_t n, int32_t bins, const float* scale,
                                  float* out) {
  sigmoid_grad_impl(s, t, n, bins, scale, out);
}

SSOD_CPU_CLONES void sigmoid_grad(const double* s, const double* t, int64_t n, int32_t bins, const double* scale,
                                  double* out) {
  sigmoid_grad_impl(s, t, n, bins, scale, out);
}

// One block of softmax rows (C logits each).
template <typename T>
SSOD_ALWAYS_INLINE void softmax_block_impl(const T* s, const T* t, int64_t rows, int64_t C, int32_t bins,
                                           int64_t* counts, double* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    T kl, g;
    SoftmaxRow<T> rs, rt;
    softmax_kl_row(s + r * C, t + r * C, C, kl, g, rs, rt);
    const int32_t b = gradient_bin(g, bins);
    sums[b] += static_cast<double>(kl);
    counts[b] += 1;
  }
}

SSOD_CPU_CLONES void softmax_block(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins,
                                   int64_t* counts, double* sums) {
  softmax_block_impl(s, t, rows, C, bins, counts, sums);
}

SSOD_CPU_CLONES void softmax_block(const double* s, const double* t, int64_t rows, int64_t C, int32_t bins,
                                   int64_t* counts, double* sums) {
  softmax_block_impl(s, t, rows, C, bins, counts, sums);
}

template <typename T>
SSOD_ALWAYS_INLINE void softmax_grad_impl(const T* s, const T* t, int64_t rows, int64_t C, int32_t bins,
                                          const T* scale, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s_row = s + r * C;
    const T* t_row = t + r * C;
    T kl, g;
    SoftmaxRow<T> rs, rt;
    softmax_kl_row(s_row, t_row, C, kl, g, rs, rt);  // the same g, hence the same bin, as the forward
    const T w = scale[gradient_bin(g, bins)];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T ps = exp_nonpositive(s_row[c] - rs.max) * rs.inv_z;
      const T pt = exp_nonpositive(t_row[c] - rt.max) * rt.inv_z;
      out[r * C + c] = w * (ps - pt);
    }
  }
}

SSOD_CPU_CLONES void softmax_grad(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins,
                                  const float* scale, float* out) {
  softmax_grad_impl(s, t, rows, C, bins, scale, out);
}

SSOD_CPU_CLONES void softmax_grad(const double* s, const double* t, int64_t rows, int64_t C, int32_t bins,
                                  const double* scale, double* out) {
  softmax_grad_impl(s, t, rows, C, bins, scale, out);
}

std::tuple<at::Tensor, at::Tensor> ghm_kl_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                              c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCPU, "ghm_kl");
  const int64_t rows = student.size(0), C = student.size(1);
  const int64_t items = sigmoid ? rows * C : rows;                        // samples: elements or rows
  const int64_t per_block = sigmoid ? kBlock : std::max<int64_t>(1, kBlock / std::max<int64_t>(C, 1));
  const int64_t blocks = (items + per_block - 1) / per_block;
  const auto M = static_cast<int32_t>(bins);

  std::vector<int64_t> block_counts(blocks * bins, 0);  // (blocks, M)
  std::vector<double> block_sums(blocks * bins, 0.0);   // (blocks, M)
  at::Tensor loss = at::empty({}, student.options());
  at::Tensor counts = at::zeros({bins}, student.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "ghm_kl_cpu", [&] {
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * per_block, n = std::min(items, begin + per_block) - begin;
        if (sigmoid) {
          sigmoid_block(s + begin, t + begin, n, M, &block_counts[b * bins], &block_sums[b * bins]);
        } else {
          softmax_block(s + begin * C, t + begin * C, n, C, M, &block_counts[b * bins], &block_sums[b * bins]);
        }
      }
    });
    // Merge the blocks in index order, then Eq. 5 bin by bin.
    int64_t* total_counts = counts.mutable_data_ptr<int64_t>();
    std::vector<double> total_sums(bins, 0.0);
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t j = 0; j < bins; ++j) {
        total_counts[j] += block_counts[b * bins + j];
        total_sums[j] += block_sums[b * bins + j];
      }
    }
    double total = 0.0;
    for (int64_t j = 0; j < bins; ++j) {
      if (total_counts[j] > 0) total += total_sums[j] / static_cast<double>(total_counts[j]);
    }
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total / static_cast<double>(bins));
  });
  return {loss, counts};
}

at::Tensor ghm_kl_backward_cpu(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& counts, c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCPU, "ghm_kl_backward");
  check_ghm_backward_inputs(grad, counts, bins, student, "ghm_kl_backward");
  const int64_t rows = student.size(0), C = student.size(1);
  const auto M = static_cast<int32_t>(bins);
  at::Tensor out = at::empty_like(student);

  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "ghm_kl_backward_cpu", [&] {
    // The weight of a sample in bin j: grad / (M R_j); empty bins are never looked up.
    const double g = static_cast<double>(*grad.const_data_ptr<scalar_t>());
    const int64_t* R = counts.const_data_ptr<int64_t>();
    std::vector<scalar_t> scale(bins);
    for (int64_t j = 0; j < bins; ++j) {
      scale[j] = R[j] > 0 ? static_cast<scalar_t>(g / (static_cast<double>(bins) * static_cast<double>(R[j])))
                          : scalar_t(0);
    }
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (sigmoid) {
      at::parallel_for(0, rows * C, kBlock, [&](int64_t begin, int64_t end) {
        sigmoid_grad(s + begin, t + begin, end - begin, M, scale.data(), o + begin);
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, kBlock / std::max<int64_t>(C, 1));
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        softmax_grad(s + begin * C, t + begin * C, end - begin, C, M, scale.data(), o + begin * C);
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssod_ops, CPU, m) {
  m.impl("ghm_kl", &ghm_kl_cpu);
  m.impl("ghm_kl_backward", &ghm_kl_backward_cpu);
}

}  // namespace ssod
