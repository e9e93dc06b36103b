// CPU row normalisation helpers shared by the kernels that work on unit rows (pairwise_cosine,
// class_density, and the fused losses later): u = x / max(||x||, eps) in the accumulation dtype,
// and the backward dx = (g - [r > eps] <g, u> u) / max(r, eps) (see common/normalize.h).
//
// Forward saves the per-row norm r; backward rebuilds u from x and r with the same expression, so
// the u it projects with is bitwise the u the forward multiplied with, and needs no reduction.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/normalize.h"
#include "../common/row_norm.h"

namespace idid_kernels {
namespace cpu {

// Rows per parallel_for grain: enough work per task to amortise the scheduling.
inline int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

inline at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The rescaled second pass of row_norm (common/row_norm.h): rows whose squares overflowed or
// may have underflowed. Divides rather than multiplying by 1 / m, which overflows for m subnormal.
template <typename scalar_t, typename acc>
acc row_norm_rescaled(const scalar_t* x, int64_t d) {
  acc m = 0;
  for (int64_t k = 0; k < d; ++k) m = std::max(m, std::abs(static_cast<acc>(x[k])));
  if (m == acc(0) || !(m < std::numeric_limits<acc>::infinity())) return m;
  acc ss = 0;
  for (int64_t k = 0; k < d; ++k) {
    const acc v = static_cast<acc>(x[k]) / m;
    ss += v * v;
  }
  return norm_from_scaled(m, ss);
}

// r = ||x|| with BLAS nrm2's range (common/row_norm.h): the sum of squares with an omp-simd
// reduction (a fixed, vectorised order), and a rescaled second pass only where it overflowed or
// may have underflowed.
template <typename scalar_t, typename acc>
inline acc row_norm(const scalar_t* x, int64_t d) {
  acc ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < d; ++k) {
    const acc v = static_cast<acc>(x[k]);
    ss += v * v;
  }
  return norm_sq_is_exact(ss) ? std::sqrt(ss) : row_norm_rescaled<scalar_t, acc>(x, d);
}

// ||x_n|| for every row of a contiguous (n, d) tensor, in the accumulation dtype.
inline at::Tensor row_norms(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor norm = at::empty({n}, x.options().dtype(acc_dtype_of(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_norms", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc* np = norm.mutable_data_ptr<acc>();
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) np[i] = row_norm<scalar_t, acc>(xp + i * d, d);
    });
  });
  return norm;
}

// u = x / max(r, eps), written as x * (1 / max(r, eps)) in the accumulation type.
template <typename scalar_t, typename acc>
inline void scale_row(const scalar_t* x, acc r, acc* u, int64_t d) {
  const acc inv = acc(1) / norm_floor(r);
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) u[k] = static_cast<acc>(x[k]) * inv;
}

// dx = (g - [r > eps] <g, u> u) / max(r, eps) with g = scale * grad_u, cast to out_t.
template <typename acc, typename out_t>
inline void normalize_backward_row(const acc* grad_u, const acc* u, acc r, acc scale, out_t* dx, int64_t d) {
  acc dot = 0;
  if (norm_above_floor(r)) {
#pragma omp simd reduction(+ : dot)
    for (int64_t k = 0; k < d; ++k) dot += grad_u[k] * u[k];
  }
  const acc inv = scale / norm_floor(r);  // scale distributes over both terms
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) dx[k] = static_cast<out_t>((grad_u[k] - dot * u[k]) * inv);
}

// U = rows of x scaled to unit norm, (n, d) in the accumulation dtype, and the norms (n,).
// x must be contiguous.
inline std::tuple<at::Tensor, at::Tensor> unit_rows(const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc_dtype = acc_dtype_of(x.scalar_type());
  at::Tensor u = at::empty({n, d}, x.options().dtype(acc_dtype));
  at::Tensor norm = at::empty({n}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unit_rows", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc* up = u.mutable_data_ptr<acc>();
    acc* np = norm.mutable_data_ptr<acc>();
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        np[i] = row_norm<scalar_t, acc>(xp + i * d, d);
        scale_row(xp + i * d, np[i], up + i * d, d);
      }
    });
  });
  return {u, norm};
}

// U rebuilt from x and its saved norms (no reduction; bitwise the forward's U). x contiguous.
inline at::Tensor unit_rows_from_norm(const at::Tensor& x, const at::Tensor& norm_in) {
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc_dtype = acc_dtype_of(x.scalar_type());
  TORCH_CHECK(norm_in.dim() == 1 && norm_in.size(0) == n, "saved norm must have shape (", n, ",), got ",
              norm_in.sizes());
  const at::Tensor norm = norm_in.to(acc_dtype).contiguous();
  at::Tensor u = at::empty({n, d}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unit_rows_from_norm", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc* np = norm.const_data_ptr<acc>();
    acc* up = u.mutable_data_ptr<acc>();
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) scale_row(xp + i * d, np[i], up + i * d, d);
    });
  });
  return u;
}

// dx (n, d) in `dtype` from grad_u = dL/du and u (both (n, d), accumulation dtype, contiguous) and
// the saved norms.
inline at::Tensor normalize_backward(const at::Tensor& grad_u_in, const at::Tensor& u, const at::Tensor& norm_in,
                                     at::ScalarType dtype) {
  const int64_t n = u.size(0), d = u.size(1);
  const at::Tensor grad_u = grad_u_in.to(u.scalar_type()).contiguous();
  const at::Tensor norm = norm_in.to(u.scalar_type()).contiguous();
  at::Tensor dx = at::empty({n, d}, u.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "normalize_backward", [&] {
    using acc = acc_t<scalar_t>;
    TORCH_CHECK(u.scalar_type() == c10::CppTypeToScalarType<acc>::value, "normalize_backward: u must be ",
                c10::CppTypeToScalarType<acc>::value);
    const acc* gp = grad_u.const_data_ptr<acc>();
    const acc* up = u.const_data_ptr<acc>();
    const acc* np = norm.const_data_ptr<acc>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        normalize_backward_row(gp + i * d, up + i * d, np[i], acc(1), dp + i * d, d);
      }
    });
  });
  return dx;
}

}  // namespace cpu
}  // namespace idid_kernels
