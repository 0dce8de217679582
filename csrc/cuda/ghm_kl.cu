// ghm_kl on CUDA: SED's re-weighted KL (Eq. 5) and its gradient.
//
// Forward: a fixed grid (it depends only on the size) grid-strides over the samples; each thread keeps, for
// a group of up to kGroup bins, its counts and KL sums in registers; each block reduces them with a tree
// in shared memory into per-block partials; one last block merges the partials in block order and forms
// loss = (1/M) sum_j S_j / R_j. No float atomics: the result is the same on every run. More than kGroup
// bins take one pass per group. ghm_kl_forward also writes, in the first pass, the unweighted gradient
// d = p_s - p_t of every sample and (softmax) the bin of every row.
// Backward: from the forward's d, one in-place multiply per element (ghm_kl_weight_); or recomputing d
// from the logits (ghm_kl_backward), one thread per element (sigmoid) or per row (softmax). The weights
// grad / (M R_j) are formed on the device from the saved counts, so nothing waits for the host.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../checks.h"
#include "../ssod_math.h"
#include "cuda_utils.cuh"

namespace ssod {
namespace {

constexpr int kGroup = 16;

// KL and g of sample i: element i (sigmoid) or row i (softmax); with dkl not null, also its dKL / ds into
// dkl (element i, or row i).
template <typename T, bool kSoftmax>
__device__ __forceinline__ void sample_kl(const T* s, const T* t, int64_t i, int64_t C, T& kl, T& g, T* dkl) {
  if (kSoftmax) {
    SoftmaxRow<T> rs, rt;
    softmax_kl_row(s + i * C, t + i * C, C, kl, g, rs, rt, dkl != nullptr ? dkl + i * C : nullptr);
  } else {
    T d;
    bernoulli_kl(s[i], t[i], kl, d);
    if (dkl != nullptr) dkl[i] = d;
    g = abs_value(d);
  }
}

template <typename T, bool kSoftmax>
__global__ void ghm_partials_kernel(const T* __restrict__ s, const T* __restrict__ t, int64_t items, int64_t C,
                                    int32_t bins, int32_t group_begin, double* __restrict__ partial_sums,
                                    int64_t* __restrict__ partial_counts, T* __restrict__ dkl,
                                    int32_t* __restrict__ row_bins) {
  __shared__ double shared_sums[kThreads];
  __shared__ int64_t shared_counts[kThreads];
  double sums[kGroup];
  int64_t counts[kGroup];
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    sums[j] = 0.0;
    counts[j] = 0;
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < items; i += int64_t(gridDim.x) * blockDim.x) {
    T kl, g;
    sample_kl<T, kSoftmax>(s, t, i, C, kl, g, dkl);
    const int32_t bin = gradient_bin(g, bins);
    if (row_bins != nullptr) row_bins[i] = bin;
    const int32_t local = bin - group_begin;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {  // a register array is indexed by constants only
      if (local == j) {
        sums[j] += static_cast<double>(kl);
        counts[j] += 1;
      }
    }
  }
  const int group_size = min(kGroup, bins - group_begin);
  for (int j = 0; j < group_size; ++j) {
    const double block_sums = block_sum(sums[j], shared_sums);
    const int64_t block_counts = block_sum(counts[j], shared_counts);
    if (threadIdx.x == 0) {
      partial_sums[blockIdx.x * int64_t(bins) + group_begin + j] = block_sums;
      partial_counts[blockIdx.x * int64_t(bins) + group_begin + j] = block_counts;
    }
  }
}

// One thread per bin merges the blocks in order; thread 0 then sums the bins in order.
template <typename T>
__global__ void ghm_finish_kernel(const double* __restrict__ partial_sums, const int64_t* __restrict__ partial_counts,
                                  int64_t blocks, int32_t bins, double* __restrict__ bin_sums,
                                  int64_t* __restrict__ counts, T* __restrict__ loss) {
  for (int32_t j = threadIdx.x; j < bins; j += blockDim.x) {
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      sum += partial_sums[b * bins + j];
      count += partial_counts[b * bins + j];
    }
    bin_sums[j] = sum;
    counts[j] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int32_t j = 0; j < bins; ++j) {
      if (counts[j] > 0) total += bin_sums[j] / static_cast<double>(counts[j]);
    }
    *loss = static_cast<T>(total / static_cast<double>(bins));
  }
}

template <typename T>
__global__ void ghm_sigmoid_grad_kernel(const T* __restrict__ s, const T* __restrict__ t, int64_t n, int32_t bins,
                                        const T* __restrict__ grad, const int64_t* __restrict__ counts,
                                        T* __restrict__ out) {
  const T scale = *grad / static_cast<T>(bins);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const T d = bernoulli_kl_grad(s[i], t[i]);
    const int64_t R = counts[gradient_bin(abs_value(d), bins)];
    out[i] = R > 0 ? d * scale / static_cast<T>(R) : T(0);
  }
}

template <typename T>
__global__ void ghm_softmax_grad_kernel(const T* __restrict__ s, const T* __restrict__ t, int64_t rows, int64_t C,
                                        int32_t bins, const T* __restrict__ grad,
                                        const int64_t* __restrict__ counts, T* __restrict__ out) {
  const T scale = *grad / static_cast<T>(bins);
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    const T* s_row = s + r * C;
    const T* t_row = t + r * C;
    T kl, g;
    SoftmaxRow<T> rs, rt;
    softmax_kl_row(s_row, t_row, C, kl, g, rs, rt);
    const int64_t R = counts[gradient_bin(g, bins)];
    const T w = R > 0 ? scale / static_cast<T>(R) : T(0);
    for (int64_t c = 0; c < C; ++c) {
      const T ps = exp_nonpositive(s_row[c] - rs.max) * rs.inv_z;
      const T pt = exp_nonpositive(t_row[c] - rt.max) * rt.inv_z;
      out[r * C + c] = w * (ps - pt);
    }
  }
}

// d *= grad / (M R_bin) in place, the bin of an element being that of |d| (sigmoid) or its row's (softmax);
// the same expression as the recomputing kernels above.
template <typename T>
__global__ void ghm_weight_kernel(T* __restrict__ d, int64_t n, int64_t C, bool sigmoid,
                                  const int32_t* __restrict__ row_bins, int32_t bins, const T* __restrict__ grad,
                                  const int64_t* __restrict__ counts) {
  const T scale = *grad / static_cast<T>(bins);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const T d_i = d[i];
    const int32_t bin = sigmoid ? gradient_bin(abs_value(d_i), bins) : row_bins[i / C];
    const int64_t R = counts[bin];
    d[i] = R > 0 ? d_i * scale / static_cast<T>(R) : T(0);
  }
}

// The forward of ghm_kl and ghm_kl_forward; with dkl and row_bins not null, the first pass also writes them.
void ghm_kl_forward_into(const at::Tensor& student, const at::Tensor& teacher, bool sigmoid, int64_t bins,
                         at::Tensor& loss, at::Tensor& counts, at::Tensor* dkl, at::Tensor* row_bins) {
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0), C = student.size(1);
  const int64_t items = sigmoid ? rows * C : rows;
  const int64_t blocks = grid_for(items, sigmoid ? 8 : 1);
  const auto M = static_cast<int32_t>(bins);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor partial_sums = at::empty({blocks, bins}, student.options().dtype(at::kDouble));
  at::Tensor partial_counts = at::empty({blocks, bins}, student.options().dtype(at::kLong));
  at::Tensor bin_sums = at::empty({bins}, student.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "ghm_kl_cuda", [&] {
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    for (int32_t group = 0; group < M; group += kGroup) {
      scalar_t* d = group == 0 && dkl != nullptr ? dkl->mutable_data_ptr<scalar_t>() : nullptr;
      int32_t* rb = group == 0 && row_bins != nullptr && !sigmoid ? row_bins->mutable_data_ptr<int32_t>() : nullptr;
      if (sigmoid) {
        ghm_partials_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
            s, t, items, C, M, group, partial_sums.mutable_data_ptr<double>(),
            partial_counts.mutable_data_ptr<int64_t>(), d, rb);
      } else {
        ghm_partials_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
            s, t, items, C, M, group, partial_sums.mutable_data_ptr<double>(),
            partial_counts.mutable_data_ptr<int64_t>(), d, rb);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    ghm_finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        partial_sums.const_data_ptr<double>(), partial_counts.const_data_ptr<int64_t>(), blocks, M,
        bin_sums.mutable_data_ptr<double>(), counts.mutable_data_ptr<int64_t>(), loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> ghm_kl_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                               c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCUDA, "ghm_kl");
  at::Tensor loss = at::empty({}, student.options());
  at::Tensor counts = at::empty({bins}, student.options().dtype(at::kLong));
  ghm_kl_forward_into(student, teacher, sigmoid, bins, loss, counts, nullptr, nullptr);
  return {loss, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghm_kl_forward_cuda(const at::Tensor& student,
                                                                               const at::Tensor& teacher,
                                                                               c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCUDA, "ghm_kl_forward");
  at::Tensor loss = at::empty({}, student.options());
  at::Tensor counts = at::empty({bins}, student.options().dtype(at::kLong));
  at::Tensor dkl = at::empty_like(student);
  at::Tensor row_bins = at::empty({sigmoid ? 0 : student.size(0)}, student.options().dtype(at::kInt));
  ghm_kl_forward_into(student, teacher, sigmoid, bins, loss, counts, &dkl, &row_bins);
  return {loss, counts, dkl, row_bins};
}

void ghm_kl_weight_cuda(at::Tensor& dkl, const at::Tensor& sample_bins, const at::Tensor& grad,
                        const at::Tensor& counts, c10::string_view mode, int64_t bins) {
  const bool sigmoid =
      check_ghm_weight_inputs(dkl, sample_bins, grad, counts, mode, bins, at::kCUDA, "ghm_kl_weight_");
  if (dkl.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(dkl.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dkl.scalar_type(), "ghm_kl_weight_cuda", [&] {
    ghm_weight_kernel<scalar_t><<<grid_for(dkl.numel(), 4, 65535), kThreads, 0, stream>>>(
        dkl.mutable_data_ptr<scalar_t>(), dkl.numel(), dkl.size(1), sigmoid,
        sigmoid ? nullptr : sample_bins.const_data_ptr<int32_t>(), static_cast<int32_t>(bins),
        grad.const_data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor ghm_kl_backward_cuda(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                const at::Tensor& counts, c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCUDA, "ghm_kl_backward");
  check_ghm_backward_inputs(grad, counts, bins, student, "ghm_kl_backward");
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0), C = student.size(1);
  at::Tensor out = at::empty_like(student);
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "ghm_kl_backward_cuda", [&] {
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    if (sigmoid) {
      ghm_sigmoid_grad_kernel<scalar_t><<<grid_for(rows * C, 4, 65535), kThreads, 0, stream>>>(
          s, t, rows * C, static_cast<int32_t>(bins), grad.const_data_ptr<scalar_t>(),
          counts.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>());
    } else {
      ghm_softmax_grad_kernel<scalar_t><<<grid_for(rows, 1, 65535), kThreads, 0, stream>>>(
          s, t, rows, C, static_cast<int32_t>(bins), grad.const_data_ptr<scalar_t>(),
          counts.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssod_ops, CUDA, m) {
  m.impl("ghm_kl", &ghm_kl_cuda);
  m.impl("ghm_kl_backward", &ghm_kl_backward_cuda);
  m.impl("ghm_kl_forward", &ghm_kl_forward_cuda);
  m.impl("ghm_kl_weight_", &ghm_kl_weight_cuda);
}

}  // namespace ssod
