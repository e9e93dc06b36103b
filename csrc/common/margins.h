// Target-logit margins phi(c) and phi'(c) of spec/cm_margin.md, per element, host + device.
// The Python oracle is idid_kernels/reference/margins.py; the kinds match MarginParams.kind.
#pragma once

#include <cmath>

#include "macros.h"

namespace idid_kernels {

// kMarginGiven: the caller computed each row's phi(c_y) and phi'(c_y) (per-row margins, such as
// AdaFace's, MagFace's or LDAM's: idid_kernels/reference/margins.py), read from Margin::given.
enum MarginKind : int {
  kMarginNone = 0,
  kMarginCosFace = 1,
  kMarginAngular = 2,
  kMarginSphere = 3,
  kMarginGiven = 4
};

// theta = arccos(clamp(c, -1 + kCosClamp, 1 - kCosClamp)): arccos' stays finite at c = +-1.
constexpr double kCosClamp = 1e-7;
constexpr double kPi = 3.14159265358979323846;

template <typename A>
struct Margin {
  int kind;
  A m1, m2, m3;      // cos(m1 theta + m2) - m3 (angular); c - m3 (cosface); m1 = SphereFace's m
  A sphere_lambda;   // SphereFace blend (lambda c + psi) / (1 + lambda)
  bool easy_margin;  // angular: phi = c where c <= 0
  bool exact_grad;   // false: straight-through phi' = 1
  A fallback_shift;  // angular hard fallback: phi = c - m3 - m2 sin(m2), precomputed on the host
  // kMarginGiven: (2, N) row-major, phi of global row n at given[n], phi' at given[given_stride + n]
  // (host memory on the CPU, device memory on the GPU).
  const A* given = nullptr;
  int64_t given_stride = 0;
};

template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A clamp_cos(A c) {
  const A lo = A(-1) + A(kCosClamp), hi = A(1) - A(kCosClamp);
  return c < lo ? lo : (c > hi ? hi : c);
}

// (-1)^k for an integral-valued k.
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A parity_sign(A k) {
  using std::fmod;
  return fmod(k, A(2)) == A(0) ? A(1) : A(-1);
}

// phi(c) and phi'(c) together (the gradient epilogue needs both; the forward ignores dphi).
template <typename A>
IDK_HOST_DEVICE inline A margin_phi(A c, const Margin<A>& p, A* dphi) {
  using std::acos;
  using std::cos;
  using std::floor;
  using std::sin;
  using std::sqrt;
  A value, grad = A(1);
  switch (p.kind) {
    case kMarginNone:
      value = c;
      break;
    case kMarginCosFace:
      value = c - p.m3;
      break;
    case kMarginAngular: {
      if (p.easy_margin && c <= A(0)) {
        value = c;
        break;
      }
      const A cc = clamp_cos(c);
      const A theta = acos(cc);
      const A angle = p.m1 * theta + p.m2;
      if (angle > A(kPi)) {
        value = c - p.fallback_shift;
      } else {
        value = cos(angle) - p.m3;
        grad = p.m1 * sin(angle) / sqrt(A(1) - cc * cc);
      }
      break;
    }
    default: {  // kMarginSphere
      const A cc = clamp_cos(c);
      const A theta = acos(cc);
      const A k = floor(p.m1 * theta / A(kPi));
      const A sign = parity_sign(k);
      const A psi = sign * cos(p.m1 * theta) - A(2) * k;
      const A inv = A(1) / (A(1) + p.sphere_lambda);
      value = (p.sphere_lambda * c + psi) * inv;
      grad = (p.sphere_lambda + sign * p.m1 * sin(p.m1 * theta) / sqrt(A(1) - cc * cc)) * inv;
      break;
    }
  }
  if (dphi != nullptr) *dphi = p.exact_grad ? grad : A(1);
  return value;
}

// The target's psi_y = phi(c) of global row `row`: the margin's own formula, or the caller's value
// for kMarginGiven (its phi' too; margin_grad is the caller's business there).
template <typename A>
IDK_HOST_DEVICE IDK_FORCE_INLINE A target_phi(A c, const Margin<A>& p, int64_t row, A* dphi) {
  if (p.kind == kMarginGiven) {
    if (dphi != nullptr) *dphi = p.given[p.given_stride + row];
    return p.given[row];
  }
  return margin_phi(c, p, dphi);
}

}  // namespace idid_kernels
