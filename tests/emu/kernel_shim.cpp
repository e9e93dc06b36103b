// C entry points to the float64 launchers of csrc/cuda/class_density.cu, norm_contraction.cu and
// cm_margin.cu (and to the launch heuristics of launchers.h),
// built with the CUDA-execution emulator, for the emulator's negative controls
// (tests/test_cuda_emulator.py): the tests build this with mutated copies of the kernels and check
// the results against the package's reference.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cm_row.h"
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

// The fused cm_margin epilogue (forward statistics and G' in one pass) on rows x C dots
// s = <u_n, w_j> (overwritten with G'), CosFace margin m3, s * sigmoid(||x||) scale.
int shim_cm_fused(double* s, const double* inv_wn, const double* x_norm, const int64_t* labels, const double* g,
                  double* loss, double* shift, double* log_sum, double* radial, int64_t rows, int64_t c, double scale,
                  double m3, int64_t splits, double* scratch) {
  idid_kernels::CmRowJob<double> job{};
  job.cfg.margin = idid_kernels::Margin<double>{idid_kernels::kMarginCosFace, 1.0, 0.0, m3, 0.0, false, true, m3};
  job.cfg.s = scale;
  job.cfg.contraction = true;
  job.cfg.offset = 0.0;
  job.cfg.inv_temperature = 1.0;
  job.cfg.detach_norm = false;
  job.s = s;
  job.inv_wn = inv_wn;
  job.x_norm = x_norm;
  job.labels = labels;
  job.g = g;
  job.loss = loss;
  job.shift = shift;
  job.log_sum = log_sum;
  job.radial = radial;
  job.n0 = 0;
  job.num_classes = c;
  job.ignore_index = -100;
  job.mode = idid_kernels::kCmFused;
  cudaError_t e = idid_kernels::cuda::cm_epilogue<double>(job, rows, splits, scratch, nullptr);
  return e != cudaSuccess ? e : cudaGetLastError();
}

int64_t shim_cm_epilogue_splits(int64_t rows, int64_t num_classes, int64_t target_blocks, int64_t min_columns) {
  return idid_kernels::cuda::cm_epilogue_splits(rows, num_classes, target_blocks, min_columns);
}

const char* shim_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
