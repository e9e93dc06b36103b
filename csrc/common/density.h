// The IDID diversity kernel kappa(c) = exp(t (c - 1)) of a cosine c, its derivative and the pair
// weight of the per-class density D_c = sum_{i != j in c} kappa_ij / (n_c (n_c - 1)) (spec/idid.md).
// Per-element math, shared by every CPU and CUDA kernel.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace idid_kernels {

// kappa = exp(t (c - 1)): in (0, 1] for a cosine c <= 1 and t > 0, so it never overflows (a cosine
// that rounds slightly above 1 gives kappa = 1 + O(t * ulp)).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A diversity_kernel(A cosine, A t) {
  using std::exp;  // float overload on the host; nvcc maps std:: math to device intrinsics
  return exp(t * (cosine - A(1)));
}

// d kappa / dc = t kappa, from the kernel value already computed in the forward or recomputed.
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A diversity_kernel_grad(A kappa, A t) {
  return t * kappa;
}

// 1 / (n (n - 1)): the weight of one ordered pair in a class of n >= 2 rows (0 for n < 2, where the
// class has no pairs and D_c is defined as 0).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A pair_weight(int64_t n) {
  return n >= 2 ? A(1) / (A(n) * A(n - 1)) : A(0);
}

}  // namespace idid_kernels
