// Feature-norm contraction g(r) = sigmoid((r - offset) / T) and its derivative
// (spec/cm_margin.md). Per-element math, shared by every CPU and CUDA kernel.
#pragma once

#include <cmath>

#include "macros.h"

namespace idid_kernels {

// Overflow-free logistic function: exp is only ever taken of a non-positive argument.
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A stable_sigmoid(A z) {
  using std::exp;  // float overload on the host; nvcc maps std:: math to device intrinsics
  if (z >= A(0)) {
    return A(1) / (A(1) + exp(-z));
  }
  const A e = exp(z);
  return e / (A(1) + e);
}

// g(r) = sigmoid((r - offset) * inv_temperature).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A contraction(A r, A offset, A inv_temperature) {
  return stable_sigmoid((r - offset) * inv_temperature);
}

// g'(r) from g(r) = sig: sig * (1 - sig) / T. The product form keeps full relative precision for
// small sig; (1 - sig) alone would cancel to 0 long before the product underflows.
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A contraction_grad(A sig, A inv_temperature) {
  return sig * (A(1) - sig) * inv_temperature;
}

// d||x||/dx = x / ||x||, with the subgradient 0 at x = 0 (autograd's convention for the norm).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A inv_norm_or_zero(A r) {
  return r > A(0) ? A(1) / r : A(0);
}

}  // namespace idid_kernels
