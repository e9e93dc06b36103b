// CPU kernels of norm_contraction: out_n = sigmoid((||x_n|| - offset) / T).
// Forward saves the per-row norm (accumulation dtype) so backward is one pass over x.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "../common/contraction.h"
#include "checks.h"
#include "normalize.h"

namespace idid_kernels {
namespace {

// Rows per parallel_for grain: enough work per task to amortise the scheduling.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

std::tuple<at::Tensor, at::Tensor> norm_contraction_forward_cpu(const at::Tensor& x_in, double offset,
                                                                 double temperature) {
  check_2d_float("x", x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({n}, x.options());
  at::Tensor norm = at::empty({n}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_contraction_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    acc* np = norm.mutable_data_ptr<acc>();
    const acc off = static_cast<acc>(offset), inv_t = static_cast<acc>(1.0 / temperature);
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc r = cpu::row_norm<scalar_t, acc>(xp + i * d, d);
        np[i] = r;
        op[i] = static_cast<scalar_t>(contraction(r, off, inv_t));
      }
    });
  });
  return {out, norm};
}

// dx_n = (grad_out_n * g'(r_n) + grad_norm_n) * x_n / r_n; grad_norm is the (rarely used)
// gradient flowing into the saved-norm output.
at::Tensor norm_contraction_backward_cpu(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_norm_in,
                                         const at::Tensor& x_in, const at::Tensor& norm_in, double offset,
                                         double temperature) {
  check_2d_float("x", x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(grad_out_in.dim() == 1 && grad_out_in.size(0) == n, "norm_contraction_backward: grad_out must be (",
              n, ",), got ", grad_out_in.sizes());
  TORCH_CHECK(norm_in.dim() == 1 && norm_in.size(0) == n, "norm_contraction_backward: norm must be (", n, ",)");
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad_out = grad_out_in.to(acc_dtype).contiguous();
  const at::Tensor norm = norm_in.to(acc_dtype).contiguous();
  const bool has_gn = grad_norm_in.has_value() && grad_norm_in->defined();
  const at::Tensor grad_norm = has_gn ? grad_norm_in->to(acc_dtype).contiguous() : at::Tensor();
  if (has_gn) {
    TORCH_CHECK(grad_norm.dim() == 1 && grad_norm.size(0) == n, "norm_contraction_backward: grad_norm must be (", n,
                ",)");
  }
  at::Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_contraction_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc* gp = grad_out.const_data_ptr<acc>();
    const acc* gnp = has_gn ? grad_norm.const_data_ptr<acc>() : nullptr;
    const acc* np = norm.const_data_ptr<acc>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const acc off = static_cast<acc>(offset), inv_t = static_cast<acc>(1.0 / temperature);
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc r = np[i];
        acc radial = gp[i] * contraction_grad(r, off, inv_t);
        if (gnp != nullptr) radial += gnp[i];
        const acc inv = inv_norm_or_zero(r);
        const scalar_t* row = xp + i * d;
        scalar_t* drow = dp + i * d;
        if (inv < std::numeric_limits<acc>::infinity()) {
          const acc coef = radial * inv;
          _Pragma("omp simd")
          for (int64_t k = 0; k < d; ++k) drow[k] = static_cast<scalar_t>(coef * static_cast<acc>(row[k]));
        } else {  // a subnormal norm: 1 / r overflows, x_k / r does not
          for (int64_t k = 0; k < d; ++k) drow[k] = static_cast<scalar_t>(radial * (static_cast<acc>(row[k]) / r));
        }
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(idid_kernels, CPU, m) {
  m.impl("norm_contraction_forward", &norm_contraction_forward_cpu);
  m.impl("norm_contraction_backward", &norm_contraction_backward_cpu);
}

}  // namespace idid_kernels
