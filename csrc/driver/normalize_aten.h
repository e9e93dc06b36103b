// Row normalisation and its backward written with ATen tensor ops only, so they run on any device
// (the CUDA bindings use them; csrc/cpu/normalize.h has the hand-written CPU loops). Same
// expressions as the CPU helpers: u = x * (1 / max(r, eps)) and
// dx = (g - [r > eps] <g, u> u) / max(r, eps) (see csrc/common/normalize.h).
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "../common/macros.h"

namespace idid_kernels {
namespace aten {

inline at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline at::Tensor unit_rows_from_norm(const at::Tensor& x, const at::Tensor& norm) {
  const auto acc = acc_dtype_of(x.scalar_type());
  return x.to(acc) * norm.to(acc).clamp_min(kNormEps).reciprocal().unsqueeze(1);
}

// ||x_n|| in the accumulation dtype without overflow or underflow of the squares (BLAS nrm2's
// range, common/row_norm.h): every row divided by its largest magnitude before the norm (the plain
// float32 norm overflows above ~1.8e19 and underflows below ~1e-19). A zero row gives 0, an inf
// entry inf, a NaN entry NaN.
inline at::Tensor row_norms(const at::Tensor& x_in) {
  const at::Tensor x = x_in.to(acc_dtype_of(x_in.scalar_type()));
  at::Tensor m = x.abs().amax({1}, /*keepdim=*/true);
  m = at::where((m > 0) & (m < std::numeric_limits<double>::infinity()), m, at::ones_like(m));
  return at::linalg_vector_norm(x / m, 2, {1}) * m.squeeze(1);
}

// (U, norms) in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor> unit_rows(const at::Tensor& x) {
  const at::Tensor norm = row_norms(x);
  return {unit_rows_from_norm(x, norm), norm};
}

inline at::Tensor normalize_backward(const at::Tensor& grad_u, const at::Tensor& u, const at::Tensor& norm_in,
                                     at::ScalarType dtype) {
  const at::Tensor norm = norm_in.to(u.scalar_type());
  const at::Tensor g = grad_u.to(u.scalar_type());
  const at::Tensor dot = at::where(norm > kNormEps, (g * u).sum(1), at::zeros({}, g.options()));
  return ((g - dot.unsqueeze(1) * u) * norm.clamp_min(kNormEps).reciprocal().unsqueeze(1)).to(dtype);
}

}  // namespace aten
}  // namespace idid_kernels
