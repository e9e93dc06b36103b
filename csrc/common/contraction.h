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

// g'(r) = sig(z) * (1 - sig(z)) / T with z = (r - offset) / T, evaluated as e / (1 + e)^2,
// e = exp(-|z|). Same value, but both factors keep full relative precision: forming 1 - sig from a
// rounded sig near 1 would lose up to all of its digits (sig = 1 - 6e-6 keeps only ~1% in fp32).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A contraction_grad(A r, A offset, A inv_temperature) {
  using std::exp;
  using std::fabs;
  const A e = exp(-fabs((r - offset) * inv_temperature));
  const A one_e = A(1) + e;
  return e / (one_e * one_e) * inv_temperature;
}

// d||x||/dx = x / ||x||, with the subgradient 0 at x = 0 (autograd's convention for the norm).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A inv_norm_or_zero(A r) {
  return r > A(0) ? A(1) / r : A(0);
}

}  // namespace idid_kernels
