// CUDA registration of pairwise_cosine: the ops of csrc/driver/pairwise_cosine_driver.h with the
// ATen row helpers (normalisation is O(N d) beside the O(N M d) cuBLAS GEMMs). Built with CUDA, and
// in the CPU build under the emulator (binding_utils.h).
#include <torch/library.h>

#include "../driver/normalize_aten.h"
#include "../driver/pairwise_cosine_driver.h"
#include "binding_utils.h"

namespace idid_kernels {
namespace {

struct AtenRows {
  static std::tuple<at::Tensor, at::Tensor> unit_rows(const at::Tensor& x) { return aten::unit_rows(x); }
  static at::Tensor unit_rows_from_norm(const at::Tensor& x, const at::Tensor& norm) {
    return aten::unit_rows_from_norm(x, norm);
  }
  static at::Tensor normalize_backward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& norm,
                                       at::ScalarType dtype) {
    return aten::normalize_backward(g, u, norm, dtype);
  }
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }
};

using Ops = PairwiseCosineOps<AtenRows>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& y) {
  const cuda::DeviceGuard guard(x.device());
  return Ops::forward(x, y);
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& y, const at::Tensor& norm_x,
                                                 const at::Tensor& norm_y, std::array<bool, 2> output_mask) {
  const cuda::DeviceGuard guard(x.device());
  return Ops::backward(grad, x, y, norm_x, norm_y, output_mask);
}

}  // namespace

IDK_CUDA_LIBRARY_IMPL(m) {
  m.impl("pairwise_cosine_forward", &forward_cuda);
  m.impl("pairwise_cosine_backward", &backward_cuda);
}

}  // namespace idid_kernels
