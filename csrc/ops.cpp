// The schema of every op of the extension (the one place that declares them), and the Python module
// `semi._C` whose import loads this library and so registers torch.ops.ssod_ops.*.
//
// Kernels register per device in cpu/*.cpp and cuda/*.cu with TORCH_LIBRARY_IMPL; autograd formulas and
// fake (meta) implementations are registered from Python, in semi/ops.py.
#include <Python.h>
#include <torch/library.h>

namespace ssod {

bool compiled_with_cuda() {
#ifdef SSOD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace ssod

TORCH_LIBRARY(ssod_ops, m) {
  m.def("compiled_with_cuda() -> bool", &ssod::compiled_with_cuda);

  // SED Eq. 5. student, teacher: (R, C); "sigmoid": every element a Bernoulli pair, "softmax": every row a
  // distribution. Returns the re-weighted KL () and the bin counts (bins,) int64.
  m.def("ghm_kl(Tensor student, Tensor teacher, str mode, int bins) -> (Tensor, Tensor)");
  // d loss / d student for the incoming () gradient, given the counts of the forward pass: (R, C).
  m.def(
      "ghm_kl_backward(Tensor grad, Tensor student, Tensor teacher, Tensor counts, str mode, int bins) "
      "-> Tensor");

  // Soft Teacher Sec. 3.3. boxes (N, 4), noise (T, N, 4) standard normal -> jittered boxes (T, N, 4).
  m.def("jitter_apply(Tensor boxes, Tensor noise, float scale) -> Tensor");
  // deltas (T, N, C, 4), boxes (T, N, 4), labels (N,) int64 -> mean refined box (N, 4), uncertainty (N,).
  m.def("refine_stats(Tensor deltas, Tensor boxes, Tensor labels, float[] weights, float bbox_clip) "
        "-> (Tensor, Tensor)");

  // Dense Teacher Eq. 3-4. logits (R, C), k rows -> mask (R,) bool, fg ().
  m.def("frs_topk_mask(Tensor logits, int k) -> (Tensor, Tensor)");
}

// `import semi._C` needs a module init function; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Fused kernels registered as torch.ops.ssod_ops", -1,
                               nullptr};
  return PyModule_Create(&module);
}
