// The schema of every op of the extension (the one place that declares them), the autograd of ghm_kl, and
// the Python module `semi._C` whose import loads this library and so registers torch.ops.ssod_ops.*.
//
// Kernels register per device in cpu/*.cpp and cuda/*.cu with TORCH_LIBRARY_IMPL; fake (meta)
// implementations, and the autograd formulas of the other ops, are registered from Python, in semi/ops.py.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace ssod {

bool compiled_with_cuda() {
#ifdef SSOD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Autograd of ghm_kl
// ---------------------------------------------------------------------------------------------------------
//
// When the student needs a gradient, the forward runs ghm_kl_forward, whose one pass also writes the
// unweighted gradient dkl; the node keeps dkl out of sight (not as an output, not as a saved variable), and
// the first backward weights it in place (ghm_kl_weight_) and hands it over as the gradient: the backward is
// one streaming multiply, with no new buffer. A second backward of the same graph (retain_graph=True), and
// any backward traced with fake or functional tensors (torch.compile), recomputes the same numbers with
// ghm_kl_backward instead.

using GhmForwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                                c10::string_view, int64_t);
using GhmOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, c10::string_view, int64_t);
using GhmBackwardOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 c10::string_view, int64_t);
using GhmWeightOp = void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                         int64_t);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A tensor of real storage, which can be written in place behind autograd's back (not a fake, functional or
// functorch wrapper).
bool is_plain(const at::Tensor& x) {
  const c10::DispatchKeySet wrappers({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                      c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper});
  return x.defined() && !x.key_set().has_any(wrappers);
}

struct GhmKLFunction : public torch::autograd::Function<GhmKLFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& student,
                                                const at::Tensor& teacher, const std::string& mode, int64_t bins) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<GhmForwardOp>("ssod_ops::ghm_kl_forward");
    auto [loss, counts, dkl, sample_bins] = op.call(student, teacher, mode, bins);
    ctx->save_for_backward({student, teacher, counts, sample_bins});
    ctx->saved_data["dkl"] = dkl;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["bins"] = bins;
    ctx->mark_non_differentiable({counts});
    ctx->set_materialize_grads(false);
    return {loss, counts};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor dkl = ctx->saved_data["dkl"].toTensor();
    ctx->saved_data["dkl"] = at::Tensor();  // given away below, or no longer needed
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    const int64_t bins = ctx->saved_data["bins"].toInt();
    const at::Tensor grad_loss = grad.contiguous();
    // Only the student gets a gradient: the teacher is a stop-gradient target (SED Eq. 2-3).
    if (is_plain(dkl)) {
      static const auto weight = find_op<GhmWeightOp>("ssod_ops::ghm_kl_weight_");
      at::Tensor out = dkl;
      weight.call(out, saved[3], grad_loss, saved[2], mode, bins);
      return {out, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    static const auto recompute = find_op<GhmBackwardOp>("ssod_ops::ghm_kl_backward");
    return {recompute.call(grad_loss, saved[0], saved[1], saved[2], mode, bins), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// The Autograd kernel of ghm_kl: the fused forward only when a gradient will be asked for.
std::tuple<at::Tensor, at::Tensor> ghm_kl_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                   c10::string_view mode, int64_t bins) {
  if (!(at::GradMode::is_enabled() && student.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<GhmOp>("ssod_ops::ghm_kl");
    return op.call(student, teacher, mode, bins);
  }
  const auto out = GhmKLFunction::apply(student, teacher, std::string(mode), bins);
  return {out[0], out[1]};
}

}  // namespace ssod

TORCH_LIBRARY(ssod_ops, m) {
  m.def("compiled_with_cuda() -> bool", &ssod::compiled_with_cuda);

  // SED Eq. 5. student, teacher: (R, C); "sigmoid": every element a Bernoulli pair, "softmax": every row a
  // distribution. Returns the re-weighted KL () and the bin counts (bins,) int64. Differentiable w.r.t. the
  // student (the autograd below).
  m.def("ghm_kl(Tensor student, Tensor teacher, str mode, int bins) -> (Tensor, Tensor)");
  // d loss / d student for the incoming () gradient, given the counts of the forward pass: (R, C).
  m.def(
      "ghm_kl_backward(Tensor grad, Tensor student, Tensor teacher, Tensor counts, str mode, int bins) "
      "-> Tensor");
  // ghm_kl that also keeps what the backward needs, in the same pass: the unweighted gradient
  // dKL_i / d student (R, C) and the bin of every row (R,) int32 in softmax mode ((0,) in sigmoid mode,
  // where the bin of an element follows from its own gradient).
  m.def("ghm_kl_forward(Tensor student, Tensor teacher, str mode, int bins) -> (Tensor, Tensor, Tensor, Tensor)");
  // The backward from them, in place: dkl *= grad / (bins R_bin), giving d loss / d student. (kl_mode is
  // ghm_kl's mode; an argument called `mode` would clash with torch's functionalization of in-place ops.)
  m.def(
      "ghm_kl_weight_(Tensor(a!) dkl, Tensor sample_bins, Tensor grad, Tensor counts, str kl_mode, int bins) "
      "-> ()");

  // Soft Teacher Sec. 3.3. boxes (N, 4), noise (T, N, 4) standard normal -> jittered boxes (T, N, 4).
  m.def("jitter_apply(Tensor boxes, Tensor noise, float scale) -> Tensor");
  // deltas (T, N, C, 4), boxes (T, N, 4), labels (N,) int64 -> mean refined box (N, 4), uncertainty (N,).
  m.def("refine_stats(Tensor deltas, Tensor boxes, Tensor labels, float[] weights, float bbox_clip) "
        "-> (Tensor, Tensor)");

  // Dense Teacher Eq. 3-4. logits (R, C), k rows -> mask (R,) bool, fg ().
  m.def("frs_topk_mask(Tensor logits, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ssod_ops, Autograd, m) {
  m.impl("ghm_kl", &ssod::ghm_kl_autograd);
}

// `import semi._C` needs a module init function; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Fused kernels registered as torch.ops.ssod_ops", -1,
                               nullptr};
  return PyModule_Create(&module);
}
