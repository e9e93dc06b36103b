// Host-side launchers of the CUDA kernels. Plain pointers and cudaStream_t only: no torch types,
// so the .cu files compile with nvcc against the CUDA headers and csrc/common alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cm_row.h"
#include "../common/idid_chunk.h"

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

// cm_margin row epilogue over rows [0, rows) of job.s; see cm_margin.cu. Forward, backward and fused
// modes split each row's classes over `splits` blocks (cm_epilogue_splits), with scratch holding
// cm_epilogue_scratch(rows, splits) values of A; the shard modes run one block per row (splits and
// scratch unused).
template <typename A>
cudaError_t cm_epilogue(const CmRowJob<A>& job, int64_t rows, int64_t splits, A* scratch, cudaStream_t stream);

// Blocks per row: enough that rows x splits reaches target_blocks (a few per multiprocessor), with at
// least min_columns classes per block (a block's sweep must outweigh its reductions), at most 65535.
inline int64_t cm_epilogue_splits(int64_t rows, int64_t num_classes, int64_t target_blocks, int64_t min_columns) {
  if (rows <= 0 || num_classes <= 0 || rows >= target_blocks) return 1;
  int64_t splits = (target_blocks + rows - 1) / rows;
  const int64_t by_width = num_classes / min_columns;  // every block gets at least min_columns classes
  if (splits > by_width) splits = by_width;
  if (splits > 65535) splits = 65535;
  return splits < 1 ? 1 : splits;
}

inline int64_t cm_epilogue_scratch(int64_t rows, int64_t splits) { return rows * splits * 2; }

// class_density (see class_density.cu). The rows are taken in label-sorted order: order (n,) is a
// stable argsort of the labels, sorted_labels (n,) the sorted labels and offsets (C + 1,) the first
// sorted position of each class (class c is sorted positions [offsets[c], offsets[c + 1])).
// Forward writes norm (n,) in the original row order and density (C,); us (n, d) and row_sum (n,)
// are scratch. Backward writes every row of dx (n, d) from grad (C,) and the saved norm; us and
// pull (n, d) are scratch. T is one of float, double, __half, __nv_bfloat16; A is float (double for
// double). n and C must be below 2^31 (cudaErrorInvalidValue otherwise).
template <typename T, typename A>
cudaError_t class_density_forward(const T* x, const int64_t* order, const int64_t* sorted_labels,
                                  const int64_t* offsets, int64_t n, int64_t d, int64_t num_classes, A t, A* norm,
                                  A* us, A* row_sum, T* density, cudaStream_t stream);

template <typename T, typename A>
cudaError_t class_density_backward(const A* grad, const T* x, const int64_t* order, const int64_t* sorted_labels,
                                   const int64_t* offsets, const A* norm, int64_t n, int64_t d, int64_t num_classes,
                                   A t, A* us, A* pull, T* dx, cudaStream_t stream);

// The same density on unit rows us (n, d) already sorted by label (sorted_labels, offsets as above; a
// label outside [0, C) belongs to no class): density (C,) in A, row_sum (n,) scratch. A is float or
// double.
template <typename A>
cudaError_t class_density_sorted_forward(const A* us, const int64_t* sorted_labels, const int64_t* offsets, int64_t n,
                                         int64_t d, int64_t num_classes, A t, A* row_sum, A* density,
                                         cudaStream_t stream);

// du (n, d) += the gradient of sum_c grad_c D_c with respect to the unit rows us, without the
// normalisation backward: du_p += 2 grad_c / (n_c (n_c - 1)) sum_{j != p same class} t kappa_pj u_j.
template <typename A>
cudaError_t class_density_sorted_pull(const A* grad, const A* us, const int64_t* sorted_labels,
                                      const int64_t* offsets, int64_t n, int64_t d, int64_t num_classes, A t, A* du,
                                      cudaStream_t stream);

// IDID-R1 row epilogues over one chunk of label-sorted rows, job.rows x C logits (idid_loss.cu,
// csrc/common/idid_chunk.h); A is float or double. Forward: lse, lse_nt, kd, ce of each valid row into
// job.stats. Gradient: job.z <- G in place and, with distillation, dPhi accumulated into job.dphi.
template <typename A>
cudaError_t idid_forward_rows(const IdidChunk<A>& job, cudaStream_t stream);
template <typename A>
cudaError_t idid_grad_rows(const IdidChunk<A>& job, cudaStream_t stream);

}  // namespace cuda
}  // namespace idid_kernels
