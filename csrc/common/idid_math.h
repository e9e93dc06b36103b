// Per-element math of the IDID-R1 loss (spec/idid.md), shared by the CPU and CUDA kernels.
//
// Notation (one row i of the batch, label k = y_i, one class column c):
//   z_ic = alpha <u_i, v_c>                      logits
//   p_ic = exp(z_ic - lse_i)                     softmax over all classes
//   q_ic = exp(z_ic / tau - lse_nt_i), c != k    student: softmax of z / tau over the non-targets
//   r_kc, log r_kc                               teacher row of the label (r_kk = 0, stored log r_kk = 0)
//   kd_i = sum_{c != k} r_kc (log r_kc - log q_ic)
// The per-element exponentials (p, q, r, kappa) are left to the caller (a vectorised polynomial on
// the CPU, __expf on a GPU), so the per-element helpers here are plain arithmetic that vectorises;
// the per-row helpers (softplus, log_add_exp) use the standard math functions.
#pragma once

#include <cmath>

#include "macros.h"

namespace idid_kernels {

// softplus(v) = log(1 + exp(v)) without overflow, accurate for very negative v. The cross-entropy
// is ce_i = softplus(L_i - z_ik) with L_i = logsumexp_{c != k} z_ic: lse_i - z_ik would cancel
// catastrophically when the target dominates (ce ~ 1e-6 keeps no digits in float32).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A softplus(A v) {
  using std::exp;
  using std::log1p;
  return v > A(0) ? v + log1p(exp(-v)) : log1p(exp(v));
}

// log(exp(a) + exp(b)) without overflow: lse_i = log_add_exp(L_i, z_ik).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A log_add_exp(A a, A b) {
  return a > b ? a + softplus(b - a) : b + softplus(a - b);
}

// Exponent of the diversity kernel kappa_ij = exp(t (g_ij - 1)), g_ij = <u_i, u_j>.
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A diversity_exponent(A g, A t) {
  return t * (g - A(1));
}

// KL summand r_kc (log r_kc - z_ic / tau) of kd_i; with sum_c r_kc = 1,
// kd_i = sum_{c != k} kd_summand + lse_nt_i. Zero on the target column (r_kk = 0, log r_kk = 0).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A kd_summand(A r, A log_r, A z_over_tau) {
  return r * (log_r - z_over_tau);
}

// dL/dz_ic / a_i on a non-target column: p_ic + (q_ic - r_kc) / tau. On the target column it is
// p_ik - 1 = expm1(-ce_i) (accurate where p_ik rounds to 1).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A ic_logit_grad(A p, A q, A r, A inv_tau) {
  return p + (q - r) * inv_tau;
}

// Row i's contribution to dL/dPhi_kc: a_i r_kc (log r_kc - log q_ic - kd_i) with
// log q_ic = z_ic / tau - lse_nt_i, written as a_i r_kc ((log r_kc - z_ic / tau) + shift_i),
// shift_i = lse_nt_i - kd_i. Zero on the target column (r_kk = 0); exactly zero when C = 2
// (r = 1, log r = 0, kd = 0, lse_nt = z / tau).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A teacher_grad_term(A r, A log_r, A z_over_tau, A a, A shift) {
  return (a * r) * ((log_r - z_over_tau) + shift);
}

// Class-balanced sample weight a_i = 1 / (K_B n_{y_i}); 1 / B_valid without class balancing.
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A sample_weight(bool class_balanced, long long count, long long classes_present,
                                                 long long valid_rows) {
  return class_balanced ? A(1) / (A(classes_present) * A(count)) : A(1) / A(valid_rows);
}

// Coefficient of h_i = coef * sum_{j same class, j != i} kappa_ij u_j in dL_ID/du_i:
// 2 t / (K_2 n_c (n_c - 1)) (kappa is symmetric, so each ordered pair appears twice).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A diversity_grad_coef(A t, long long classes_with_pairs, long long count) {
  return A(2) * t / (A(classes_with_pairs) * A(count) * A(count - 1));
}

}  // namespace idid_kernels
