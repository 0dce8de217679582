// jitter_apply and refine_stats on the CPU: Soft Teacher's box jittering and uncertainty (Sec. 3.3, Eq. 8-9).
//
// jitter_apply: every copy of every box in one parallel loop (the normal numbers are drawn by torch).
// refine_stats: one task per box; it decodes only the predicted class's deltas of its `times` copies,
// then takes the mean and the unbiased std in two fixed-order passes (accumulated in double).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../checks.h"
#include "../ssod_math.h"

namespace ssod {
namespace {

at::Tensor jitter_apply_cpu(const at::Tensor& boxes, const at::Tensor& noise, double scale) {
  check_jitter_inputs(boxes, noise, at::kCPU, "jitter_apply");
  const int64_t times = noise.size(0), n = boxes.size(0);
  at::Tensor out = at::empty_like(noise);
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "jitter_apply_cpu", [&] {
    const scalar_t* b = boxes.const_data_ptr<scalar_t>();
    const scalar_t* z = noise.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const auto sc = static_cast<scalar_t>(scale);
    at::parallel_for(0, times * n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const scalar_t* box = b + (j % n) * 4;  // copy j / n of box j % n
        for (int c = 0; c < 4; ++c) o[j * 4 + c] = box[c] + z[j * 4 + c] * sc * box_side(box, c);
      }
    });
  });
  return out;
}

template <typename T>
void refine_box(const T* deltas, const T* boxes, const int64_t* labels, int64_t times, int64_t n, int64_t C,
                const T* weights, T clip, int64_t i, T* mean_out, T* uncertainty_out) {
  const int64_t label = labels[i];
  TORCH_CHECK(label >= 0 && label < C, "ssod_ops.refine_stats: label ", label, " of box ", i,
              " is outside [0, ", C, ")");
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
    const double std = sqrt_any(squares[c] / static_cast<double>(times - 1));
    uncertainty += std / static_cast<double>(box_side(mean_box, c));
    mean_out[i * 4 + c] = mean_box[c];
  }
  uncertainty_out[i] = static_cast<T>(uncertainty / 4.0);
}

std::tuple<at::Tensor, at::Tensor> refine_stats_cpu(const at::Tensor& deltas, const at::Tensor& boxes,
                                                    const at::Tensor& labels, at::ArrayRef<double> weights,
                                                    double bbox_clip) {
  check_refine_inputs(deltas, boxes, labels, weights, at::kCPU, "refine_stats");
  const int64_t times = boxes.size(0), n = boxes.size(1), C = deltas.size(2);
  at::Tensor mean_boxes = at::empty({n, 4}, boxes.options());
  at::Tensor uncertainty = at::empty({n}, boxes.options());
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "refine_stats_cpu", [&] {
    const scalar_t w[4] = {static_cast<scalar_t>(weights[0]), static_cast<scalar_t>(weights[1]),
                           static_cast<scalar_t>(weights[2]), static_cast<scalar_t>(weights[3])};
    const scalar_t* d = deltas.const_data_ptr<scalar_t>();
    const scalar_t* b = boxes.const_data_ptr<scalar_t>();
    const int64_t* l = labels.const_data_ptr<int64_t>();
    scalar_t* m = mean_boxes.mutable_data_ptr<scalar_t>();
    scalar_t* u = uncertainty.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        refine_box(d, b, l, times, n, C, w, static_cast<scalar_t>(bbox_clip), i, m, u);
      }
    });
  });
  return {mean_boxes, uncertainty};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssod_ops, CPU, m) {
  m.impl("jitter_apply", &jitter_apply_cpu);
  m.impl("refine_stats", &refine_stats_cpu);
}

}  // namespace ssod
