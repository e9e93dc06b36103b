// C entry points to the float64 launchers of csrc/cuda/class_density.cu and norm_contraction.cu
// (and to the launch heuristics of launchers.h),
// built with the CUDA-execution emulator, for the emulator's negative controls
// (tests/test_cuda_emulator.py): the tests build this with mutated copies of the kernels and check
// the results against the package's reference.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

using idid_kernels::cuda::class_density_backward;
using idid_kernels::cuda::class_density_forward;
using idid_kernels::cuda::norm_contraction_backward;
using idid_kernels::cuda::norm_contraction_forward;

extern "C" {

int shim_norm_contraction_forward(const double* x, double* out, double* norm, int64_t n, int64_t d, double offset,
                                  double inv_t) {
  cudaError_t e = norm_contraction_forward<double, double>(x, out, norm, n, d, offset, inv_t, nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

int shim_norm_contraction_backward(const double* grad_out, const double* x, const double* norm, double* dx, int64_t n,
                                   int64_t d, double offset, double inv_t) {
  cudaError_t e = norm_contraction_backward<double, double>(grad_out, nullptr, x, norm, dx, n, d, offset, inv_t,
                                                            nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

int shim_class_density_forward(const double* x, const int64_t* order, const int64_t* sorted_labels,
                               const int64_t* offsets, int64_t n, int64_t d, int64_t c, double t, double* norm,
                               double* us, double* row_sum, double* density) {
  cudaError_t e = class_density_forward<double, double>(x, order, sorted_labels, offsets, n, d, c, t, norm, us,
                                                        row_sum, density, nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

int shim_class_density_backward(const double* grad, const double* x, const int64_t* order,
                                const int64_t* sorted_labels, const int64_t* offsets, const double* norm, int64_t n,
                                int64_t d, int64_t c, double t, double* us, double* pull, double* dx) {
  cudaError_t e = class_density_backward<double, double>(grad, x, order, sorted_labels, offsets, norm, n, d, c, t,
                                                         us, pull, dx, nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

int64_t shim_cm_epilogue_splits(int64_t rows, int64_t num_classes, int64_t target_blocks, int64_t min_columns) {
  return idid_kernels::cuda::cm_epilogue_splits(rows, num_classes, target_blocks, min_columns);
}

const char* shim_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
