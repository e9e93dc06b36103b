// ||x|| without overflow or underflow of the squares, as BLAS nrm2 guarantees. Per-element math,
// shared by every CPU and CUDA kernel (each supplies its own loops and reductions).
//
// The fast path is the plain sum of squares ss. It is exact to rounding unless the squares
// overflowed (ss = inf: a float32 row above ~1.8e19) or may have underflowed (ss below
// norm_sq_floor: elements below ~1e-19 in float32 square into subnormals or 0). Only then is the
// row read again: m = max |x_k|, r = m sqrt(sum (x_k / m)^2). A NaN entry gives NaN (ss is NaN,
// and the fast path returns it), an inf entry inf, a zero row 0.
#pragma once

#include <cmath>

#include "macros.h"

namespace idid_kernels {

// Sums of squares at or above this keep full precision: each square lost to gradual underflow
// carries an absolute error below 2^-149 (float) / 2^-1074 (double), under 2^-48 relative here.
template <typename A>
struct NormSqFloor {
  static constexpr A value = A(1e-30);  // float, ~2^-99.7
};
template <>
struct NormSqFloor<double> {
  static constexpr double value = 1e-292;  // ~2^-969
};

// Whether sqrt(ss) is the norm: ss finite and not below the floor, or NaN (which then propagates).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE bool norm_sq_is_exact(A ss) {
  return ss != ss || (ss >= NormSqFloor<A>::value && ss - ss == A(0));
}

// The norm from the largest magnitude m of the row and sum_k (x_k / m)^2 (the rescaled pass).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A norm_from_scaled(A m, A scaled_ss) {
  using std::sqrt;
  return (m == A(0) || !(m < A(INFINITY))) ? m : m * sqrt(scaled_ss);
}

}  // namespace idid_kernels
