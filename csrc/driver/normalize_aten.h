// Row normalisation and its backward written with ATen tensor ops only, so they run on any device
// (the CUDA bindings use them; csrc/cpu/normalize.h has the hand-written CPU loops). Same
// expressions as the CPU helpers: u = x * (1 / max(r, eps)) and
// dx = (g - [r > eps] <g, u> u) / max(r, eps) (see csrc/common/normalize.h).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../common/macros.h"

namespace idid_kernels {
namespace aten {

inline at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline at::Tensor unit_rows_from_norm(const at::Tensor& x, const at::Tensor& norm) {
  const auto acc = acc_dtype_of(x.scalar_type());
  return x.to(acc) * norm.to(acc).clamp_min(kNormEps).reciprocal().unsqueeze(1);
}

// (U, norms) in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor> unit_rows(const at::Tensor& x) {
  const at::Tensor norm = at::linalg_vector_norm(x.to(acc_dtype_of(x.scalar_type())), 2, {1});
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
