// CPU row epilogue of the cm_margin ops; the chunked GEMM driver is csrc/driver/cm_margin_driver.h
// and the per-row math csrc/common/cm_row.h. Rows of a chunk run in parallel (at::parallel_for);
// each row's sweeps over the C classes are vectorised.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../driver/cm_margin_driver.h"

namespace idid_kernels {
namespace {

// Shard modes: partial statistics (forward) or the shard's G' rows and radial parts (backward).
template <typename A>
IDK_FORCE_INLINE void shard_rows(const CmRowJob<A>& job, int64_t begin, int64_t end) {
  const int64_t c = job.num_classes;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row_id = job.n0 + i;
    A* row = job.s + i * c;
    const int64_t y = job.labels[row_id];
    const bool valid = y != job.ignore_index;
    const int64_t local = y - job.class_offset;
    const int64_t y_local = valid && local >= 0 && local < c ? local : -1;
    if (job.mode == kCmShardForward) {
      if (!valid) {
        job.lse[row_id] = job.sum_exp[row_id] = job.target[row_id] = A(0);
        continue;
      }
      cm_to_cosines(row, job.inv_wn, c);
      const CmShardOut<A> out = cm_row_shard_forward(job.cfg, row, c, y_local, job.x_norm[row_id]);
      job.lse[row_id] = out.max;
      job.sum_exp[row_id] = out.sum_exp;
      job.target[row_id] = out.target;
      continue;
    }
    const A gi = job.g[row_id];
    if (!valid || gi == A(0)) {
      std::fill(row, row + c, A(0));
      job.radial[i] = A(0);
      continue;
    }
    cm_to_cosines(row, job.inv_wn, c);
    job.radial[i] =
        cm_row_shard_grad(job.cfg, row, job.inv_wn, c, y_local, job.x_norm[row_id], job.lse[row_id], gi);
  }
}

template <typename A>
IDK_FORCE_INLINE void epilogue_rows_impl(const CmRowJob<A>& job, int64_t begin, int64_t end) {
  if (job.mode == kCmShardForward || job.mode == kCmShardBackward) {
    shard_rows(job, begin, end);
    return;
  }
  const int64_t c = job.num_classes;
  const bool want_grad = job.mode != kCmForward;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row_id = job.n0 + i;
    A* row = job.s + i * c;
    const int64_t y = job.labels[row_id];
    const bool valid = y != job.ignore_index;
    if (!valid) {
      if (job.mode != kCmBackward) {
        job.loss[row_id] = A(0);
        job.shift[row_id] = job.log_sum[row_id] = A(0);
      }
    } else {
      cm_to_cosines(row, job.inv_wn, c);
      if (job.mode == kCmFused && job.g[row_id] != A(0)) {
        const CmRowOut<A> out = cm_row_fused(job.cfg, row, job.inv_wn, c, y, job.x_norm[row_id], job.g[row_id]);
        job.loss[row_id] = out.loss;
        job.shift[row_id] = out.shift;
        job.log_sum[row_id] = out.log_sum;
        job.radial[i] = out.radial;
        continue;
      }
      if (job.mode != kCmBackward) {
        const CmRowOut<A> out = cm_row_forward(job.cfg, row, c, y, job.x_norm[row_id]);
        job.loss[row_id] = out.loss;
        job.shift[row_id] = out.shift;
        job.log_sum[row_id] = out.log_sum;
      }
    }
    if (!want_grad) continue;
    const A gi = job.g[row_id];
    if (!valid || gi == A(0)) {
      std::fill(row, row + c, A(0));
      job.radial[i] = A(0);
    } else {
      job.radial[i] = cm_row_grad(job.cfg, row, job.inv_wn, c, y, job.x_norm[row_id], job.shift[row_id],
                                  job.log_sum[row_id], gi);
    }
  }
}

void epilogue_rows(const CmRowJob<double>& job, int64_t begin, int64_t end) { epilogue_rows_impl(job, begin, end); }

// float32 is the fast path: cloned for AVX2+FMA (x86-64-v3) with a runtime pick, so the
// vectorised sweeps of cm_row.h run 8 wide where the CPU allows and the build stays portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("default", "arch=x86-64-v3")))
#endif
void epilogue_rows(const CmRowJob<float>& job, int64_t begin, int64_t end) {
  epilogue_rows_impl(job, begin, end);
}

struct CpuEpilogue {
  template <typename A>
  void operator()(const CmRowJob<A>& job, int64_t rows) const {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(job.num_classes, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { epilogue_rows(job, begin, end); });
  }
};

using CpuOps = CmOps<CpuEpilogue>;

}  // namespace

TORCH_LIBRARY_IMPL(idid_kernels, CPU, m) {
  m.impl("cm_margin_forward", &CpuOps::forward);
  m.impl("cm_margin_backward", &CpuOps::backward);
  m.impl("cm_margin_fused", &CpuOps::fused);
  m.impl("cm_margin_shard_forward", &CpuOps::shard_forward);
  m.impl("cm_margin_shard_backward", &CpuOps::shard_backward);
}

}  // namespace idid_kernels
