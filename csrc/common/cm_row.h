// Row epilogues of the contraction-mapped margin softmax (spec/cm_margin.md), shared by the CPU
// driver (csrc/cpu/cm_margin.cpp) and written so a CUDA row kernel can reuse the scalar pieces.
//
// A row n arrives as its C dots <u_n, w_j> (the GEMM of the unit row u_n with the raw class rows)
// and becomes its cosines c_j = <u_n, w_j> / ||w_j|| (scaled by the inverse class norms) in the
// first sweep. With a = s g(r_n) > 0, psi_j = c_j off
// target and phi(c_y) on target, z_j = a psi_j:
//   shift   m = max_j psi_j (in cosine units: max_j z_j = a m, as a > 0)
//   forward t = a (m - psi_y) >= 0,  P = sum_{j != y} exp(a (c_j - m)),
//           log_sum = log sum_j exp(z_j - a m) = log(P + exp(-t)),  loss = t + log_sum
//   gradient p_j = exp(a (c_j - m) - log_sum),  G_j = a g_n (p_j - [j = y]) psi'_j,
//           R = g_n (sum_j p_j psi_j - psi_y)
// Two choices keep this exact where the textbook lse - z_y is not:
// - The exponents are a (c_j - m), a product after a subtraction. a c_j - a m loses all digits
//   once s is large (at s = 1e12 the rounding of a c_j alone is ~3e4), and a compiler may fuse it
//   into an FMA that subtracts a rounded max from an exact product: exp(+-3e4).
// - loss = log1p(P) when the target is the row's max (t = 0): lse - z_y cancels to 0 in float32
//   for losses below ~6e-8 and loses most digits below ~1e-5. Otherwise P >= 1 (it holds the
//   max's exp(0)) and t + log(P + exp(-t)) has no cancellation.
// The forward saves (m, log_sum) per row for the backward.
// The gradient epilogues overwrite the row with G'_j = G_j / ||w_j||, the left operand of both
// backward GEMMs (dU = G' W, dW += G'^T U). The target column is handled outside the loops, which
// split at y so each loop is a plain vectorisable sweep.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "contraction.h"
#include "fast_exp.h"
#include "margins.h"

namespace idid_kernels {

template <typename A>
struct CmConfig {
  Margin<A> margin;
  A s;
  bool contraction;  // a = s * sigmoid((r - offset) / T); false: a = s
  A offset, inv_temperature;
  bool detach_norm;  // no radial gradient through a
};

// What a chunk's row epilogue does: forward statistics only, gradient from saved statistics and
// an upstream gradient per row, or both at once with per-row weights known up front.
// The shard modes serve class-parallel training: the chunk holds the classes
// [class_offset, class_offset + C) of a larger head, a row's target may lie in another shard, and
// the epilogue leaves per-row partial statistics that sum (or logsumexp) across shards.
enum CmMode : int { kCmForward = 0, kCmBackward = 1, kCmFused = 2, kCmShardForward = 3, kCmShardBackward = 4 };

// One chunk's work description, plain pointers only (host memory on the CPU, device memory on
// the GPU). Rows [0, rows) of `s` are global rows n0 + i.
template <typename A>
struct CmRowJob {
  CmConfig<A> cfg;
  A* s;  // (rows x C): dots <u_n, w_j> of unit rows in; G' out in the gradient modes
  const A* inv_wn;
  const A* x_norm;
  const int64_t* labels;
  const A* g;  // per-row weight (fused) or upstream gradient (backward); null in forward
  A* loss;     // per-row loss (forward, fused)
  A* shift;    // (N,) the row's max m in cosine units: written in forward/fused, read in backward
  A* log_sum;  // (N,) log sum_j exp(z_j - a m): likewise
  A* lse;      // shard modes: the partial max of z (forward), the global lse (backward)
  A* radial;   // (rows,) radial coefficient of dx (gradient modes)
  A* sum_exp;  // shard forward: (N,) sum_{j != y} exp(z_j - max), the max going to lse
  A* target;   // shard forward: (N,) z_y where y is in the shard, else 0
  int64_t n0, num_classes, ignore_index;
  int64_t class_offset;  // shard modes: global class of local column 0
  int mode;
};

// a_n and d a_n / d r_n.
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A cm_scale(const CmConfig<A>& cfg, A r) {
  return cfg.contraction ? cfg.s * contraction(r, cfg.offset, cfg.inv_temperature) : cfg.s;
}
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A cm_scale_grad(const CmConfig<A>& cfg, A r) {
  return (cfg.contraction && !cfg.detach_norm) ? cfg.s * contraction_grad(r, cfg.offset, cfg.inv_temperature) : A(0);
}

// What the gradient epilogue leaves besides the G' row: the radial coefficient of dx_n,
// s g'(r_n) R_n (the row's gradient is coef * u_n + the projected G' W term).
template <typename A>
struct CmRowOut {
  A loss;
  A shift;
  A log_sum;
  A radial;
};

// log_sum = log(P + exp(-t)) for t = a (m - psi_y) >= 0 and the off-target sum P (see the top):
// log1p(P) when the target is the max, where P may be far below the unit roundoff.
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A cm_log_sum(A t, A off) {
  using std::exp;
  using std::log;
  using std::log1p;
  return t > A(0) ? log(off + exp(-t)) : log1p(off);
}

// Dots <u_n, w_j> to cosines, in place.
template <typename A>
IDK_FORCE_INLINE void cm_to_cosines(A* row, const A* inv_wn, int64_t num_classes) {
#pragma omp simd
  for (int64_t j = 0; j < num_classes; ++j) row[j] = row[j] * inv_wn[j];
}

// max(m, max_{lo <= j < hi} c_j); a NaN start stays NaN.
template <typename A>
IDK_FORCE_INLINE A cm_max(const A* row, int64_t lo, int64_t hi, A m) {
#pragma omp simd reduction(max : m)
  for (int64_t j = lo; j < hi; ++j) m = row[j] > m ? row[j] : m;
  return m;
}

// Dots <u_n, w_j> to cosines in place over [lo, hi), returning max(m, those cosines) (a NaN start
// stays NaN): the conversion and the max in one sweep. The cosine is rounded to A before it enters
// the max, and the sweeps after it read the stored (rounded) value.
template <typename A>
IDK_FORCE_INLINE A cm_cosines_max(A* row, const A* inv_wn, int64_t lo, int64_t hi, A m) {
#pragma omp simd reduction(max : m)
  for (int64_t j = lo; j < hi; ++j) {
    const A c = row[j] * inv_wn[j];
    row[j] = c;
    m = c > m ? c : m;
  }
  return m;
}

// A row of dots to cosines in place, with its margined target psi_y (and psi'_y into dphi, when
// not null) and the shift m = max(psi_y, max_{j != y} c_j).
template <typename A>
IDK_FORCE_INLINE A cm_row_shift(const CmConfig<A>& cfg, A* row, const A* inv_wn, int64_t num_classes, int64_t y,
                                int64_t row_id, A& psi_y, A* dphi) {
  row[y] = row[y] * inv_wn[y];
  psi_y = target_phi(row[y], cfg.margin, row_id, dphi);
  // The shift is the exact max of the margined row: the target's plain cosine must not enter it
  // (SphereFace's psi can sit far below c, and a too-large shift underflows every term).
  return cm_cosines_max(row, inv_wn, y + 1, num_classes, cm_cosines_max(row, inv_wn, 0, y, psi_y));
}

// sum + sum_j exp(a (c_j - shift)).
template <typename A>
IDK_FORCE_INLINE A cm_sum_exp(const A* row, int64_t lo, int64_t hi, A a, A shift, A sum) {
#pragma omp simd reduction(+ : sum)
  for (int64_t j = lo; j < hi; ++j) sum += exp_approx(a * (row[j] - shift));
  return sum;
}

// e_j = exp(a (c_j - shift)) stored over the cosines; accumulates sum e_j and sum e_j c_j.
template <typename A>
IDK_FORCE_INLINE void cm_store_exp(A* row, int64_t lo, int64_t hi, A a, A shift, A& sum_e, A& sum_ec) {
  A se = sum_e, sec = sum_ec;
#pragma omp simd reduction(+ : se, sec)
  for (int64_t j = lo; j < hi; ++j) {
    const A c = row[j];
    const A e = exp_approx(a * (c - shift));
    se += e;
    sec += e * c;
    row[j] = e;
  }
  sum_e = se;
  sum_ec = sec;
}

// row[j] <- factor * row[j] / ||w_j||.
template <typename A>
IDK_FORCE_INLINE void cm_scale_by_inv_wn(A* row, const A* inv_wn, int64_t lo, int64_t hi, A factor) {
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) row[j] = factor * row[j] * inv_wn[j];
}

// Off-target gradient sweep over cosines with the row's shift and log_sum known:
// row[j] <- a g p_j / ||w_j||, p_j = exp(a (c_j - shift) - log_sum); accumulates sum_j p_j and
// sum_j p_j c_j over the sweep.
template <typename A>
IDK_FORCE_INLINE void cm_prob_grad(A* row, const A* inv_wn, int64_t lo, int64_t hi, A a, A shift, A log_sum, A ag,
                                   A& sum_p, A& sum_pc) {
  A sp = sum_p, spc = sum_pc;
#pragma omp simd reduction(+ : sp, spc)
  for (int64_t j = lo; j < hi; ++j) {
    const A c = row[j];
    const A p = exp_approx(a * (c - shift) - log_sum);
    sp += p;
    spc += p * c;
    row[j] = ag * p * inv_wn[j];
  }
  sum_p = sp;
  sum_pc = spc;
}

// Forward of one row of dots (left as its cosines); y is a valid class.
template <typename A>
IDK_FORCE_INLINE CmRowOut<A> cm_row_forward(const CmConfig<A>& cfg, A* row, const A* inv_wn, int64_t num_classes,
                                            int64_t y, int64_t row_id, A r) {
  const A a = cm_scale(cfg, r);
  A psi_y;
  const A m = cm_row_shift(cfg, row, inv_wn, num_classes, y, row_id, psi_y, static_cast<A*>(nullptr));
  const A off = cm_sum_exp(row, y + 1, num_classes, a, m, cm_sum_exp(row, 0, y, a, m, A(0)));
  const A t = a * (m - psi_y);
  const A log_sum = cm_log_sum(t, off);
  return {t + log_sum, m, log_sum, A(0)};
}

// Gradient of one row of cosines given its saved shift and log_sum and upstream weight g: the row
// becomes G'. Returns the radial coefficient s g'(r) R of dx_n.
template <typename A>
IDK_FORCE_INLINE A cm_row_grad(const CmConfig<A>& cfg, A* row, const A* inv_wn, int64_t num_classes, int64_t y,
                               int64_t row_id, A r, A shift, A log_sum, A g) {
  const A a = cm_scale(cfg, r);
  A dphi;
  const A psi_y = target_phi(row[y], cfg.margin, row_id, &dphi);
  const A ag = a * g;
  A sum_p = A(0), sum_pc = A(0);
  cm_prob_grad(row, inv_wn, 0, y, a, shift, log_sum, ag, sum_p, sum_pc);
  cm_prob_grad(row, inv_wn, y + 1, num_classes, a, shift, log_sum, ag, sum_p, sum_pc);
  // p_y - 1 = -sum_{j != y} p_j: the off-target mass is accurate where p_y rounds to 1.
  row[y] = -ag * sum_p * dphi * inv_wn[y];
  return cm_scale_grad(cfg, r) * g * (sum_pc - sum_p * psi_y);
}

// Forward and gradient of one row of dots in a single visit, for a row weight g known in advance:
// one exponential per class (the forward's e_j = exp(a (c_j - m)) become p_j = e_j / sum). The row
// becomes G'; returns loss, shift, log_sum and the radial coefficient.
template <typename A>
IDK_FORCE_INLINE CmRowOut<A> cm_row_fused(const CmConfig<A>& cfg, A* row, const A* inv_wn, int64_t num_classes,
                                          int64_t y, int64_t row_id, A r, A g) {
  using std::exp;
  const A a = cm_scale(cfg, r);
  A dphi, psi_y;
  const A m = cm_row_shift(cfg, row, inv_wn, num_classes, y, row_id, psi_y, &dphi);
  A sum_off = A(0), sum_ec = A(0);
  cm_store_exp(row, 0, y, a, m, sum_off, sum_ec);
  cm_store_exp(row, y + 1, num_classes, a, m, sum_off, sum_ec);
  const A t = a * (m - psi_y);
  const A log_sum = cm_log_sum(t, sum_off);
  const A inv_sum = A(1) / (sum_off + exp(-t));
  const A ag = a * g;
  cm_scale_by_inv_wn(row, inv_wn, 0, y, ag * inv_sum);
  cm_scale_by_inv_wn(row, inv_wn, y + 1, num_classes, ag * inv_sum);
  const A p_off = sum_off * inv_sum;  // 1 - p_y, accurate where p_y rounds to 1
  row[y] = -ag * p_off * dphi * inv_wn[y];
  const A radial = cm_scale_grad(cfg, r) * g * (sum_ec * inv_sum - p_off * psi_y);
  return {t + log_sum, m, log_sum, radial};
}

// ---- class shards ------------------------------------------------------------------------------
// A row's local target is y in [0, C) when its class lies in the shard, else -1.

template <typename A>
struct CmShardOut {
  A max, sum_exp, target;
};

// Partial statistics of one row of cosines over the shard's classes (row left unchanged): the max
// of z (the target's margined logit included), sum_{j != y} exp(z_j - max) over the shard's other
// classes (the target left out, so that the loss needs no lse - z_y difference), and z_y (0
// without a local target). Across shards, with M = max_k max_k, P = sum_k sum_exp_k exp(max_k - M)
// and t = M - z_y: lse = M + log(P + exp(-t)) and loss = t + log(P + exp(-t)), log1p(P) when t = 0
// (idid_kernels/class_parallel.py). The max is taken in cosine units (max z = a max psi) and the
// exponents as a (psi_j - max psi), as in the single-device forward.
template <typename A>
IDK_FORCE_INLINE CmShardOut<A> cm_row_shard_forward(const CmConfig<A>& cfg, const A* row, int64_t num_classes,
                                                    int64_t y, int64_t row_id, A r) {
  using std::exp;
  const A a = cm_scale(cfg, r);
  if (y < 0) {
    const A m = cm_max(row, 0, num_classes, -std::numeric_limits<A>::infinity());
    return {a * m, cm_sum_exp(row, 0, num_classes, a, m, A(0)), A(0)};
  }
  const A psi_y = target_phi(row[y], cfg.margin, row_id, static_cast<A*>(nullptr));
  const A m = cm_max(row, y + 1, num_classes, cm_max(row, 0, y, psi_y));
  const A off = cm_sum_exp(row, y + 1, num_classes, a, m, cm_sum_exp(row, 0, y, a, m, A(0)));
  return {a * m, off, a * psi_y};
}

// Off-target sweep given the global lse in logit units (shards): p_j = exp(a c_j - lse).
template <typename A>
IDK_FORCE_INLINE void cm_prob_grad_lse(A* row, const A* inv_wn, int64_t lo, int64_t hi, A a, A lse, A ag, A& sum_p,
                                       A& sum_pc) {
  A sp = sum_p, spc = sum_pc;
#pragma omp simd reduction(+ : sp, spc)
  for (int64_t j = lo; j < hi; ++j) {
    const A c = row[j];
    const A p = exp_approx(a * c - lse);
    sp += p;
    spc += p * c;
    row[j] = ag * p * inv_wn[j];
  }
  sum_p = sp;
  sum_pc = spc;
}

// Gradient of one row of the shard given the row's global lse and upstream weight g: the row
// becomes G' and the return value is the shard's part of the radial coefficient s g'(r) R.
// p_y - 1 = expm1(z_y - lse): the other shards' mass is not visible here.
template <typename A>
IDK_FORCE_INLINE A cm_row_shard_grad(const CmConfig<A>& cfg, A* row, const A* inv_wn, int64_t num_classes, int64_t y,
                                     int64_t row_id, A r, A lse, A g) {
  using std::expm1;
  const A a = cm_scale(cfg, r);
  const A ag = a * g;
  A sum_p = A(0), sum_pc = A(0);
  if (y < 0) {
    cm_prob_grad_lse(row, inv_wn, 0, num_classes, a, lse, ag, sum_p, sum_pc);
    return cm_scale_grad(cfg, r) * g * sum_pc;
  }
  A dphi;
  const A psi_y = target_phi(row[y], cfg.margin, row_id, &dphi);
  cm_prob_grad_lse(row, inv_wn, 0, y, a, lse, ag, sum_p, sum_pc);
  cm_prob_grad_lse(row, inv_wn, y + 1, num_classes, a, lse, ag, sum_p, sum_pc);
  const A py_minus_1 = expm1(a * psi_y - lse);
  row[y] = ag * py_minus_1 * dphi * inv_wn[y];
  return cm_scale_grad(cfg, r) * g * (sum_pc + py_minus_1 * psi_y);
}

}  // namespace idid_kernels
