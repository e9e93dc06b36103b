// Torch-side CUDA registration of class_density: checks, the label sort and class offsets (ATen on
// the current stream), allocation, then the pointer-only launchers of class_density.cu. No host
// synchronisation: every shape follows from n, d and C. Built with CUDA, and in the CPU build under the emulator (binding_utils.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../cpu/checks.h"
#include "binding_utils.h"
#include "launchers.h"

namespace idid_kernels {
namespace {

at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_on_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "class_density: ", name, " must be on x's device (", x.device(), "), got ",
              t.device());
}

// One block per row and a warp per class: the launch grids stay below CUDA's 2^31 - 1 blocks.
void check_grid(int64_t n, int64_t num_classes) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(n <= kMax, "class_density (cuda): at most ", kMax, " rows, got ", n);
  TORCH_CHECK(num_classes <= kMax, "class_density (cuda): at most ", kMax, " classes, got ", num_classes);
}

// Rows grouped by label on the device: order is a stable argsort of the labels (rows of a class in
// ascending original order, as the CPU bucket sort gives, so the summation order never depends on
// the sort's schedule), and class c occupies sorted positions [offsets[c], offsets[c + 1]).
// offsets = searchsorted(sorted labels, 0..C): no counts are read on the host. Labels outside
// [0, C) sort before offsets[0] or after offsets[C] and so belong to no class.
struct SortedLabels {
  at::Tensor labels, order, offsets;
};

SortedLabels sort_by_label(const at::Tensor& labels_in, const at::Tensor& x, int64_t num_classes) {
  const int64_t n = x.size(0);
  TORCH_CHECK(labels_in.dim() == 1 && labels_in.size(0) == n, "class_density: labels must have shape (", n,
              ",), got ", labels_in.sizes());
  TORCH_CHECK(labels_in.scalar_type() == at::kLong, "class_density: labels must be int64, got ",
              labels_in.scalar_type());
  check_on_device("labels", labels_in, x);
  const at::Tensor labels = labels_in.contiguous();
  auto [sorted, order] = at::sort(labels, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const at::Tensor classes = at::arange(num_classes + 1, labels.options());
  at::Tensor offsets = at::searchsorted(sorted, classes);
  return {sorted.contiguous(), order.contiguous(), offsets.contiguous()};
}

void check_x(const at::Tensor& x) {
  check_2d_float("x", x);
  TORCH_CHECK(cuda::on_kernel_device(x), "class_density (cuda): x must be ", cuda::kKernelDevice, ", got one on ",
              x.device());
}

// -> (D (C,) in x's dtype, norm (B,) in the accumulation dtype), as the CPU op.
std::tuple<at::Tensor, at::Tensor> class_density_forward_cuda(const at::Tensor& x_in, const at::Tensor& labels,
                                                              int64_t num_classes, double t) {
  check_x(x_in);
  TORCH_CHECK(num_classes >= 1, "class_density: num_classes must be >= 1, got ", num_classes);
  const cuda::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  check_grid(n, num_classes);
  const SortedLabels s = sort_by_label(labels, x, num_classes);
  const auto acc_dtype = acc_dtype_of(x.scalar_type());
  at::Tensor norm = at::empty({n}, x.options().dtype(acc_dtype));
  at::Tensor density = at::empty({num_classes}, x.options());
  at::Tensor us = at::empty({n, d}, x.options().dtype(acc_dtype));
  at::Tensor row_sum = at::empty({n}, x.options().dtype(acc_dtype));
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_density_forward_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::check_launch(cuda::class_density_forward<T, acc>(
                     reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()), s.order.const_data_ptr<int64_t>(),
                     s.labels.const_data_ptr<int64_t>(), s.offsets.const_data_ptr<int64_t>(), n, d, num_classes,
                     static_cast<acc>(t), norm.mutable_data_ptr<acc>(), us.mutable_data_ptr<acc>(),
                     row_sum.mutable_data_ptr<acc>(), reinterpret_cast<T*>(density.mutable_data_ptr<scalar_t>()),
                     stream),
                 "class_density_forward_cuda");
  });
  return {density, norm};
}

// dx (B, d) in x's dtype for D = class_density(x, labels, C, t) given grad = dL/dD (C,); rows of
// classes with fewer than two rows get zeros.
at::Tensor class_density_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& labels,
                                       const at::Tensor& norm_in, double t) {
  check_x(x_in);
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) >= 1, "class_density_backward: grad must be (C,), got ",
              grad_in.sizes());
  const cuda::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1), num_classes = grad_in.size(0);
  TORCH_CHECK(norm_in.dim() == 1 && norm_in.size(0) == n, "class_density_backward: norm must be (", n, ",), got ",
              norm_in.sizes());
  check_on_device("grad", grad_in, x);
  check_on_device("norm", norm_in, x);
  check_grid(n, num_classes);
  const auto acc_dtype = acc_dtype_of(x.scalar_type());
  const at::Tensor grad = grad_in.to(acc_dtype).contiguous();
  const at::Tensor norm = norm_in.to(acc_dtype).contiguous();
  const SortedLabels s = sort_by_label(labels, x, num_classes);
  at::Tensor dx = at::empty({n, d}, x.options());  // the kernel writes every row
  at::Tensor us = at::empty({n, d}, x.options().dtype(acc_dtype));
  at::Tensor pull = at::empty({n, d}, x.options().dtype(acc_dtype));
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_density_backward_cuda", [&] {
    using T = typename cuda::CudaType<scalar_t>::type;
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::check_launch(cuda::class_density_backward<T, acc>(
                     grad.const_data_ptr<acc>(), reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()),
                     s.order.const_data_ptr<int64_t>(), s.labels.const_data_ptr<int64_t>(),
                     s.offsets.const_data_ptr<int64_t>(), norm.const_data_ptr<acc>(), n, d, num_classes,
                     static_cast<acc>(t), us.mutable_data_ptr<acc>(), pull.mutable_data_ptr<acc>(),
                     reinterpret_cast<T*>(dx.mutable_data_ptr<scalar_t>()), stream),
                 "class_density_backward_cuda");
  });
  return dx;
}

}  // namespace

IDK_CUDA_LIBRARY_IMPL(m) {
  m.impl("class_density_forward", &class_density_forward_cuda);
  m.impl("class_density_backward", &class_density_backward_cuda);
}

}  // namespace idid_kernels
