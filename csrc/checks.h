// Input checks shared by the CPU and CUDA kernels: every failure names the op, the argument and the problem.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace ssod {

inline void check_float(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "ssod_ops.", op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
}

inline void check_dtype(const at::Tensor& x, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(x.scalar_type() == dtype, "ssod_ops.", op, ": ", name, " must be ", dtype, ", got ",
              x.scalar_type());
}

inline void check_contiguous(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_contiguous(), "ssod_ops.", op, ": ", name, " must be contiguous (call .contiguous())");
}

inline void check_device(const at::Tensor& x, at::DeviceType device, const char* op, const char* name) {
  TORCH_CHECK(x.device().type() == device, "ssod_ops.", op, ": ", name, " must be on ", device, ", got ",
              x.device());
}

inline void check_same_device(const at::Tensor& x, const at::Tensor& y, const char* op, const char* name_x,
                              const char* name_y) {
  TORCH_CHECK(x.device() == y.device(), "ssod_ops.", op, ": ", name_x, " and ", name_y,
              " must be on the same device, got ", x.device(), " and ", y.device());
}

inline void check_dim(const at::Tensor& x, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == dim, "ssod_ops.", op, ": ", name, " must have ", dim, " dimensions, got shape ",
              x.sizes());
}

// Checks of every op, by device type (kCPU or kCUDA). Shapes are checked here once for both devices.
inline bool check_ghm_inputs(const at::Tensor& student, const at::Tensor& teacher, c10::string_view mode,
                             int64_t bins, at::DeviceType device, const char* op) {
  TORCH_CHECK(mode == "sigmoid" || mode == "softmax", "ssod_ops.", op,
              ": mode must be \"sigmoid\" or \"softmax\", got \"", mode, "\"");
  TORCH_CHECK(bins >= 1 && bins <= (1 << 20), "ssod_ops.", op, ": bins must be in [1, 2^20], got ", bins);
  check_float(student, op, "student");
  check_dtype(teacher, student.scalar_type(), op, "teacher (same dtype as student)");
  check_dim(student, 2, op, "student");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "ssod_ops.", op,
              ": student and teacher must have the same shape, got ", student.sizes(), " and ", teacher.sizes());
  check_device(student, device, op, "student");
  check_device(teacher, device, op, "teacher");
  check_same_device(student, teacher, op, "student", "teacher");
  check_contiguous(student, op, "student");
  check_contiguous(teacher, op, "teacher");
  const bool sigmoid = mode == "sigmoid";
  TORCH_CHECK(sigmoid || student.size(0) == 0 || student.size(1) > 0, "ssod_ops.", op,
              ": softmax rows need at least one class");
  return sigmoid;
}

inline void check_ghm_backward_inputs(const at::Tensor& grad, const at::Tensor& counts, int64_t bins,
                                      const at::Tensor& student, const char* op) {
  TORCH_CHECK(grad.dim() == 0, "ssod_ops.", op, ": grad must be a 0-dim tensor, got shape ", grad.sizes());
  check_dtype(grad, student.scalar_type(), op, "grad (same dtype as student)");
  check_same_device(grad, student, op, "grad", "student");
  check_dtype(counts, at::kLong, op, "counts");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == bins, "ssod_ops.", op, ": counts must be (bins,) = (",
              bins, ",), got ", counts.sizes());
  check_same_device(counts, student, op, "counts", "student");
  check_contiguous(counts, op, "counts");
}

inline bool check_ghm_weight_inputs(const at::Tensor& dkl, const at::Tensor& sample_bins, const at::Tensor& grad,
                                    const at::Tensor& counts, c10::string_view mode, int64_t bins,
                                    at::DeviceType device, const char* op) {
  TORCH_CHECK(mode == "sigmoid" || mode == "softmax", "ssod_ops.", op,
              ": mode must be \"sigmoid\" or \"softmax\", got \"", mode, "\"");
  TORCH_CHECK(bins >= 1 && bins <= (1 << 20), "ssod_ops.", op, ": bins must be in [1, 2^20], got ", bins);
  check_float(dkl, op, "dkl");
  check_dim(dkl, 2, op, "dkl");
  check_device(dkl, device, op, "dkl");
  check_contiguous(dkl, op, "dkl");
  check_ghm_backward_inputs(grad, counts, bins, dkl, op);
  const bool sigmoid = mode == "sigmoid";
  check_dtype(sample_bins, at::kInt, op, "sample_bins");
  const int64_t samples = sigmoid ? 0 : dkl.size(0);
  TORCH_CHECK(sample_bins.dim() == 1 && sample_bins.size(0) == samples, "ssod_ops.", op,
              ": sample_bins must be (", samples, ",) in ", mode, " mode, got ", sample_bins.sizes());
  check_same_device(sample_bins, dkl, op, "sample_bins", "dkl");
  check_contiguous(sample_bins, op, "sample_bins");
  return sigmoid;
}

inline void check_jitter_inputs(const at::Tensor& boxes, const at::Tensor& noise, at::DeviceType device,
                                const char* op) {
  check_float(boxes, op, "boxes");
  check_dtype(noise, boxes.scalar_type(), op, "noise (same dtype as boxes)");
  check_dim(boxes, 2, op, "boxes");
  check_dim(noise, 3, op, "noise");
  TORCH_CHECK(boxes.size(1) == 4, "ssod_ops.", op, ": boxes must be (N, 4), got ", boxes.sizes());
  TORCH_CHECK(noise.size(1) == boxes.size(0) && noise.size(2) == 4, "ssod_ops.", op,
              ": noise must be (times, N, 4) with N = ", boxes.size(0), ", got ", noise.sizes());
  check_device(boxes, device, op, "boxes");
  check_device(noise, device, op, "noise");
  check_same_device(boxes, noise, op, "boxes", "noise");
  check_contiguous(boxes, op, "boxes");
  check_contiguous(noise, op, "noise");
}

inline void check_refine_inputs(const at::Tensor& deltas, const at::Tensor& boxes, const at::Tensor& labels,
                                at::ArrayRef<double> weights, at::DeviceType device, const char* op) {
  check_float(boxes, op, "boxes");
  check_dtype(deltas, boxes.scalar_type(), op, "deltas (same dtype as boxes)");
  check_dtype(labels, at::kLong, op, "labels");
  check_dim(deltas, 4, op, "deltas");
  check_dim(boxes, 3, op, "boxes");
  check_dim(labels, 1, op, "labels");
  const int64_t times = boxes.size(0), n = boxes.size(1);
  TORCH_CHECK(boxes.size(2) == 4, "ssod_ops.", op, ": boxes must be (times, N, 4), got ", boxes.sizes());
  TORCH_CHECK(times >= 2, "ssod_ops.", op, ": the std over jitters needs times >= 2, got ", times);
  TORCH_CHECK(deltas.size(0) == times && deltas.size(1) == n && deltas.size(3) == 4, "ssod_ops.", op,
              ": deltas must be (times, N, C, 4) = (", times, ", ", n, ", C, 4), got ", deltas.sizes());
  TORCH_CHECK(n == 0 || deltas.size(2) > 0, "ssod_ops.", op, ": deltas need at least one class");
  TORCH_CHECK(labels.size(0) == n, "ssod_ops.", op, ": labels must be (N,) = (", n, ",), got ", labels.sizes());
  TORCH_CHECK(weights.size() == 4, "ssod_ops.", op, ": weights must hold 4 numbers, got ", weights.size());
  check_device(deltas, device, op, "deltas");
  check_device(boxes, device, op, "boxes");
  check_device(labels, device, op, "labels");
  check_same_device(deltas, boxes, op, "deltas", "boxes");
  check_same_device(labels, boxes, op, "labels", "boxes");
  check_contiguous(deltas, op, "deltas");
  check_contiguous(boxes, op, "boxes");
  check_contiguous(labels, op, "labels");
}

inline void check_frs_inputs(const at::Tensor& logits, int64_t k, at::DeviceType device, const char* op) {
  check_float(logits, op, "logits");
  check_dim(logits, 2, op, "logits");
  check_device(logits, device, op, "logits");
  check_contiguous(logits, op, "logits");
  const int64_t rows = logits.size(0);
  TORCH_CHECK(k >= 0 && k <= rows, "ssod_ops.", op, ": k must be in [0, R] = [0, ", rows, "], got ", k);
  TORCH_CHECK(rows == 0 || logits.size(1) > 0, "ssod_ops.", op, ": logits need at least one class");
}

}  // namespace ssod
