// jitter_apply and refine_stats on CUDA: Soft Teacher's box jittering and uncertainty (Sec. 3.3, Eq. 8-9).
// One thread per jittered coordinate, and one thread per box (its `times` copies in a fixed order). A label
// outside [0, C) gives that box NaN (the CPU kernel raises; semi.ops.refine_stats checks on both devices).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../checks.h"
#include "../ssod_math.h"
#include "cuda_utils.cuh"

namespace ssod {
namespace {

template <typename T>
__global__ void jitter_apply_kernel(const T* __restrict__ boxes, const T* __restrict__ noise, int64_t n,
                                    int64_t total, T scale, T* __restrict__ out) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < total; j += int64_t(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(j % 4);
    const T* box = boxes + ((j / 4) % n) * 4;  // copy j / (4 n) of box (j / 4) % n
    out[j] = box[c] + noise[j] * scale * box_side(box, c);
  }
}

template <typename T>
__global__ void refine_stats_kernel(const T* __restrict__ deltas, const T* __restrict__ boxes,
                                    const int64_t* __restrict__ labels, int64_t times, int64_t n, int64_t C,
                                    T wx, T wy, T ww, T wh, T clip, T* __restrict__ mean_out,
                                    T* __restrict__ uncertainty_out) {
  const T weights[4] = {wx, wy, ww, wh};
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t label = labels[i];
    if (label < 0 || label >= C) {
      // A kernel cannot raise: an assert would leave the device unusable for the rest of the process. The box
      // gets NaN, read out of nothing; the Python entry point (semi.ops.refine_stats) checks the labels first.
      for (int c = 0; c < 4; ++c) mean_out[i * 4 + c] = static_cast<T>(NAN);
      uncertainty_out[i] = static_cast<T>(NAN);
      continue;
    }
    double mean[4] = {0, 0, 0, 0};
    T refined[4];
    for (int64_t t = 0; t < times; ++t) {
      const int64_t row = t * n + i;
      decode_box(deltas + (row * C + label) * 4, boxes + row * 4, weights, clip, refined);
      for (int c = 0; c < 4; ++c) mean[c] += static_cast<double>(refined[c]);
    }
    for (int c = 0; c < 4; ++c) mean[c] /= static_cast<double>(times);
    double squares[4] = {0, 0, 0, 0};
    for (int64_t t = 0; t < times; ++t) {
      const int64_t row = t * n + i;
      decode_box(deltas + (row * C + label) * 4, boxes + row * 4, weights, clip, refined);
      for (int c = 0; c < 4; ++c) {
        const double d = static_cast<double>(refined[c]) - mean[c];
        squares[c] += d * d;
      }
    }
    T mean_box[4];
    for (int c = 0; c < 4; ++c) mean_box[c] = static_cast<T>(mean[c]);
    double uncertainty = 0.0;
    for (int c = 0; c < 4; ++c) {
      uncertainty += sqrt_any(squares[c] / static_cast<double>(times - 1)) / static_cast<double>(box_side(mean_box, c));
      mean_out[i * 4 + c] = mean_box[c];
    }
    uncertainty_out[i] = static_cast<T>(uncertainty / 4.0);
  }
}

at::Tensor jitter_apply_cuda(const at::Tensor& boxes, const at::Tensor& noise, double scale) {
  check_jitter_inputs(boxes, noise, at::kCUDA, "jitter_apply");
  const c10::cuda::CUDAGuard guard(boxes.device());
  at::Tensor out = at::empty_like(noise);
  const int64_t total = noise.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "jitter_apply_cuda", [&] {
    jitter_apply_kernel<scalar_t><<<grid_for(total, 1, 65535), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        boxes.const_data_ptr<scalar_t>(), noise.const_data_ptr<scalar_t>(), boxes.size(0), total,
        static_cast<scalar_t>(scale), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> refine_stats_cuda(const at::Tensor& deltas, const at::Tensor& boxes,
                                                     const at::Tensor& labels, at::ArrayRef<double> weights,
                                                     double bbox_clip) {
  check_refine_inputs(deltas, boxes, labels, weights, at::kCUDA, "refine_stats");
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t times = boxes.size(0), n = boxes.size(1), C = deltas.size(2);
  at::Tensor mean_boxes = at::empty({n, 4}, boxes.options());
  at::Tensor uncertainty = at::empty({n}, boxes.options());
  if (n == 0) return {mean_boxes, uncertainty};
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "refine_stats_cuda", [&] {
    using T = scalar_t;
    refine_stats_kernel<T><<<grid_for(n, 1, 65535), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        deltas.const_data_ptr<T>(), boxes.const_data_ptr<T>(), labels.const_data_ptr<int64_t>(), times, n, C,
        static_cast<T>(weights[0]), static_cast<T>(weights[1]), static_cast<T>(weights[2]),
        static_cast<T>(weights[3]), static_cast<T>(bbox_clip), mean_boxes.mutable_data_ptr<T>(),
        uncertainty.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean_boxes, uncertainty};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssod_ops, CUDA, m) {
  m.impl("jitter_apply", &jitter_apply_cuda);
  m.impl("refine_stats", &refine_stats_cuda);
}

}  // namespace ssod
