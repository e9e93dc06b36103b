// Torch-side CUDA registration of the cm_margin ops: the shared driver
// (csrc/driver/cm_margin_driver.h, cuBLAS GEMMs through ATen) with the CUDA row epilogue of
// cm_margin.cu. Built with CUDA, and in the CPU build under the emulator (binding_utils.h).
#include <torch/library.h>

#include "../driver/cm_margin_driver.h"
#include "binding_utils.h"
#include "launchers.h"

namespace idid_kernels {
namespace {

struct CudaEpilogue {
  // The kernel turns a label outside [0, C) into a NaN row itself; the driver reads no label on the
  // host (on a GPU that would be a synchronisation), emulated or not.
  static constexpr bool kHostLabelCheck = false;

  template <typename A>
  void operator()(const CmRowJob<A>& job, int64_t rows) const {
    const int64_t splits = cuda::cm_epilogue_splits(rows, job.num_classes, cuda::target_blocks(),
                                                    cuda::kEmulated ? kEmulatedMinColumns : kMinColumns);
    // From the caching allocator on a GPU: no synchronisation, reused across chunks.
    const at::Tensor scratch =
        at::empty({cuda::cm_epilogue_scratch(rows, splits)},
                  at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value).device(cuda::kernel_device()));
    cuda::check_launch(cuda::cm_epilogue<A>(job, rows, splits, scratch.mutable_data_ptr<A>(), cuda::current_stream()),
                       "cm_margin CUDA epilogue");
  }

  // Columns per block of the split epilogue: 8 per thread on a GPU; a few per thread under the
  // emulator, so that small test shapes run the multi-block path.
  static constexpr int64_t kMinColumns = 2048;
  static constexpr int64_t kEmulatedMinColumns = 48;
};

using Ops = CmOps<CudaEpilogue>;

#define IDK_CM_PARAMS                                                                                            \
  double s, int64_t margin_kind, double m1, double m2, double m3, double sphere_lambda, bool easy_margin,        \
      bool exact_grad, bool contraction, double offset, double temperature, bool detach_norm, int64_t ignore_index, \
      int64_t chunk_rows, const std::optional<at::Tensor>&target
#define IDK_CM_FORWARD_ARGS                                                                                 \
  s, margin_kind, m1, m2, m3, sphere_lambda, easy_margin, exact_grad, contraction, offset, temperature,     \
      detach_norm, ignore_index, chunk_rows, target

// The device guard makes the epilogue launch on the inputs' device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                        const at::Tensor& labels, IDK_CM_PARAMS) {
  const cuda::DeviceGuard guard(x.device());
  return Ops::forward(x, weight, labels, IDK_CM_FORWARD_ARGS);
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_rows, const at::Tensor& x,
                                                 const at::Tensor& weight, const at::Tensor& labels,
                                                 const at::Tensor& lse, const at::Tensor& x_norm,
                                                 const at::Tensor& w_norm, IDK_CM_PARAMS) {
  const cuda::DeviceGuard guard(x.device());
  return Ops::backward(grad_rows, x, weight, labels, lse, x_norm, w_norm, IDK_CM_FORWARD_ARGS);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& labels, const at::Tensor& row_weight,
                                                          IDK_CM_PARAMS) {
  const cuda::DeviceGuard guard(x.device());
  return Ops::fused(x, weight, labels, row_weight, IDK_CM_FORWARD_ARGS);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_grad_cuda(const at::Tensor& x,
                                                                                        const at::Tensor& weight,
                                                                                        const at::Tensor& labels,
                                                                                        IDK_CM_PARAMS) {
  const cuda::DeviceGuard guard(x.device());
  return Ops::forward_grad(x, weight, labels, IDK_CM_FORWARD_ARGS);
}

at::Tensor rows_dweight_cuda(const at::Tensor& grad_rows, const at::Tensor& grad_logits, const at::Tensor& x,
                             const at::Tensor& weight, const at::Tensor& x_norm, const at::Tensor& w_norm) {
  const cuda::DeviceGuard guard(x.device());
  return cm_rows_dweight(grad_rows, grad_logits, x, weight, x_norm, w_norm);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shard_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels, int64_t class_offset, IDK_CM_PARAMS) {
  const cuda::DeviceGuard guard(x.device());
  return Ops::shard_forward(x, weight, labels, class_offset, IDK_CM_FORWARD_ARGS);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shard_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
    int64_t class_offset, const at::Tensor& lse, const at::Tensor& x_norm, const at::Tensor& w_norm, IDK_CM_PARAMS) {
  const cuda::DeviceGuard guard(x.device());
  return Ops::shard_backward(grad_rows, x, weight, labels, class_offset, lse, x_norm, w_norm, IDK_CM_FORWARD_ARGS);
}

#undef IDK_CM_PARAMS
#undef IDK_CM_FORWARD_ARGS

}  // namespace

IDK_CUDA_LIBRARY_IMPL(m) {
  m.impl("cm_margin_forward", &forward_cuda);
  m.impl("cm_margin_backward", &backward_cuda);
  m.impl("cm_margin_fused", &fused_cuda);
  m.impl("cm_margin_forward_grad", &forward_grad_cuda);
  m.impl("cm_margin_rows_dweight", &rows_dweight_cuda);
  m.impl("cm_margin_shard_forward", &shard_forward_cuda);
  m.impl("cm_margin_shard_backward", &shard_backward_cuda);
}

}  // namespace idid_kernels
