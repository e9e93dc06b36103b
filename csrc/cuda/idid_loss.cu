// CUDA row epilogues of the IDID-R1 loss (spec/idid.md) for the device-agnostic driver
// csrc/driver/idid_loss_driver.h, whose rows are sorted by label (ignored rows last; see
// csrc/common/idid_chunk.h). The per-element math is csrc/common/idid_math.h's, as on the CPU
// (csrc/cpu/idid_loss.cpp: forward_row, CpuPolicy::grad_rows). The diversity term runs on
// class_density.cu's kernels.
//
//   forward_rows_kernel   one block per row of the chunk: block max and sums over the C logits
//   teacher_grad_kernel   dPhi_kc += the terms of the chunk's rows of class k: one block per class run
//                         and 32-column tile, its 8 warps take every 8th row of the run, and the 8
//                         partial sums are added in warp order
//   logit_grad_kernel     z <- G elementwise (blocks over rows and column tiles)
//
// Determinism: no floating-point atomics. Every sum is formed by one thread, warp or block in an
// order fixed by the code (cub's block reduction, loops in index order, partials in warp order), so
// results are bitwise reproducible run to run on a given GPU.
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "../common/idid_chunk.h"
#include "../common/idid_math.h"
#include "launchers.h"

namespace idid_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // threads per block, every kernel
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// Grid limits; every kernel loops (grid-stride) over what a capped grid does not cover.
constexpr int64_t kMaxGridX = INT_MAX;
constexpr int64_t kMaxGridY = 65535;

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a > b ? a : b;
  }
};

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

template <typename A>
using BlockReduce = cub::BlockReduce<A, kThreads>;

// The reduction of v over the block, returned to every thread. Every thread of the block must call
// it (block-uniform control flow). It ends with a barrier, so `temp` and `slot` may be reused by the
// next call at once.
template <typename A, typename Op>
__device__ __forceinline__ A block_all_reduce(A v, Op op, typename BlockReduce<A>::TempStorage& temp, A& slot) {
  const A total = BlockReduce<A>(temp).Reduce(v, op);  // valid in thread 0 only
  if (threadIdx.x == 0) slot = total;
  __syncthreads();
  const A out = slot;
  __syncthreads();
  return out;
}

// Forward statistics of each valid row of the chunk (cf. forward_row in csrc/cpu/idid_loss.cpp):
// L = logsumexp of the non-target logits (its own max, so nothing underflows however much the
// target dominates), lse = log_add_exp(L, z_k), ce = softplus(L - z_k); with distillation
// lse_nt = logsumexp_{c != k} z_c / tau and kd = sum_c r_kc (log r_kc - z_c / tau) + lse_nt.
template <typename A>
__global__ void __launch_bounds__(kThreads) forward_rows_kernel(IdidChunk<A> job) {
  __shared__ typename BlockReduce<A>::TempStorage temp;
  __shared__ A slot;
  const int64_t C = job.num_classes, B = job.batch;
  for (int64_t jj = blockIdx.x; jj < job.rows; jj += gridDim.x) {  // block-uniform
    const int64_t j = job.j0 + jj;
    const int64_t k = job.key[j];
    if (k >= C) continue;  // ignored row (block-uniform): its statistics stay 0
    const int64_t i = job.perm[j];
    const A* z = job.z + jj * C;

    A m = -static_cast<A>(INFINITY);
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      if (c != k) m = MaxOp()(m, z[c]);
    }
    m = block_all_reduce(m, MaxOp(), temp, slot);
    A s = A(0);
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      if (c != k) s += exp(z[c] - m);
    }
    const A L = m + log(block_all_reduce(s, SumOp(), temp, slot));

    A lse_nt = A(0), kd = A(0);
    if (job.distillation) {  // block-uniform
      if (job.unit_tau) {
        lse_nt = L;
      } else {
        // Scaling by 1/tau > 0 commutes with the (rounded) max: m / tau is the max of z / tau.
        const A mt = m * job.inv_tau;
        A st = A(0);
        for (int64_t c = threadIdx.x; c < C; c += kThreads) {
          if (c != k) st += exp(z[c] * job.inv_tau - mt);
        }
        lse_nt = mt + log(block_all_reduce(st, SumOp(), temp, slot));
      }
      const A* r = job.r + k * C;
      const A* log_r = job.log_r + k * C;
      A kl = A(0);  // the target column adds r_kk (log r_kk - .) = 0
      for (int64_t c = threadIdx.x; c < C; c += kThreads) kl += kd_summand(r[c], log_r[c], z[c] * job.inv_tau);
      kd = block_all_reduce(kl, SumOp(), temp, slot) + lse_nt;
    }
    if (threadIdx.x == 0) {
      const A zy = z[k];
      job.stats[kStatLse * B + i] = log_add_exp(L, zy);
      job.stats[kStatLseNt * B + i] = lse_nt;
      job.stats[kStatKd * B + i] = kd;
      job.stats[kStatCe * B + i] = softplus(L - zy);
    }
  }
}

// dPhi_kc += sum over the chunk's rows i of class k of a_i r_kc ((log r_kc - z_ic / tau) + shift_i),
// shift_i = lse_nt_i - kd_i. The rows of a class are contiguous (sorted), so the block of the first
// row of each class run in the chunk owns dphi[k][c] for its column tiles and reduces the run: warp w
// sums rows w, w + 8, ... of the run for the tile's 32 columns (one per lane), then warp 0 adds the 8
// partials to dphi in warp order. Blocks of the other rows have nothing to do. Must run before
// logit_grad_kernel overwrites the logits.
template <typename A>
__global__ void __launch_bounds__(kThreads) teacher_grad_kernel(IdidChunk<A> job) {
  __shared__ A part[kWarps][kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t C = job.num_classes, B = job.batch;
  for (int64_t jj = blockIdx.x; jj < job.rows; jj += gridDim.x) {  // block-uniform
    const int64_t j = job.j0 + jj;
    const int64_t k = job.key[j];
    if (k >= C) continue;                         // ignored rows take no part
    if (jj > 0 && job.key[j - 1] == k) continue;  // not the first row of its run in this chunk
    // The run: sorted positions [j, start[k + 1]) clipped to the chunk.
    const int64_t run_end = job.start[k + 1] - job.j0 < job.rows ? job.start[k + 1] - job.j0 : job.rows;
    for (int64_t c0 = int64_t(blockIdx.y) * kWarpSize; c0 < C; c0 += int64_t(gridDim.y) * kWarpSize) {
      const int64_t c = c0 + lane;
      A acc = A(0);
      if (c < C) {
        const A r = job.r[k * C + c], log_r = job.log_r[k * C + c];
        for (int64_t jr = jj + warp; jr < run_end; jr += kWarps) {
          const int64_t i = job.perm[job.j0 + jr];
          const A zt = job.z[jr * C + c] * job.inv_tau;
          const A shift = job.stats[kStatLseNt * B + i] - job.stats[kStatKd * B + i];
          acc += teacher_grad_term(r, log_r, zt, job.stats[kStatA * B + i], shift);
        }
      }
      part[warp][lane] = acc;
      __syncthreads();
      if (warp == 0 && c < C) {
        A total = job.dphi[k * C + c];
        for (int w = 0; w < kWarps; ++w) total += part[w][lane];
        job.dphi[k * C + c] = total;
      }
      __syncthreads();  // part is rewritten by the next tile
    }
  }
}

// z <- G = grad_ic a_i [p - Y + (q - r) / tau] in place (cf. ic_grad_distill in csrc/cpu/vec_math.cpp);
// the target column is grad_ic a_i expm1(-ce_i) = (p_ik - 1) scaled (accurate where p_ik rounds to 1);
// rows of ignored positions become 0.
template <typename A>
__global__ void __launch_bounds__(kThreads) logit_grad_kernel(IdidChunk<A> job) {
  const int64_t C = job.num_classes, B = job.batch;
  const A grad_ic = *job.grad_ic;
  const int64_t c_begin = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t c_step = int64_t(gridDim.y) * kThreads;
  for (int64_t jj = blockIdx.x; jj < job.rows; jj += gridDim.x) {
    const int64_t j = job.j0 + jj;
    const int64_t k = job.key[j];
    A* z = job.z + jj * C;
    if (k >= C) {
      for (int64_t c = c_begin; c < C; c += c_step) z[c] = A(0);
      continue;
    }
    const int64_t i = job.perm[j];
    const A g = grad_ic * job.stats[kStatA * B + i];
    const A lse = job.stats[kStatLse * B + i];
    const A target = g * expm1(-job.stats[kStatCe * B + i]);
    if (job.distillation) {
      const A lse_nt = job.stats[kStatLseNt * B + i];
      // With tau = 1, p = q exp(lse_nt - lse): one exponential per element.
      const A p_over_q = job.unit_tau ? exp(lse_nt - lse) : A(0);
      const A* r = job.r + k * C;
      for (int64_t c = c_begin; c < C; c += c_step) {
        const A zi = z[c];
        const A q = exp(zi * job.inv_tau - lse_nt);
        const A p = job.unit_tau ? q * p_over_q : exp(zi - lse);
        z[c] = c == k ? target : g * ic_logit_grad(p, q, r[c], job.inv_tau);
      }
    } else {
      for (int64_t c = c_begin; c < C; c += c_step) z[c] = c == k ? target : g * exp(z[c] - lse);
    }
  }
}

unsigned int grid_x(int64_t n) { return static_cast<unsigned int>(n < kMaxGridX ? n : kMaxGridX); }

unsigned int tiles_y(int64_t C, int64_t tile) {
  const int64_t tiles = (C + tile - 1) / tile;
  return static_cast<unsigned int>(tiles < kMaxGridY ? tiles : kMaxGridY);
}

}  // namespace

template <typename A>
cudaError_t idid_forward_rows(const IdidChunk<A>& job, cudaStream_t stream) {
  if (job.rows <= 0) return cudaSuccess;
  forward_rows_kernel<A><<<grid_x(job.rows), kThreads, 0, stream>>>(job);
  return cudaGetLastError();
}

template <typename A>
cudaError_t idid_grad_rows(const IdidChunk<A>& job, cudaStream_t stream) {
  if (job.rows <= 0) return cudaSuccess;
  if (job.distillation) {
    const dim3 grid(grid_x(job.rows), tiles_y(job.num_classes, kWarpSize));
    teacher_grad_kernel<A><<<grid, kThreads, 0, stream>>>(job);  // reads the logits before ...
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(grid_x(job.rows), tiles_y(job.num_classes, kThreads));
  logit_grad_kernel<A><<<grid, kThreads, 0, stream>>>(job);  // ... this overwrites them (same stream)
  return cudaGetLastError();
}

#define IDK_INSTANTIATE(A)                                                       \
  template cudaError_t idid_forward_rows<A>(const IdidChunk<A>&, cudaStream_t); \
  template cudaError_t idid_grad_rows<A>(const IdidChunk<A>&, cudaStream_t);
IDK_INSTANTIATE(float)
IDK_INSTANTIATE(double)
#undef IDK_INSTANTIATE

}  // namespace cuda
}  // namespace idid_kernels
