// Vectorised row loops of the CPU kernels (exp-sums, max, dots, the IDID-R1 logit-gradient row).
//
// The float versions are compiled twice (AVX2+FMA and the baseline ISA) and picked at load time
// (GCC/Clang target_clones on x86-64), so the extension runs on any x86-64 CPU and still gets
// 8-wide loops on the usual ones; exp is a branch-free polynomial (fast_exp) the compiler can
// vectorise, ~1 ulp in float32. The double versions use std::exp (float64 is for checking).
#pragma once

#include <cstdint>

namespace idid_kernels {
namespace cpu {

// max_i x[i]; -inf when n == 0.
float vmax(const float* x, int64_t n);
double vmax(const double* x, int64_t n);

// sum_i exp(x[i] * scale - shift).
float vsum_exp(const float* x, int64_t n, float scale, float shift);
double vsum_exp(const double* x, int64_t n, double scale, double shift);

// y[i] = exp(x[i] * scale - shift); y may alias x.
void vexp(const float* x, float* y, int64_t n, float scale, float shift);
void vexp(const double* x, double* y, int64_t n, double scale, double shift);

// A teacher row from its Phi row (in log_r, diagonal k): log_r[c] = Phi_c - logsumexp_{c' != k}
// Phi_c' and r[c] = exp(log_r[c]) (formed as e_c / sum e), both 0 at c = k.
void vteacher_row(float* log_r, float* r, int64_t n, int64_t k);
void vteacher_row(double* log_r, double* r, int64_t n, int64_t k);

// sum_i kappa(g[i]) and g[i] <- kappa(g[i]) for the diversity kernel kappa(g) = exp(t (g - 1)).
float vsum_kappa(const float* g, int64_t n, float t);
double vsum_kappa(const double* g, int64_t n, double t);
void vkappa(float* g, int64_t n, float t);
void vkappa(double* g, int64_t n, double t);

// sum_i a[i] * b[i].
float vdot(const float* a, const float* b, int64_t n);
double vdot(const double* a, const double* b, int64_t n);

// y[i] = x[i] * scale.
void vscale(const float* x, float scale, float* y, int64_t n);
void vscale(const double* x, double scale, double* y, int64_t n);

// o[i] = (g[i] - radial * u[i]) * inv: a row of the normalisation backward.
void vproject(const float* g, const float* u, float radial, float inv, float* o, int64_t n);
void vproject(const double* g, const double* u, double radial, double inv, double* o, int64_t n);

// sum_i r[i] * (log_r[i] - x[i] * inv_tau): the KL sum of kd (common/idid_math.h kd_summand).
float vkl_sum(const float* r, const float* log_r, const float* x, int64_t n, float inv_tau);
double vkl_sum(const double* r, const double* log_r, const double* x, int64_t n, double inv_tau);

// Per-row scalars of the IDID-R1 logit gradient (see common/idid_math.h).
template <typename A>
struct IcRow {
  A lse;        // logsumexp_c z_ic
  A lse_nt;     // logsumexp_{c != y_i} z_ic / tau
  A inv_tau;
  A g_scale;    // upstream coefficient of L_IC times a_i
  A a;          // a_i (the teacher gradient is scaled by the upstream coefficient once, at the end)
  A phi_shift;  // lse_nt_i - kd_i
  A p_over_q;   // exp(lse_nt_i - lse_i), used when unit_tau
  bool unit_tau;  // tau == 1: p = q p_over_q, one exp per element
};

// One row segment of the logits, overwritten in place with dL/dz (target column excluded; the
// caller fixes it): g_c = g_scale * ic_logit_grad(p_c, q_c, r_c, inv_tau), and accumulates the
// teacher gradient dphi_c += teacher_grad_term(r_c, log_r_c, z_c / tau, a, phi_shift).
void ic_grad_distill(float* z, const float* r, const float* log_r, float* dphi, int64_t n, const IcRow<float>& row);
void ic_grad_distill(double* z, const double* r, const double* log_r, double* dphi, int64_t n,
                     const IcRow<double>& row);

// Without distillation: z_c <- g_scale * exp(z_c - lse) (target column fixed by the caller).
void ic_grad_plain(float* z, int64_t n, float lse, float g_scale);
void ic_grad_plain(double* z, int64_t n, double lse, double g_scale);

}  // namespace cpu
}  // namespace idid_kernels
