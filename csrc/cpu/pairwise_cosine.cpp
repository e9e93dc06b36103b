// CPU registration of pairwise_cosine: the ops of csrc/driver/pairwise_cosine_driver.h with the
// hand-written row loops of csrc/cpu/normalize.h and the GEMMs of csrc/cpu/gemm.h.
#include <torch/library.h>

#include "../driver/pairwise_cosine_driver.h"
#include "gemm.h"
#include "normalize.h"

namespace idid_kernels {
namespace {

struct CpuRows {
  static std::tuple<at::Tensor, at::Tensor> unit_rows(const at::Tensor& x) { return cpu::unit_rows(x); }
  static at::Tensor unit_rows_from_norm(const at::Tensor& x, const at::Tensor& norm) {
    return cpu::unit_rows_from_norm(x, norm);
  }
  static at::Tensor normalize_backward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& norm,
                                       at::ScalarType dtype) {
    return cpu::normalize_backward(g, u, norm, dtype);
  }
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) { return cpu::mm(a, b); }
};

using Ops = PairwiseCosineOps<CpuRows>;

}  // namespace

TORCH_LIBRARY_IMPL(idid_kernels, CPU, m) {
  m.impl("pairwise_cosine_forward", &Ops::forward);
  m.impl("pairwise_cosine_backward", &Ops::backward);
}

}  // namespace idid_kernels
