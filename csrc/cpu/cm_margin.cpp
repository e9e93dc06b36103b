// CPU row epilogue of the cm_margin ops; the chunked GEMM driver is csrc/driver/cm_margin_driver.h
// and the per-row math csrc/common/cm_row.h. Rows of a chunk run in parallel (at::parallel_for);
// each row's sweeps over the C classes are vectorised.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "../driver/cm_margin_driver.h"
#include "fp_env.h"

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
      const CmShardOut<A> out = cm_row_shard_forward(job.cfg, row, c, y_local, row_id, job.x_norm[row_id]);
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
        cm_row_shard_grad(job.cfg, row, job.inv_wn, c, y_local, row_id, job.x_norm[row_id], job.lse[row_id], gi);
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
    } else if (job.mode == kCmFused && job.g[row_id] != A(0)) {
      const CmRowOut<A> out =
          cm_row_fused(job.cfg, row, job.inv_wn, c, y, row_id, job.x_norm[row_id], job.g[row_id]);
      job.loss[row_id] = out.loss;
      job.shift[row_id] = out.shift;
      job.log_sum[row_id] = out.log_sum;
      job.radial[i] = out.radial;
      continue;
    } else if (job.mode != kCmBackward) {
      const CmRowOut<A> out = cm_row_forward(job.cfg, row, job.inv_wn, c, y, row_id, job.x_norm[row_id]);
      job.loss[row_id] = out.loss;
      job.shift[row_id] = out.shift;
      job.log_sum[row_id] = out.log_sum;
    } else {
      cm_to_cosines(row, job.inv_wn, c);
    }
    if (!want_grad) continue;
    const A gi = job.g[row_id];
    if (!valid || gi == A(0)) {
      std::fill(row, row + c, A(0));
      job.radial[i] = A(0);
    } else {
      job.radial[i] = cm_row_grad(job.cfg, row, job.inv_wn, c, y, row_id, job.x_norm[row_id], job.shift[row_id],
                                  job.log_sum[row_id], gi);
    }
  }
}

void epilogue_rows(const CmRowJob<double>& job, int64_t begin, int64_t end) { epilogue_rows_impl(job, begin, end); }

// float32 is the fast path: cloned for AVX2+FMA (x86-64-v3) and AVX-512 (x86-64-v4) with a runtime
// pick, so the vectorised sweeps of cm_row.h run 8 or 16 wide where the CPU allows and the build
// stays portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#endif
void epilogue_rows(const CmRowJob<float>& job, int64_t begin, int64_t end) {
  epilogue_rows_impl(job, begin, end);
}

// ---- forward only: class tiles ----------------------------------------------------------------
// The forward needs per row only its max m (cosine units), the off-target sum P = sum_{j != y}
// exp(a (c_j - m)) and the target's psi_y, so it never holds a row of all C classes: it runs the
// GEMM over tiles of (up to 1024 rows) x (classes), each tile small enough for the last-level
// cache, and folds every tile into running statistics, P <- P exp(a (m_old - m_new)) + the tile's
// sum at m_new. A row-chunked forward would hold a chunk of the budget's size and pack W for BLAS
// once per chunk of rows (16 times for 1024 rows of C = 1M at 256 MiB); here W is packed once, each
// GEMM has M = 1024, and the tile stays in cache.
// The result is cm_row_forward's up to rounding (same shift, same log_sum formula).

template <typename A>
struct TileJob {
  CmConfig<A> cfg;
  A* s;  // (rows x ct) dots of the tile, row stride ld
  int64_t ld, n0, c0, ct, ignore_index;
  const A* inv_wn;  // all classes
  const A* x_norm;
  const int64_t* labels;
  A* m;    // (N,) running max of psi in cosine units (-inf before the first tile)
  A* p;    // (N,) running off-target sum relative to m
  A* psi;  // (N,) the target's psi_y (written by the tile holding y)
};

template <typename A>
IDK_FORCE_INLINE void tile_rows_impl(const TileJob<A>& job, int64_t begin, int64_t end) {
  using std::exp;
  const int64_t ct = job.ct;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row_id = job.n0 + i;
    const int64_t y = job.labels[row_id];
    if (y == job.ignore_index) continue;
    A* row = job.s + i * job.ld;
    const A* inv = job.inv_wn + job.c0;
    const A a = cm_scale(job.cfg, job.x_norm[row_id]);
    const int64_t yl = y - job.c0;
    const bool here = yl >= 0 && yl < ct;
    A mt;
    if (here) {
      A psi_y;
      mt = cm_row_shift(job.cfg, row, inv, ct, yl, row_id, psi_y, static_cast<A*>(nullptr));
      job.psi[row_id] = psi_y;
    } else {
      mt = cm_cosines_max(row, inv, 0, ct, -std::numeric_limits<A>::infinity());
    }
    const A m_old = job.m[row_id];
    // NaN stays: a NaN running max (from a NaN psi_y) is kept, as cm_max keeps a NaN start.
    const A m_new = (m_old != m_old || !(mt > m_old)) ? m_old : mt;
    const A off = here ? cm_sum_exp(row, yl + 1, ct, a, m_new, cm_sum_exp(row, 0, yl, a, m_new, A(0)))
                       : cm_sum_exp(row, 0, ct, a, m_new, A(0));
    const A rescale = m_old == -std::numeric_limits<A>::infinity() ? A(0) : exp(a * (m_old - m_new));
    job.p[row_id] = job.p[row_id] * rescale + off;
    job.m[row_id] = m_new;
  }
}

void tile_rows(const TileJob<double>& job, int64_t begin, int64_t end) { tile_rows_impl(job, begin, end); }
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#endif
void tile_rows(const TileJob<float>& job, int64_t begin, int64_t end) {
  tile_rows_impl(job, begin, end);
}

// Rows and classes of one forward tile: up to 1024 rows (full-rate GEMMs), classes so that the
// tile holds at most 2^19 values (2 MiB of float32: each thread's half within a 1 MiB L2, so the
// GEMM's output is still in cache when the epilogue reads it) and never more than the chunk budget's
// buffer (chunk_rows x C values); at least 16 classes. At N=1024 d=256 C=50000 on two cores, 2^19
// against 2^21 values: 0.85 -> 1.00 of the bare GEMM's time (which writes all N x C logits out).
inline std::pair<int64_t, int64_t> forward_tile(int64_t n, int64_t c, int64_t chunk_rows) {
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(n, 1024));
  const int64_t budget = std::max<int64_t>(1, chunk_rows) * c;
  const int64_t cols = std::min<int64_t>(int64_t(1) << 19, budget) / rows;
  return {rows, std::min(c, std::max<int64_t>(16, cols))};
}

template <typename A>
void tiled_forward(const at::Tensor& xa, const at::Tensor& wa, const at::Tensor& labels, const CmConfig<A>& cfg,
                   int64_t ignore_index, int64_t chunk_rows, const HalfGemm& gemm, CmOutputs& o) {
  const int64_t n = xa.size(0), c = wa.size(0);
  const auto [rows_t, cols_t] = forward_tile(n, c, chunk_rows);
  const at::Tensor inv_xn = o.x_norm.clamp_min(kNormEps).reciprocal();
  const at::Tensor inv_wn = o.w_norm.clamp_min(kNormEps).reciprocal();
  const cpu::ScratchLease lease(rows_t * cols_t, xa.options());
  const at::Tensor& buffer = lease.tensor();
  at::Tensor m = at::full({n}, -std::numeric_limits<A>::infinity(), xa.options());
  at::Tensor p = at::zeros({n}, xa.options());
  at::Tensor psi = at::zeros({n}, xa.options());
  TileJob<A> job{cfg,
                 nullptr,
                 0,
                 0,
                 0,
                 0,
                 ignore_index,
                 inv_wn.const_data_ptr<A>(),
                 o.x_norm.const_data_ptr<A>(),
                 labels.const_data_ptr<int64_t>(),
                 m.mutable_data_ptr<A>(),
                 p.mutable_data_ptr<A>(),
                 psi.mutable_data_ptr<A>()};
  for (int64_t n0 = 0; n0 < n; n0 += rows_t) {
    const int64_t rows = std::min(rows_t, n - n0);
    const at::Tensor u_op = gemm.operand_of(cm_unit_rows(xa.narrow(0, n0, rows), inv_xn.narrow(0, n0, rows)));
    for (int64_t c0 = 0; c0 < c; c0 += cols_t) {
      const int64_t ct = std::min(cols_t, c - c0);
      at::Tensor s = buffer.narrow(0, 0, rows * ct).view({rows, ct});
      gemm.mm_out(s, u_op, wa.narrow(0, c0, ct).t());
      job.s = s.mutable_data_ptr<A>();
      job.ld = ct;
      job.n0 = n0;
      job.c0 = c0;
      job.ct = ct;
      const int64_t grain = std::max<int64_t>(1, 16384 / ct);
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { tile_rows(job, begin, end); });
    }
  }
  // loss = t + log(P + exp(-t)), t = a (m - psi_y): cm_row_forward's formula on the folded sums.
  const A* mp = job.m;
  const A* pp = job.p;
  const A* sp = job.psi;
  const A* xn = job.x_norm;
  const int64_t* lp = job.labels;
  A* loss = o.loss_rows.mutable_data_ptr<A>();
  A* shift = o.stats.mutable_data_ptr<A>();
  A* log_sum = shift + n;
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (lp[i] == ignore_index) {
        loss[i] = shift[i] = log_sum[i] = A(0);
        continue;
      }
      const A t = cm_scale(cfg, xn[i]) * (mp[i] - sp[i]);
      const A ls = cm_log_sum(t, pp[i]);
      loss[i] = t + ls;
      shift[i] = mp[i];
      log_sum[i] = ls;
    }
  });
}

struct CpuEpilogue {
  template <typename A>
  void operator()(const CmRowJob<A>& job, int64_t rows) const {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(job.num_classes, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      const cpu::FlushSubnormals no_subnormals;  // G feeds the backward GEMMs (fp_env.h)
      epilogue_rows(job, begin, end);
    });
  }
  // The forward-only mode (cm_drive's hook): class tiles instead of row chunks.
  template <typename A>
  void tiled_forward(const at::Tensor& xa, const at::Tensor& wa, const at::Tensor& labels, const CmConfig<A>& cfg,
                     int64_t ignore_index, int64_t chunk, const HalfGemm& gemm, CmOutputs& o) const {
    idid_kernels::tiled_forward<A>(xa, wa, labels, cfg, ignore_index, chunk, gemm, o);
  }
};

using CpuOps = CmOps<CpuEpilogue>;

}  // namespace

TORCH_LIBRARY_IMPL(idid_kernels, CPU, m) {
  m.impl("cm_margin_forward", &CpuOps::forward);
  m.impl("cm_margin_backward", &CpuOps::backward);
  m.impl("cm_margin_fused", &CpuOps::fused);
  m.impl("cm_margin_forward_grad", &CpuOps::forward_grad);
  m.impl("cm_margin_rows_dweight", &cm_rows_dweight);
  m.impl("cm_margin_shard_forward", &CpuOps::shard_forward);
  m.impl("cm_margin_shard_backward", &CpuOps::shard_backward);
}

}  // namespace idid_kernels
