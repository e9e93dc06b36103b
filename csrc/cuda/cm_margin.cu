// CUDA row epilogue of the cm_margin ops (forward, backward and fused modes). The math is
// csrc/common/cm_row.h's (cm_scale, target_phi, cm_log_sum), the driver csrc/driver/cm_margin_driver.h.
//
// A chunk's rows are split along the classes so that a chunk of few rows (64 rows of C = 1M fill a
// 256 MiB chunk) still fills the GPU: block (i, s) of a grid of rows x splits sweeps the columns
// [s W, (s + 1) W) of row i with W = ceil(C / splits) (cm_epilogue_splits in launchers.h picks the
// splits from the rows, C and the GPU's size). Per row:
//
//   1. partial_kernel       cosines c_j = s_ij / ||w_j|| in place; in forward/fused also the block's
//                           max m_s of the non-target cosines and sum_s = sum_j exp(a (c_j - m_s))
//   2. row_stats_kernel     (forward/fused) one thread per row: psi_y from c_y, m = max(psi_y, m_s),
//                           P = sum_s sum_s exp(a (m_s - m)), t = a (m - psi_y), loss = t + log_sum
//   3. grad_partial_kernel  (backward/fused) p_j = exp(a (c_j - m) - log_sum) for the block's
//                           non-target columns, G'_j = a g p_j / ||w_j|| in place, and the block's
//                           sums of p_j and p_j c_j
//   4. grad_finish_kernel   (backward/fused) one thread per row: G'_y = -a g (sum p) psi'_y / ||w_y||
//                           and the radial coefficient s g'(r) g (sum p c - (sum p) psi_y)
//
// The partials go through `scratch` (rows x splits x 2 values), combined in split order, so results
// are bitwise reproducible run to run. A label outside [0, C) (possible only when the Python-side
// range check was skipped: torch.compile, CUDA-graph capture, IDID_KERNELS_CHECK_LABELS=0) never
// indexes the row: the row's loss and statistics become NaN and it contributes no gradient.
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../common/cm_row.h"
#include "launchers.h"

namespace idid_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowThreads = 128;  // threads per block of the one-thread-per-row kernels

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a > b ? a : b;
  }
};

// What every pass needs to know about row i of the chunk: its label, whether it takes part, and its
// weight (per-row weight in fused mode, upstream gradient in backward).
template <typename A>
struct RowStatus {
  int64_t y;
  bool bad_label, skip;  // skip: no statistics (ignored or bad label), or no gradient (backward, g = 0)
  A g;
};

template <typename A>
__device__ __forceinline__ RowStatus<A> row_status(const CmRowJob<A>& job, int64_t i) {
  const int64_t row_id = job.n0 + i;
  RowStatus<A> st;
  st.y = job.labels[row_id];
  st.bad_label = st.y != job.ignore_index && (st.y < 0 || st.y >= job.num_classes);
  st.g = job.mode != kCmForward ? job.g[row_id] : A(0);
  st.skip = st.bad_label || st.y == job.ignore_index || (job.mode == kCmBackward && st.g == A(0));
  return st;
}

// The columns [lo, hi) of split s.
__device__ __forceinline__ void split_columns(int64_t c, int64_t splits, int64_t s, int64_t* lo, int64_t* hi) {
  const int64_t width = (c + splits - 1) / splits;
  *lo = s * width < c ? s * width : c;
  *hi = *lo + width < c ? *lo + width : c;
}

template <typename A>
__global__ void __launch_bounds__(kThreads) partial_kernel(CmRowJob<A> job, int64_t splits, A* __restrict__ scratch) {
  using Reduce = cub::BlockReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ A shared_max;
  const int tid = threadIdx.x;
  const int64_t i = blockIdx.x, split = blockIdx.y;
  const int64_t c = job.num_classes;
  A* row = job.s + i * c;
  int64_t lo, hi;
  split_columns(c, splits, split, &lo, &hi);
  const RowStatus<A> st = row_status(job, i);
  if (st.skip) {  // block-uniform, before any barrier
    if (job.mode != kCmForward) {
      for (int64_t j = lo + tid; j < hi; j += kThreads) row[j] = A(0);
    }
    return;
  }
  for (int64_t j = lo + tid; j < hi; j += kThreads) row[j] = row[j] * job.inv_wn[j];
  if (job.mode == kCmBackward) return;  // block-uniform
  // Each thread reads back only the columns it scaled itself: no barrier needed before the sweeps.
  const A a = cm_scale(job.cfg, job.x_norm[job.n0 + i]);
  A m = -static_cast<A>(INFINITY);
  for (int64_t j = lo + tid; j < hi; j += kThreads) {
    if (j != st.y) m = MaxOp()(m, row[j]);
  }
  m = Reduce(temp).Reduce(m, MaxOp());
  if (tid == 0) shared_max = m;
  __syncthreads();  // the max visible to every thread; the reduction's storage free again
  m = shared_max;
  A sum = A(0);
  if (m > -static_cast<A>(INFINITY)) {  // block-uniform: a split of only the target column has no sum
    for (int64_t j = lo + tid; j < hi; j += kThreads) {
      if (j != st.y) sum += exp(a * (row[j] - m));
    }
  }
  sum = Reduce(temp).Sum(sum);
  if (tid == 0) {
    A* part = scratch + (i * splits + split) * 2;
    part[0] = m;
    part[1] = sum;
  }
}

template <typename A>
__global__ void __launch_bounds__(kRowThreads) row_stats_kernel(CmRowJob<A> job, int64_t rows, int64_t splits,
                                                                const A* __restrict__ scratch) {
  for (int64_t i = int64_t(blockIdx.x) * kRowThreads + threadIdx.x; i < rows; i += int64_t(gridDim.x) * kRowThreads) {
    const int64_t row_id = job.n0 + i;
    const RowStatus<A> st = row_status(job, i);
    if (st.skip) {
      const A v = st.bad_label ? A(NAN) : A(0);
      job.loss[row_id] = job.shift[row_id] = job.log_sum[row_id] = v;
      continue;
    }
    const A a = cm_scale(job.cfg, job.x_norm[row_id]);
    A dphi;
    const A psi_y = target_phi(job.s[i * job.num_classes + st.y], job.cfg.margin, row_id, &dphi);
    const A* part = scratch + i * splits * 2;
    // The exact max of the margined row (the target's plain cosine stays out of it).
    A m = psi_y;
    for (int64_t s = 0; s < splits; ++s) m = MaxOp()(m, part[2 * s]);
    A off = A(0);
    for (int64_t s = 0; s < splits; ++s) {
      if (part[2 * s + 1] > A(0)) off += part[2 * s + 1] * exp(a * (part[2 * s] - m));
    }
    const A t = a * (m - psi_y);
    const A ls = cm_log_sum(t, off);
    job.loss[row_id] = t + ls;
    job.shift[row_id] = m;
    job.log_sum[row_id] = ls;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) grad_partial_kernel(CmRowJob<A> job, int64_t splits,
                                                                A* __restrict__ scratch) {
  using Reduce = cub::BlockReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const int tid = threadIdx.x;
  const int64_t i = blockIdx.x, split = blockIdx.y;
  const int64_t c = job.num_classes, row_id = job.n0 + i;
  A* row = job.s + i * c;
  int64_t lo, hi;
  split_columns(c, splits, split, &lo, &hi);
  const RowStatus<A> st = row_status(job, i);
  if (st.skip) return;  // the partial pass zeroed the row
  if (st.g == A(0)) {   // fused mode with a zero row weight (block-uniform)
    for (int64_t j = lo + tid; j < hi; j += kThreads) row[j] = A(0);
    return;
  }
  const A a = cm_scale(job.cfg, job.x_norm[row_id]);
  const A ag = a * st.g, shift = job.shift[row_id], log_sum = job.log_sum[row_id];
  A sum_p = A(0), sum_pc = A(0);
  for (int64_t j = lo + tid; j < hi; j += kThreads) {
    if (j == st.y) continue;  // the finishing pass writes the target column
    const A cj = row[j];
    const A p = exp(a * (cj - shift) - log_sum);
    sum_p += p;
    sum_pc += p * cj;
    row[j] = ag * p * job.inv_wn[j];
  }
  sum_p = Reduce(temp).Sum(sum_p);
  __syncthreads();  // the storage is reused at once
  sum_pc = Reduce(temp).Sum(sum_pc);
  if (tid == 0) {
    A* part = scratch + (i * splits + split) * 2;
    part[0] = sum_p;
    part[1] = sum_pc;
  }
}

template <typename A>
__global__ void __launch_bounds__(kRowThreads) grad_finish_kernel(CmRowJob<A> job, int64_t rows, int64_t splits,
                                                                  const A* __restrict__ scratch) {
  for (int64_t i = int64_t(blockIdx.x) * kRowThreads + threadIdx.x; i < rows; i += int64_t(gridDim.x) * kRowThreads) {
    const int64_t row_id = job.n0 + i;
    const RowStatus<A> st = row_status(job, i);
    if (st.skip || st.g == A(0)) {  // the row was zeroed by the partial or the gradient pass
      job.radial[i] = A(0);
      continue;
    }
    const A r = job.x_norm[row_id];
    const A a = cm_scale(job.cfg, r);
    A* cy = job.s + i * job.num_classes + st.y;
    A dphi;
    const A psi_y = target_phi(*cy, job.cfg.margin, row_id, &dphi);
    const A* part = scratch + i * splits * 2;
    A sum_p = A(0), sum_pc = A(0);
    for (int64_t s = 0; s < splits; ++s) {
      sum_p += part[2 * s];
      sum_pc += part[2 * s + 1];
    }
    // p_y - 1 = -sum_{j != y} p_j (accurate where p_y rounds to 1).
    *cy = -a * st.g * sum_p * dphi * job.inv_wn[st.y];
    job.radial[i] = cm_scale_grad(job.cfg, r) * st.g * (sum_pc - sum_p * psi_y);
  }
}

unsigned int row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kRowThreads - 1) / kRowThreads;
  return static_cast<unsigned int>(blocks < 65535 ? blocks : 65535);  // grid-stride beyond
}

// Shard modes (one block per row; classes [class_offset, class_offset + C) of a larger head; see cm_row.h): forward
// leaves the row's partial max (in lse), sum-exp and target logit; backward the G' row and the
// shard's radial part, from the global lse. A row whose class is in another shard has no target.
template <typename A>
__global__ void __launch_bounds__(kThreads) cm_shard_kernel(CmRowJob<A> job) {
  using Reduce = cub::BlockReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ A shared_max;

  const int tid = threadIdx.x;
  const int64_t i = blockIdx.x;
  const int64_t c = job.num_classes;
  const int64_t row_id = job.n0 + i;
  A* row = job.s + i * c;
  const int64_t y = job.labels[row_id];
  const bool valid = y != job.ignore_index;
  const int64_t local = y - job.class_offset;
  const int64_t y_local = valid && local >= 0 && local < c ? local : -1;
  const bool forward = job.mode == kCmShardForward;
  const A gi = forward ? A(0) : job.g[row_id];
  if (!valid || (!forward && gi == A(0))) {
    if (forward) {
      if (tid == 0) job.lse[row_id] = job.sum_exp[row_id] = job.target[row_id] = A(0);
    } else {
      for (int64_t j = tid; j < c; j += kThreads) row[j] = A(0);
      if (tid == 0) job.radial[i] = A(0);
    }
    return;
  }
  for (int64_t j = tid; j < c; j += kThreads) row[j] = row[j] * job.inv_wn[j];
  __syncthreads();
  const A r = job.x_norm[row_id];
  const A a = cm_scale(job.cfg, r);
  A dphi = A(1);
  const A psi_y = y_local >= 0 ? target_phi(row[y_local], job.cfg.margin, row_id, &dphi) : A(0);
  const A zy = a * psi_y;
  if (forward) {  // the max in cosine units and exponents a (psi_j - m), as cm_row_shard_forward
    A m = y_local >= 0 ? psi_y : -INFINITY;
    for (int64_t j = tid; j < c; j += kThreads) {
      if (j != y_local) m = MaxOp()(m, row[j]);
    }
    m = Reduce(temp).Reduce(m, MaxOp());
    if (tid == 0) shared_max = m;
    __syncthreads();
    m = shared_max;
    A sum = A(0);
    for (int64_t j = tid; j < c; j += kThreads) {
      if (j != y_local) sum += exp(a * (row[j] - m));
    }
    __syncthreads();
    sum = Reduce(temp).Sum(sum);
    if (tid == 0) {
      job.lse[row_id] = a * m;
      job.sum_exp[row_id] = sum;  // the target left out (cm_row_shard_forward)
      job.target[row_id] = y_local >= 0 ? zy : A(0);
    }
    return;
  }
  const A lse = job.lse[row_id];
  const A ag = a * gi;
  A sum_pc = A(0);
  for (int64_t j = tid; j < c; j += kThreads) {
    if (j == y_local) continue;
    const A cj = row[j];
    const A p = exp(a * cj - lse);
    sum_pc += p * cj;
    row[j] = ag * p * job.inv_wn[j];
  }
  __syncthreads();
  sum_pc = Reduce(temp).Sum(sum_pc);
  if (tid == 0) {
    A coef = sum_pc;
    if (y_local >= 0) {
      const A py_minus_1 = expm1(zy - lse);  // the other shards' mass is not visible here
      row[y_local] = ag * py_minus_1 * dphi * job.inv_wn[y_local];
      coef += py_minus_1 * psi_y;
    }
    job.radial[i] = cm_scale_grad(job.cfg, r) * gi * coef;
  }
}

}  // namespace

template <typename A>
cudaError_t cm_epilogue(const CmRowJob<A>& job, int64_t rows, int64_t splits, A* scratch, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 2147483647 || job.num_classes <= 0) return cudaErrorInvalidValue;
  const unsigned int n = static_cast<unsigned int>(rows);
  if (job.mode == kCmShardForward || job.mode == kCmShardBackward) {
    cm_shard_kernel<A><<<n, kThreads, 0, stream>>>(job);
    return cudaGetLastError();
  }
  if (splits < 1 || splits > 65535 || scratch == nullptr) return cudaErrorInvalidValue;
  const dim3 grid(n, static_cast<unsigned int>(splits));
  partial_kernel<A><<<grid, kThreads, 0, stream>>>(job, splits, scratch);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (job.mode != kCmBackward) {
    row_stats_kernel<A><<<row_blocks(rows), kRowThreads, 0, stream>>>(job, rows, splits, scratch);
    err = cudaGetLastError();
    if (err != cudaSuccess || job.mode == kCmForward) return err;
  }
  grad_partial_kernel<A><<<grid, kThreads, 0, stream>>>(job, splits, scratch);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  grad_finish_kernel<A><<<row_blocks(rows), kRowThreads, 0, stream>>>(job, rows, splits, scratch);
  return cudaGetLastError();
}

template cudaError_t cm_epilogue<float>(const CmRowJob<float>&, int64_t, int64_t, float*, cudaStream_t);
template cudaError_t cm_epilogue<double>(const CmRowJob<double>&, int64_t, int64_t, double*, cudaStream_t);

}  // namespace cuda
}  // namespace idid_kernels
