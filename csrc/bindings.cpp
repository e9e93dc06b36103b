// Op schemas of the idid_kernels library. Implementations register per dispatch key in
// cpu/*.cpp and cuda/*_binding.cpp; autograd and fake (meta) kernels are registered from Python
// in idid_kernels/ops/, so the plumbing is written once for every backend.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(idid_kernels, m) {
  // out_n = sigmoid((||x_n|| - offset) / temperature) in x's dtype; norm_n = ||x_n|| in the
  // accumulation dtype (float32, float64 for float64 x), saved for backward.
  m.def("norm_contraction_forward(Tensor x, float offset, float temperature) -> (Tensor out, Tensor norm)");
  m.def(
      "norm_contraction_backward(Tensor grad_out, Tensor? grad_norm, Tensor x, Tensor norm, float offset, "
      "float temperature) -> Tensor");

  // IDID-R1 loss (spec/idid.md). Outputs: loss = l_ic + lam * l_id, l_ic, l_id, lam (0-dim, x's
  // dtype; lam is a constant, stopgrad(l_ic) / (stopgrad(l_id) + eps)), then what backward needs,
  // in the accumulation dtype (float32, float64 for float64 x): row_stats (5, B) = per row
  // [a_i, logsumexp_c z_ic, logsumexp_{c != y_i} z_ic / tau, kd_i, ce_i] (0 on ignored rows), the
  // row norms of x (B,) and of the proxies (C,), and the teacher's log-probabilities log r (C, C)
  // (rows of classes absent from the batch and the diagonal hold 0; (0, 0) without distillation).
  // chunk_rows: rows of logits per chunk, 0 = from a 32 MB budget.
  m.def(
      "idid_loss_forward(Tensor x, Tensor proxies, Tensor similarity, Tensor labels, float alpha, float tau, "
      "float t, float eps, bool distillation, bool diversity, bool adaptive_weight, float diversity_weight, "
      "bool class_balanced, int ignore_index, int chunk_rows) -> (Tensor loss, Tensor l_ic, Tensor l_id, "
      "Tensor lam, Tensor row_stats, Tensor x_norm, Tensor w_norm, Tensor teacher_log_prob)");
  // (dx, dproxies, dsimilarity) of grad_ic * l_ic + grad_id * l_id (0-dim upstream coefficients;
  // for the loss output grad_ic = g and grad_id = g * lam), from the forward's saved outputs.
  m.def(
      "idid_loss_backward(Tensor grad_ic, Tensor grad_id, Tensor x, Tensor proxies, Tensor labels, "
      "Tensor row_stats, Tensor x_norm, Tensor w_norm, Tensor teacher_log_prob, float alpha, float tau, float t, "
      "bool distillation, bool diversity, int ignore_index, int chunk_rows) -> (Tensor dx, Tensor dproxies, "
      "Tensor dsimilarity)");
}

// A plain extension module so that `import idid_kernels._C` loads the library and runs the
// registrations above; it also reports whether CUDA kernels were compiled in.
namespace {
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "idid_kernels C++/CUDA kernels", -1, nullptr};
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef IDID_KERNELS_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
