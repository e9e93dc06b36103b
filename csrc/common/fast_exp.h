// exp that a compiler can vectorise (range reduction + Cephes' degree-6 polynomial; about 1 ulp in
// float32). std::exp in a loop stays scalar without -ffast-math; the softmax epilogues spend most
// of their time here. float64 keeps std::exp (it is the gradcheck / oracle dtype, not a fast path).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace idid_kernels {

// Branch-free so it vectorises (also in the SSE2 baseline, which has no vector floor):
// x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of ln2), exp(r) by Cephes' degree-6
// polynomial, 2^n built in the exponent bits. Max relative error ~1.2e-7 on [-87.3, 88.7];
// exp(0) == 1 exactly; below -87.3 (including -inf) it returns 0, above 88.7 it saturates at
// exp(88.7) (no inf; callers pass arguments <= 0).
IDK_HOST_DEVICE IDK_FORCE_INLINE float exp_approx(float x) {
  constexpr float kLo = -87.3365447f, kHi = 88.7228394f;
  const float keep = x < kLo ? 0.0f : 1.0f;
  x = x < kLo ? kLo : (x > kHi ? kHi : x);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale * keep;
}

IDK_HOST_DEVICE IDK_FORCE_INLINE double exp_approx(double x) {
  using std::exp;
  return exp(x);
}

}  // namespace idid_kernels
