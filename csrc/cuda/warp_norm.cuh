// ||x_row|| by one full warp with BLAS nrm2's range (csrc/common/row_norm.h): the lane-strided sum
// of squares, and only where it overflowed or may have underflowed a second, rescaled pass
// (max |x_k| by the warp, then the sum of (x_k / max)^2). The branch is warp-uniform: every lane
// holds the same butterfly-reduced sums. All 32 lanes must call it; every lane gets the norm.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../common/row_norm.h"

namespace idid_kernels {
namespace cuda {

template <typename A>
__device__ __forceinline__ A warp_allreduce_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_allreduce_max(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// load(k) returns element k of the row in the accumulation type A.
template <typename A, typename Load>
__device__ __forceinline__ A warp_row_norm(const Load& load, int64_t d, int lane) {
  A ss = A(0);
  for (int64_t k = lane; k < d; k += 32) {
    const A v = load(k);
    ss += v * v;
  }
  ss = warp_allreduce_sum(ss);
  if (norm_sq_is_exact(ss)) return sqrt(ss);
  A m = A(0);
  for (int64_t k = lane; k < d; k += 32) m = fmax(m, fabs(load(k)));
  m = warp_allreduce_max(m);
  A scaled = A(0);
  if (m > A(0) && m < A(INFINITY)) {
    for (int64_t k = lane; k < d; k += 32) {
      const A v = load(k) / m;
      scaled += v * v;
    }
  }
  scaled = warp_allreduce_sum(scaled);
  return norm_from_scaled(m, scaled);
}

}  // namespace cuda
}  // namespace idid_kernels
