// CUDA row epilogue of the cm_margin ops: one thread block per row of the chunk, threads sweeping
// the C classes, block reductions for the max, the sum of exponentials and the gradient sums. The
// math is csrc/common/cm_row.h's (cm_scale, margin_phi), the driver csrc/driver/cm_margin_driver.h.
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <cmath>

#include "../common/cm_row.h"
#include "launchers.h"

namespace idid_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a > b ? a : b;
  }
};

template <typename A>
__global__ void __launch_bounds__(kThreads) cm_epilogue_kernel(CmRowJob<A> job) {
  using Reduce = cub::BlockReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ A shared_value[2];

  const int tid = threadIdx.x;
  const int64_t i = blockIdx.x;
  const int64_t c = job.num_classes;
  const int64_t row_id = job.n0 + i;
  A* row = job.s + i * c;
  const int64_t y = job.labels[row_id];
  const bool want_grad = job.mode != kCmForward;
  const A gi = want_grad ? job.g[row_id] : A(0);

  // A label outside [0, C) (possible only when the Python-side range check was skipped: under
  // torch.compile, CUDA-graph capture or IDID_KERNELS_CHECK_LABELS=0) must not index the row:
  // the row's loss becomes NaN and it contributes no gradient.
  const bool bad_label = y != job.ignore_index && (y < 0 || y >= c);
  if (bad_label || y == job.ignore_index || (want_grad && job.mode == kCmBackward && gi == A(0))) {
    if (tid == 0) {
      if (job.mode != kCmBackward) {
        job.loss[row_id] = bad_label ? A(NAN) : A(0);
        job.shift[row_id] = job.log_sum[row_id] = bad_label ? A(NAN) : A(0);
      }
      if (want_grad) job.radial[i] = A(0);
    }
    if (want_grad) {
      for (int64_t j = tid; j < c; j += kThreads) row[j] = A(0);
    }
    return;
  }

  for (int64_t j = tid; j < c; j += kThreads) row[j] = row[j] * job.inv_wn[j];
  __syncthreads();

  // The math of csrc/common/cm_row.h: shift m in cosine units, exponents a (c_j - m), the loss
  // t + log_sum without the cancellation of lse - z_y.
  const A r = job.x_norm[row_id];
  const A a = cm_scale(job.cfg, r);
  A dphi;
  const A psi_y = margin_phi(row[y], job.cfg.margin, &dphi);
  A shift, log_sum;
  if (job.mode != kCmBackward) {
    // Exact max of the margined row (the target's plain cosine stays out of it).
    A m = psi_y;
    for (int64_t j = tid; j < c; j += kThreads) {
      if (j != y) m = MaxOp()(m, row[j]);
    }
    m = Reduce(temp).Reduce(m, MaxOp());
    if (tid == 0) shared_value[0] = m;
    __syncthreads();
    m = shared_value[0];
    A off = A(0);
    for (int64_t j = tid; j < c; j += kThreads) {
      if (j != y) off += exp(a * (row[j] - m));
    }
    __syncthreads();  // temp storage reuse
    off = Reduce(temp).Sum(off);
    if (tid == 0) {
      const A t = a * (m - psi_y);
      const A ls = cm_log_sum(t, off);
      shared_value[1] = ls;
      job.loss[row_id] = t + ls;
      job.shift[row_id] = m;
      job.log_sum[row_id] = ls;
    }
    __syncthreads();
    shift = m;
    log_sum = shared_value[1];
  } else {
    shift = job.shift[row_id];
    log_sum = job.log_sum[row_id];
  }
  if (!want_grad) return;
  if (gi == A(0)) {  // fused mode with a zero row weight
    __syncthreads();
    for (int64_t j = tid; j < c; j += kThreads) row[j] = A(0);
    if (tid == 0) job.radial[i] = A(0);
    return;
  }
  const A ag = a * gi;
  A sum_p = A(0), sum_pc = A(0);
  for (int64_t j = tid; j < c; j += kThreads) {
    if (j == y) continue;
    const A cj = row[j];
    const A p = exp(a * (cj - shift) - log_sum);
    sum_p += p;
    sum_pc += p * cj;
    row[j] = ag * p * job.inv_wn[j];
  }
  __syncthreads();
  sum_p = Reduce(temp).Sum(sum_p);
  __syncthreads();
  sum_pc = Reduce(temp).Sum(sum_pc);
  if (tid == 0) {
    // p_y - 1 = -sum_{j != y} p_j (accurate where p_y rounds to 1).
    row[y] = -ag * sum_p * dphi * job.inv_wn[y];
    job.radial[i] = cm_scale_grad(job.cfg, r) * gi * (sum_pc - sum_p * psi_y);
  }
}

// Shard modes (classes [class_offset, class_offset + C) of a larger head; see cm_row.h): forward
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
  const A psi_y = y_local >= 0 ? margin_phi(row[y_local], job.cfg.margin, &dphi) : A(0);
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
cudaError_t cm_epilogue(const CmRowJob<A>& job, int64_t rows, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (job.mode == kCmShardForward || job.mode == kCmShardBackward) {
    cm_shard_kernel<A><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(job);
  } else {
    cm_epilogue_kernel<A><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(job);
  }
  return cudaGetLastError();
}

template cudaError_t cm_epilogue<float>(const CmRowJob<float>&, int64_t, cudaStream_t);
template cudaError_t cm_epilogue<double>(const CmRowJob<double>&, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace idid_kernels
