// pairwise_cosine ops over a row-normalisation and GEMM policy `Rows` (cpu:: loops and GEMMs on the
// CPU, aten:: tensor ops on CUDA): S = U V^T with U, V the rows of x, y scaled to unit norm (F.normalize semantics;
// V = U when y is absent).
//
// Forward normalises each row once into the accumulation dtype (float32, float64 for float64) and
// does one BLAS/cuBLAS GEMM; it saves the per-row norms. Backward, with G = dL/dS:
//   dU = G V, dV = G^T U              (y given)
//   dU = (G + G^T) U                  (y absent: both factors are U; one GEMM instead of two)
//   dx_i = (dU_i - [r_i > eps] <dU_i, u_i> u_i) / max(r_i, eps), likewise dy.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../cpu/checks.h"

namespace idid_kernels {

inline void pairwise_check_pair(const at::Tensor& x, const at::Tensor& y) {
  check_2d_float("y", y);
  TORCH_CHECK(y.size(1) == x.size(1), "pairwise_cosine: y must have ", x.size(1), " columns like x, got ",
              y.size(1));
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "pairwise_cosine: y has dtype ", y.scalar_type(), " but x has ",
              x.scalar_type());
}

template <typename Rows>
struct PairwiseCosineOps {
  // -> (S (N, M) in x's dtype, norm_x (N,), norm_y (M,), or (0,) when y is absent; norms in the
  // accumulation dtype).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in,
                                                                const std::optional<at::Tensor>& y_in) {
    check_2d_float("x", x_in);
    const at::Tensor x = x_in.contiguous();
    auto [u, norm_x] = Rows::unit_rows(x);
    at::Tensor cos, norm_y;
    if (y_in.has_value() && y_in->defined()) {
      pairwise_check_pair(x, *y_in);
      auto [v, ny] = Rows::unit_rows(y_in->contiguous());
      cos = Rows::mm(u, v.t());
      norm_y = ny;
    } else {
      cos = Rows::mm(u, u.t());
      norm_y = at::empty({0}, norm_x.options());
    }
    return {cos.to(x.scalar_type()), norm_x, norm_y};
  }

  // -> (dx, dy); an output not asked for by output_mask (and dy when y is absent) is an empty (0, d)
  // tensor.
  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                     const std::optional<at::Tensor>& y_in, const at::Tensor& norm_x,
                                                     const at::Tensor& norm_y, std::array<bool, 2> output_mask) {
    check_2d_float("x", x_in);
    const bool has_y = y_in.has_value() && y_in->defined();
    const at::Tensor x = x_in.contiguous();
    const int64_t n = x.size(0), d = x.size(1);
    const int64_t m = has_y ? y_in->size(0) : n;
    TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == n && grad_in.size(1) == m,
                "pairwise_cosine_backward: grad must have shape (", n, ", ", m, "), got ", grad_in.sizes());
    const at::Tensor u = Rows::unit_rows_from_norm(x, norm_x);
    const at::Tensor g = grad_in.to(u.scalar_type());
    at::Tensor dx = at::empty({0, d}, x.options());
    at::Tensor dy = at::empty({0, d}, x.options());
    if (!has_y) {
      if (output_mask[0]) dx = Rows::normalize_backward(Rows::mm(g + g.t(), u), u, norm_x, x.scalar_type());
      return {dx, dy};
    }
    pairwise_check_pair(x, *y_in);
    const at::Tensor y = y_in->contiguous();
    const at::Tensor v = Rows::unit_rows_from_norm(y, norm_y);
    if (output_mask[0]) dx = Rows::normalize_backward(Rows::mm(g, v), u, norm_x, x.scalar_type());
    if (output_mask[1]) dy = Rows::normalize_backward(Rows::mm(g.t(), u), v, norm_y, y.scalar_type());
    return {dx, dy};
  }
};

}  // namespace idid_kernels
