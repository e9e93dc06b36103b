// Op schemas of the idid_kernels library. Implementations register per dispatch key in
// cpu/*.cpp and cuda/*_binding.cpp; autograd and fake (meta) kernels are registered from Python
// in idid_kernels/ops/, so the plumbing is written once for every backend.
//
// The CPU build with the CUDA-execution emulator (IDID_KERNELS_CUDA_EMULATOR, csrc/emu) also
// defines the same schemas in the idid_kernels_emu library, whose CPU kernels are the CUDA kernels
// of cuda/*.cu run by the emulator (backend="cuda" on CPU tensors, IDID_KERNELS_CUDA_EMULATE=1).
#include <Python.h>

#include <torch/library.h>

#include "cpu/gemm.h"
#include "cpu/scratch.h"

namespace {

void define_ops(torch::Library& m) {
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
  // 2 angular (cos(m1 theta + m2) - m3), 3 sphereface (m1, sphere_lambda), 4 given: `target` (2, N)
  // holds each row's phi(c_y) and phi'(c_y), computed by the caller (per-row margins); see
  // idid_kernels/reference/margins.py. chunk_rows <= 0 lets the kernel choose.
#define IDK_CM_CFG                                                                                            \
  "float s, int margin_kind, float m1, float m2, float m3, float sphere_lambda, bool easy_margin, "          \
  "bool exact_grad, bool contraction, float offset, float temperature, bool detach_norm, int ignore_index, " \
  "int chunk_rows, Tensor? target"
  // Per-row losses (0 on ignored rows) and the statistics backward needs: row_stats (2, N) holds
  // each row's shift (its max in cosine units) and log-sum-exp relative to it (common/cm_row.h).
  m.def("cm_margin_forward(Tensor x, Tensor weight, Tensor labels, " IDK_CM_CFG
        ") -> (Tensor loss_rows, Tensor row_stats, Tensor x_norm, Tensor w_norm)");
  // Gradients for any per-row upstream gradient; recomputes the cosines chunk by chunk.
  m.def("cm_margin_backward(Tensor grad_rows, Tensor x, Tensor weight, Tensor labels, Tensor row_stats, "
        "Tensor x_norm, Tensor w_norm, " IDK_CM_CFG ") -> (Tensor dx, Tensor dweight)");
  // loss = sum_n row_weight_n loss_n with its gradients formed in the same pass (scalar reductions).
  m.def("cm_margin_fused(Tensor x, Tensor weight, Tensor labels, Tensor row_weight, " IDK_CM_CFG
        ") -> (Tensor loss, Tensor dx, Tensor dweight)");
  // reduction="none" with the batch in one chunk: per-row losses, norms, and for an upstream gradient
  // of 1 on every row dx (accumulation dtype) and the (N, C) logit gradients, kept for
  // cm_margin_rows_dweight; the gradients for upstream g are g_n dx_n and that op's dweight.
  m.def("cm_margin_forward_grad(Tensor x, Tensor weight, Tensor labels, " IDK_CM_CFG
        ") -> (Tensor loss_rows, Tensor x_norm, Tensor w_norm, Tensor dx_rows, Tensor grad_logits)");
  m.def("cm_margin_rows_dweight(Tensor grad_rows, Tensor grad_logits, Tensor x, Tensor weight, Tensor x_norm, "
        "Tensor w_norm) -> Tensor");
  // Class shards for class-parallel heads: weight holds the classes [class_offset, class_offset + C_s).
  // Forward: per-row partial max, sum-exp and target logit (0 where the target is in another shard).
  m.def("cm_margin_shard_forward(Tensor x, Tensor weight, Tensor labels, int class_offset, " IDK_CM_CFG
        ") -> (Tensor row_max, Tensor sum_exp, Tensor target_logit, Tensor x_norm, Tensor w_norm)");
  // Backward from the global lse: du = sum_j G_nj w^_j, the radial part s g'(r) R, Q = <du, u>, dweight.
  m.def("cm_margin_shard_backward(Tensor grad_rows, Tensor x, Tensor weight, Tensor labels, int class_offset, "
        "Tensor lse, Tensor x_norm, Tensor w_norm, " IDK_CM_CFG
        ") -> (Tensor du, Tensor radial, Tensor q, Tensor dweight)");
#undef IDK_CM_CFG

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
  // Forward and gradients in one pass, for a loss that needs a gradient: the loss terms, then the
  // gradients at unit upstream coefficients in the accumulation dtype: dx_ic (B, d) and dproxies
  // (C, d) of l_ic, dx_id (B, d) of l_id ((0, d) without diversity), and dphi, the gradient of l_ic
  // with respect to the symmetrised similarity Phi ((0, 0) without distillation; (C, C) on a GPU;
  // on the CPU (min(B, C), C), one row per class present, in class order).
  m.def(
      "idid_loss_fused(Tensor x, Tensor proxies, Tensor similarity, Tensor labels, float alpha, float tau, "
      "float t, float eps, bool distillation, bool diversity, bool adaptive_weight, float diversity_weight, "
      "bool class_balanced, int ignore_index, int chunk_rows) -> (Tensor loss, Tensor l_ic, Tensor l_id, "
      "Tensor lam, Tensor dx_ic, Tensor dx_id, Tensor dproxies, Tensor dphi)");
  // (dx, dproxies, dsimilarity) in dtype: grad_ic dx_ic + grad_id dx_id, grad_ic dproxies and
  // grad_ic (dphi + dphi^T) / 2 as (C, C) where similarity_grad, else (0, 0).
  m.def(
      "idid_loss_fused_backward(Tensor grad_ic, Tensor grad_id, Tensor dx_ic, Tensor dx_id, Tensor dproxies, "
      "Tensor dphi, Tensor labels, int ignore_index, bool similarity_grad, int num_classes, ScalarType dtype) -> "
      "(Tensor dx, Tensor dproxies, Tensor dsimilarity)");
}

}  // namespace

TORCH_LIBRARY(idid_kernels, m) { define_ops(m); }

#ifdef IDID_KERNELS_CUDA_EMULATOR
TORCH_LIBRARY(idid_kernels_emu, m) { define_ops(m); }
#endif

// A plain extension module so that `import idid_kernels._C` loads the library and runs the
// registrations above; it also reports whether CUDA kernels were compiled in, natively or for the
// emulator.
namespace {
PyObject* scratch_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(idid_kernels::cpu::scratch_bytes()); }
PyObject* scratch_release(PyObject*, PyObject*) {
  return PyLong_FromLongLong(idid_kernels::cpu::scratch_release());
}
PyObject* scratch_keep(PyObject*, PyObject* args) {
  int keep = -1;
  if (!PyArg_ParseTuple(args, "|p", &keep)) return nullptr;
  if (keep >= 0) idid_kernels::cpu::set_scratch_keep(keep != 0);
  return PyBool_FromLong(idid_kernels::cpu::scratch_keep());
}
// cpu_gemm([engine]): engine 0, 1 or 2 (GemmEngine: auto, aten, onednn; idid_kernels/_gemm.py
// maps the names) sets the CPU GEMM engine (cpu/gemm.h); returns the one float32 GEMMs take.
PyObject* cpu_gemm(PyObject*, PyObject* args) {
  PyObject* engine = nullptr;
  if (!PyArg_ParseTuple(args, "|O", &engine)) return nullptr;
  try {
    using idid_kernels::cpu::GemmEngine;
    if (engine != nullptr) {
      if (!PyLong_Check(engine)) {
        PyErr_Format(PyExc_TypeError, "cpu_gemm: engine index must be an int, got %s", Py_TYPE(engine)->tp_name);
        return nullptr;
      }
      const long e = PyLong_AsLong(engine);
      if (e == -1 && PyErr_Occurred()) return nullptr;
      if (e < static_cast<long>(GemmEngine::kAuto) || e > static_cast<long>(GemmEngine::kOneDnn)) {
        PyErr_Format(PyExc_ValueError, "cpu_gemm: engine index must be 0, 1 or 2, got %ld", e);
        return nullptr;
      }
      idid_kernels::cpu::set_gemm_engine(static_cast<GemmEngine>(e));
    }
    return PyUnicode_FromString(idid_kernels::cpu::gemm_engine_in_use());
  } catch (const std::exception& exc) {
    PyErr_SetString(PyExc_RuntimeError, exc.what());
    return nullptr;
  }
}
PyObject* onednn_calls(PyObject*, PyObject*) { return PyLong_FromLongLong(idid_kernels::cpu::onednn_calls()); }
PyObject* onednn_available(PyObject*, PyObject*) { return PyBool_FromLong(idid_kernels::cpu::onednn_available()); }
PyMethodDef module_methods[] = {
    {"cpu_gemm", cpu_gemm, METH_VARARGS, "cpu_gemm([engine index]): the CPU GEMM engine (cpu/gemm.h); sets it if given."},
    {"onednn_available", onednn_available, METH_NOARGS, "Whether torch's oneDNN float32 matmul is reachable."},
    {"onednn_calls", onednn_calls, METH_NOARGS, "GEMMs the CPU kernels ran through oneDNN so far."},
    {"scratch_bytes", scratch_bytes, METH_NOARGS, "Bytes of the kept CPU scratch block (csrc/cpu/scratch.h)."},
    {"scratch_release", scratch_release, METH_NOARGS, "Free the kept CPU scratch block; returns the bytes freed."},
    {"scratch_keep", scratch_keep, METH_VARARGS,
     "scratch_keep([keep]): whether the CPU scratch block is kept between calls (set it with the argument)."},
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "idid_kernels C++/CUDA kernels", -1, module_methods};
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef IDID_KERNELS_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
#ifdef IDID_KERNELS_CUDA_EMULATOR
  const int with_cuda_emulator = 1;
#else
  const int with_cuda_emulator = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0 ||
      PyModule_AddIntConstant(module, "with_cuda_emulator", with_cuda_emulator) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
