// ghm_kl on CUDA: SED's re-weighted KL (Eq. 5) and its gradient.
//
// Forward: a fixed grid (it depends only on the size) grid-strides over the samples; each thread keeps, for
// a group of up to kGroup bins, its counts and KL sums in registers; each block reduces them with a tree
// in shared memory into per-block partials; one last block merges the partials in a fixed order and forms
// loss = (1/M) sum_j S_j / R_j. No float atomics: the result is the same on every run. More than kGroup
// bins take one pass per group. ghm_kl_forward also writes, in the first pass, the unweighted gradient
// d = p_s - p_t of every sample and (softmax) the bin of every row.
// Backward: from the forward's d, one in-place multiply per element (ghm_kl_weight_); or recomputing d
// with the forward's kernels (ghm_kl_backward), then the same multiply. The weights grad / (M R_j) are
// formed on the device from the saved counts (as the CPU forms them), so nothing waits for the host.
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
constexpr int64_t kPartials = int64_t(1) << 22;

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

// One block merges the blocks' partials of each bin in a fixed order (block_sum_strided), and sums
// S_j / R_j over the bins in order.
template <typename T>
__global__ void ghm_finish_kernel(const double* __restrict__ partial_sums, const int64_t* __restrict__ partial_counts,
                                  int64_t blocks, int32_t bins, int64_t* __restrict__ counts, T* __restrict__ loss) {
  __shared__ double shared_sums[kThreads];
  __shared__ int64_t shared_counts[kThreads];
  double total = 0.0;
  for (int32_t j = 0; j < bins; ++j) {
    const double sum = block_sum_strided(partial_sums + j, blocks, bins, shared_sums);
    const int64_t count = block_sum_strided(partial_counts + j, blocks, bins, shared_counts);
    if (threadIdx.x == 0) counts[j] = count;
    if (count > 0) total += sum / static_cast<double>(count);
  }
  if (threadIdx.x == 0) *loss = static_cast<T>(total / static_cast<double>(bins));
}

// The weight of a sample in bin j, grad / (M R_j), formed in double as the CPU kernels form it; 0 for an
// empty bin (never looked up).
template <typename T>
__global__ void ghm_bin_weights_kernel(const T* __restrict__ grad, const int64_t* __restrict__ counts, int32_t bins,
                                       T* __restrict__ weights) {
  const double g = static_cast<double>(*grad);
  for (int32_t j = threadIdx.x; j < bins; j += blockDim.x) {
    const int64_t R = counts[j];
    weights[j] = R > 0 ? static_cast<T>(g / (static_cast<double>(bins) * static_cast<double>(R))) : T(0);
  }
}

// d *= weights[bin] in place, the bin of an element being that of |d| (sigmoid) or its row's (softmax).
template <typename T>
__global__ void ghm_weight_kernel(T* __restrict__ d, int64_t n, int64_t C, bool sigmoid,
                                  const int32_t* __restrict__ row_bins, int32_t bins, const T* __restrict__ weights) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const T d_i = d[i];
    const int32_t bin = sigmoid ? gradient_bin(abs_value(d_i), bins) : row_bins[i / C];
    d[i] = d_i * weights[bin];
  }
}

// The forward of ghm_kl and ghm_kl_forward; with dkl and row_bins not null, the first pass also writes them.
void ghm_kl_forward_into(const at::Tensor& student, const at::Tensor& teacher, bool sigmoid, int64_t bins,
                         at::Tensor& loss, at::Tensor& counts, at::Tensor* dkl, at::Tensor* row_bins) {
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0), C = student.size(1);
  const int64_t items = sigmoid ? rows * C : rows;
  // At most kPartials partials (blocks x bins, 16 bytes each): many bins take fewer blocks.
  const int64_t blocks = grid_for(items, sigmoid ? 8 : 1, std::clamp<int64_t>(kPartials / bins, 1, 4096));
  const auto M = static_cast<int32_t>(bins);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor partial_sums = at::empty({blocks, bins}, student.options().dtype(at::kDouble));
  at::Tensor partial_counts = at::empty({blocks, bins}, student.options().dtype(at::kLong));

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
        counts.mutable_data_ptr<int64_t>(), loss.mutable_data_ptr<scalar_t>());
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

// dkl *= grad / (M R_bin) in place (ghm_kl_weight_'s checks done by the caller).
void ghm_kl_weight_into(at::Tensor& dkl, const at::Tensor& sample_bins, const at::Tensor& grad,
                        const at::Tensor& counts, bool sigmoid, int64_t bins) {
  if (dkl.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(dkl.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor weights = at::empty({bins}, dkl.options());
  AT_DISPATCH_FLOATING_TYPES(dkl.scalar_type(), "ghm_kl_weight_cuda", [&] {
    ghm_bin_weights_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>(), static_cast<int32_t>(bins),
        weights.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ghm_weight_kernel<scalar_t><<<grid_for(dkl.numel(), 4, 65535), kThreads, 0, stream>>>(
        dkl.mutable_data_ptr<scalar_t>(), dkl.numel(), dkl.size(1), sigmoid,
        sigmoid ? nullptr : sample_bins.const_data_ptr<int32_t>(), static_cast<int32_t>(bins),
        weights.const_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void ghm_kl_weight_cuda(at::Tensor& dkl, const at::Tensor& sample_bins, const at::Tensor& grad,
                        const at::Tensor& counts, c10::string_view mode, int64_t bins) {
  const bool sigmoid =
      check_ghm_weight_inputs(dkl, sample_bins, grad, counts, mode, bins, at::kCUDA, "ghm_kl_weight_");
  ghm_kl_weight_into(dkl, sample_bins, grad, counts, sigmoid, bins);
}

// Recomputes what ghm_kl_forward keeps, with the forward's own kernels (hence the same p_s - p_t and bins,
// bit for bit), then weights it in place. For a backward whose forward did not keep dkl.
at::Tensor ghm_kl_backward_cuda(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                const at::Tensor& counts, c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCUDA, "ghm_kl_backward");
  check_ghm_backward_inputs(grad, counts, bins, student, "ghm_kl_backward");
  at::Tensor out = at::empty_like(student);
  if (out.numel() == 0) return out;
  at::Tensor loss = at::empty({}, student.options());
  at::Tensor recounted = at::empty({bins}, counts.options());
  at::Tensor row_bins = at::empty({sigmoid ? 0 : student.size(0)}, student.options().dtype(at::kInt));
  ghm_kl_forward_into(student, teacher, sigmoid, bins, loss, recounted, &out, &row_bins);
  ghm_kl_weight_into(out, row_bins, grad, counts, sigmoid, bins);
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
