// Vectorised row loops (declarations and contracts in vec_math.h).
//
// Every loop is a plain counted loop over contiguous arrays with `#pragma omp simd` so that the
// compiler vectorises it, including the reductions (their summation order is fixed by the code,
// so results are bitwise reproducible run to run). The float versions are cloned per ISA with
// target_clones; the build passes -fno-trapping-math, without which GCC will not if-convert the
// clamps of exp_approx (common/fast_exp.h) and leaves the loops scalar.
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/fast_exp.h"
#include "../common/idid_math.h"
#include "../common/macros.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__) && \
    !defined(IDID_KERNELS_NO_CLONES)
#define IDK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IDK_CPU_CLONES
#endif

namespace idid_kernels {
namespace cpu {
namespace {


template <typename A>
IDK_FORCE_INLINE A max_impl(const A* __restrict x, int64_t n) {
  A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

template <typename A>
IDK_FORCE_INLINE A sum_exp_impl(const A* __restrict x, int64_t n, A scale, A shift) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_approx(x[i] * scale - shift);
  return s;
}

template <typename A>
IDK_FORCE_INLINE void exp_impl(const A* x, A* y, int64_t n, A scale, A shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = exp_approx(x[i] * scale - shift);
}

// y[i] = exp(x[i] - shift), returning their sum.
template <typename A>
IDK_FORCE_INLINE A store_exp_impl(const A* __restrict x, A* __restrict y, int64_t n, A shift) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const A e = exp_approx(x[i] - shift);
    y[i] = e;
    s += e;
  }
  return s;
}

// One teacher row, k the diagonal: the max and the exps over c != k once, then log r = phi - lse
// and r = e / sum (one exp per element).
template <typename A>
IDK_FORCE_INLINE void teacher_row_impl(A* __restrict lr, A* __restrict r, int64_t n, int64_t k) {
  using std::log;
  const A m = std::max(max_impl(lr, k), max_impl(lr + k + 1, n - k - 1));
  const A sum = store_exp_impl(lr, r, k, m) + store_exp_impl(lr + k + 1, r + k + 1, n - k - 1, m);
  const A lse = m + log(sum), inv = A(1) / sum;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    lr[i] -= lse;
    r[i] *= inv;
  }
  lr[k] = 0;
  r[k] = 0;
}

template <typename A>
IDK_FORCE_INLINE A sum_kappa_impl(const A* __restrict g, int64_t n, A t) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_approx(diversity_exponent(g[i], t));
  return s;
}

template <typename A>
IDK_FORCE_INLINE void kappa_impl(A* __restrict g, int64_t n, A t) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = exp_approx(diversity_exponent(g[i], t));
}

template <typename A>
IDK_FORCE_INLINE A dot_impl(const A* __restrict a, const A* __restrict b, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename A>
IDK_FORCE_INLINE void scale_impl(const A* __restrict x, A scale, A* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale;
}

template <typename A>
IDK_FORCE_INLINE void project_impl(const A* __restrict g, const A* __restrict u, A radial, A inv, A* __restrict o,
                                   int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = (g[i] - radial * u[i]) * inv;
}

template <typename A>
IDK_FORCE_INLINE A kl_sum_impl(const A* __restrict r, const A* __restrict log_r, const A* __restrict x, int64_t n,
                               A inv_tau) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += kd_summand(r[i], log_r[i], x[i] * inv_tau);
  return s;
}

// With tau = 1, p_c = q_c exp(lse_nt - lse) and exp(lse_nt - lse) <= 1: one exp per element, and
// where q underflows p (smaller still) would have too, so nothing is lost.
template <bool kUnitTau, typename A>
IDK_FORCE_INLINE void ic_grad_distill_impl(A* __restrict z, const A* __restrict r, const A* __restrict log_r,
                                           A* __restrict dphi, int64_t n, const IcRow<A>& row) {
  const A lse = row.lse, lse_nt = row.lse_nt, inv_tau = row.inv_tau, g_scale = row.g_scale, a = row.a,
          shift = row.phi_shift, p_over_q = row.p_over_q;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A zi = z[i];
    const A zt = kUnitTau ? zi : zi * inv_tau;
    const A q = exp_approx(zt - lse_nt);
    const A p = kUnitTau ? q * p_over_q : exp_approx(zi - lse);
    dphi[i] += teacher_grad_term(r[i], log_r[i], zt, a, shift);
    z[i] = g_scale * ic_logit_grad(p, q, r[i], inv_tau);
  }
}

template <typename A>
IDK_FORCE_INLINE void ic_grad_plain_impl(A* __restrict z, int64_t n, A lse, A g_scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) z[i] = g_scale * exp_approx(z[i] - lse);
}

}  // namespace

IDK_CPU_CLONES float vmax(const float* x, int64_t n) { return max_impl(x, n); }
double vmax(const double* x, int64_t n) { return max_impl(x, n); }

IDK_CPU_CLONES float vsum_exp(const float* x, int64_t n, float scale, float shift) {
  return sum_exp_impl(x, n, scale, shift);
}
double vsum_exp(const double* x, int64_t n, double scale, double shift) { return sum_exp_impl(x, n, scale, shift); }

IDK_CPU_CLONES void vexp(const float* x, float* y, int64_t n, float scale, float shift) {
  exp_impl(x, y, n, scale, shift);
}
void vexp(const double* x, double* y, int64_t n, double scale, double shift) { exp_impl(x, y, n, scale, shift); }

IDK_CPU_CLONES void vteacher_row(float* log_r, float* r, int64_t n, int64_t k) { teacher_row_impl(log_r, r, n, k); }
void vteacher_row(double* log_r, double* r, int64_t n, int64_t k) { teacher_row_impl(log_r, r, n, k); }

IDK_CPU_CLONES float vsum_kappa(const float* g, int64_t n, float t) { return sum_kappa_impl(g, n, t); }
double vsum_kappa(const double* g, int64_t n, double t) { return sum_kappa_impl(g, n, t); }

IDK_CPU_CLONES void vkappa(float* g, int64_t n, float t) { kappa_impl(g, n, t); }
void vkappa(double* g, int64_t n, double t) { kappa_impl(g, n, t); }

IDK_CPU_CLONES float vdot(const float* a, const float* b, int64_t n) { return dot_impl(a, b, n); }
double vdot(const double* a, const double* b, int64_t n) { return dot_impl(a, b, n); }

IDK_CPU_CLONES void vscale(const float* x, float scale, float* y, int64_t n) { scale_impl(x, scale, y, n); }
void vscale(const double* x, double scale, double* y, int64_t n) { scale_impl(x, scale, y, n); }

IDK_CPU_CLONES void vproject(const float* g, const float* u, float radial, float inv, float* o, int64_t n) {
  project_impl(g, u, radial, inv, o, n);
}
void vproject(const double* g, const double* u, double radial, double inv, double* o, int64_t n) {
  project_impl(g, u, radial, inv, o, n);
}

IDK_CPU_CLONES float vkl_sum(const float* r, const float* log_r, const float* x, int64_t n, float inv_tau) {
  return kl_sum_impl(r, log_r, x, n, inv_tau);
}
double vkl_sum(const double* r, const double* log_r, const double* x, int64_t n, double inv_tau) {
  return kl_sum_impl(r, log_r, x, n, inv_tau);
}

IDK_CPU_CLONES void ic_grad_distill(float* z, const float* r, const float* log_r, float* dphi, int64_t n,
                                    const IcRow<float>& row) {
  if (row.unit_tau) {
    ic_grad_distill_impl<true>(z, r, log_r, dphi, n, row);
  } else {
    ic_grad_distill_impl<false>(z, r, log_r, dphi, n, row);
  }
}
void ic_grad_distill(double* z, const double* r, const double* log_r, double* dphi, int64_t n,
                     const IcRow<double>& row) {
  if (row.unit_tau) {
    ic_grad_distill_impl<true>(z, r, log_r, dphi, n, row);
  } else {
    ic_grad_distill_impl<false>(z, r, log_r, dphi, n, row);
  }
}

IDK_CPU_CLONES void ic_grad_plain(float* z, int64_t n, float lse, float g_scale) {
  ic_grad_plain_impl(z, n, lse, g_scale);
}
void ic_grad_plain(double* z, int64_t n, double lse, double g_scale) { ic_grad_plain_impl(z, n, lse, g_scale); }

}  // namespace cpu
}  // namespace idid_kernels
