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
  // out_ij = <x_i/max(||x_i||, eps), y_j/max(||y_j||, eps)> in x's dtype (y absent: y = x);
  // norm_x, norm_y = per-row ||.|| in the accumulation dtype, saved for backward (norm_y is (0,)
  // when y is absent). Backward returns (dx, dy); an output that output_mask does not ask for, and
  // dy when y is absent, is an empty (0, d) tensor.
  m.def("pairwise_cosine_forward(Tensor x, Tensor? y) -> (Tensor out, Tensor norm_x, Tensor norm_y)");
  m.def(
      "pairwise_cosine_backward(Tensor grad, Tensor x, Tensor? y, Tensor norm_x, Tensor norm_y, "
      "bool[2] output_mask) -> (Tensor grad_x, Tensor grad_y)");
  // density_c = mean over ordered same-class pairs i != j of exp(t (cos_ij - 1)), 0 for classes with
  // fewer than two rows, in x's dtype; norm = per-row ||x_i|| in the accumulation dtype, saved.
  m.def(
      "class_density_forward(Tensor x, Tensor labels, SymInt num_classes, float t) -> (Tensor density, "
      "Tensor norm)");
  m.def("class_density_backward(Tensor grad, Tensor x, Tensor labels, Tensor norm, float t) -> Tensor");

  // Contraction-mapped margin softmax (spec/cm_margin.md). margin_kind: 0 none, 1 cosface (c - m3),
  // 2 angular (cos(m1 theta + m2) - m3), 3 sphereface (m1, sphere_lambda); see
  // idid_kernels/reference/margins.py. chunk_rows <= 0 lets the kernel choose.
#define IDK_CM_CFG                                                                                            \
  "float s, int margin_kind, float m1, float m2, float m3, float sphere_lambda, bool easy_margin, "          \
  "bool exact_grad, bool contraction, float offset, float temperature, bool detach_norm, int ignore_index, " \
  "int chunk_rows"
  // Per-row losses (0 on ignored rows) and the statistics backward needs.
  m.def("cm_margin_forward(Tensor x, Tensor weight, Tensor labels, " IDK_CM_CFG
        ") -> (Tensor loss_rows, Tensor lse, Tensor x_norm, Tensor w_norm)");
  // Gradients for any per-row upstream gradient; recomputes the cosines chunk by chunk.
  m.def("cm_margin_backward(Tensor grad_rows, Tensor x, Tensor weight, Tensor labels, Tensor lse, Tensor x_norm, "
        "Tensor w_norm, " IDK_CM_CFG ") -> (Tensor dx, Tensor dweight)");
  // loss = sum_n row_weight_n loss_n with its gradients formed in the same pass (scalar reductions).
  m.def("cm_margin_fused(Tensor x, Tensor weight, Tensor labels, Tensor row_weight, " IDK_CM_CFG
        ") -> (Tensor loss, Tensor dx, Tensor dweight)");
#undef IDK_CM_CFG
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
