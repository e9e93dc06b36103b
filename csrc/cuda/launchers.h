// Host-side launchers of the CUDA kernels. Plain pointers and cudaStream_t only: no torch types,
// so the .cu files compile with nvcc against the CUDA headers and csrc/common alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cm_row.h"

namespace idid_kernels {
namespace cuda {

// x: (n, d) row-major contiguous; out: (n,) in T; norm: (n,) in Acc (float, or double for double).
// T is one of float, double, __half, __nv_bfloat16.
template <typename T, typename Acc>
cudaError_t norm_contraction_forward(const T* x, T* out, Acc* norm, int64_t n, int64_t d, Acc offset,
                                     Acc inv_temperature, cudaStream_t stream);

// dx_n = (grad_out_n * g'(r_n) + grad_norm_n) * x_n / r_n; grad_norm may be null.
template <typename T, typename Acc>
cudaError_t norm_contraction_backward(const Acc* grad_out, const Acc* grad_norm, const T* x, const Acc* norm, T* dx,
                                      int64_t n, int64_t d, Acc offset, Acc inv_temperature, cudaStream_t stream);

// cm_margin row epilogue over rows [0, rows) of job.s (one block per row); see cm_margin.cu.
template <typename A>
cudaError_t cm_epilogue(const CmRowJob<A>& job, int64_t rows, cudaStream_t stream);

}  // namespace cuda
}  // namespace idid_kernels
