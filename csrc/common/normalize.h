// Row normalisation u = x / max(||x||, eps) with F.normalize's semantics, and the two facts its
// backward needs. Per-element math, shared by every CPU and CUDA kernel.
//
// Backward of u = x / max(r, eps) given g = dL/du:
//   dx = (g - <g, u> u) / max(r, eps)   where r > eps,
//   dx = g / eps                        where r <= eps (the denominator is a constant there, so the
//                                       radial projection is dropped, exactly as autograd does).
#pragma once

#include "macros.h"

namespace idid_kernels {

// The denominator of F.normalize: max(r, kNormEps). A NaN norm stays NaN (torch.clamp_min's
// semantics): flooring it would turn a NaN row into finite garbage (x / 1e-12).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A norm_floor(A r) {
  return r <= A(kNormEps) ? A(kNormEps) : r;
}

// Whether the row's norm depends on x, i.e. whether the backward keeps the radial projection.
// Decided on the saved norm r itself (not on 1 / max(r, eps)) so the test is exact; true for a NaN
// norm, so the NaN flows into the gradient.
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE bool norm_above_floor(A r) {
  return !(r <= A(kNormEps));
}

}  // namespace idid_kernels
