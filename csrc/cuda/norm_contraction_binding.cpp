// Torch-side CUDA registration of norm_contraction: checks, allocation, stream, then the
// pointer-only launchers of norm_contraction.cu. Built with CUDA, and in the CPU build under the emulator (binding_utils.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../cpu/checks.h"
#include "binding_utils.h"
#include "launchers.h"

namespace idid_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> norm_contraction_forward_cuda(const at::Tensor& x_in, double offset,
                                                                  double temperature) {
  check_2d_float("x", x_in);
  const cuda::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({n}, x.options());
  at::Tensor norm = at::empty({n}, x.options().dtype(acc_dtype));
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_contraction_forward_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::check_launch(cuda::norm_contraction_forward<T, acc>(
                     reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()),
                     reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>()), norm.mutable_data_ptr<acc>(), n, d,
                     static_cast<acc>(offset), static_cast<acc>(1.0 / temperature), stream),
                 "norm_contraction_forward_cuda");
  });
  return {out, norm};
}

at::Tensor norm_contraction_backward_cuda(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_norm_in,
                                          const at::Tensor& x_in, const at::Tensor& norm_in, double offset,
                                          double temperature) {
  check_2d_float("x", x_in);
  const cuda::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(grad_out_in.dim() == 1 && grad_out_in.size(0) == n, "norm_contraction_backward: grad_out must be (",
              n, ",)");
  TORCH_CHECK(norm_in.dim() == 1 && norm_in.size(0) == n, "norm_contraction_backward: norm must be (", n, ",)");
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad_out = grad_out_in.to(acc_dtype).contiguous();
  const at::Tensor norm = norm_in.to(acc_dtype).contiguous();
  const bool has_gn = grad_norm_in.has_value() && grad_norm_in->defined();
  const at::Tensor grad_norm = has_gn ? grad_norm_in->to(acc_dtype).contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x);
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_contraction_backward_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::check_launch(cuda::norm_contraction_backward<T, acc>(
                     grad_out.const_data_ptr<acc>(), has_gn ? grad_norm.const_data_ptr<acc>() : nullptr,
                     reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()), norm.const_data_ptr<acc>(),
                     reinterpret_cast<T*>(dx.mutable_data_ptr<scalar_t>()), n, d, static_cast<acc>(offset),
                     static_cast<acc>(1.0 / temperature), stream),
                 "norm_contraction_backward_cuda");
  });
  return dx;
}

}  // namespace

IDK_CUDA_LIBRARY_IMPL(m) {
  m.impl("norm_contraction_forward", &norm_contraction_forward_cuda);
  m.impl("norm_contraction_backward", &norm_contraction_backward_cuda);
}

}  // namespace idid_kernels
