// exp that a compiler can vectorise (range reduction + Cephes' degree-6 polynomial; about 1 ulp in
// float32). std::exp in a loop stays scalar without -ffast-math; the softmax epilogues spend most
// of their time here. float64 keeps std::exp (it is the gradcheck / oracle dtype, not a fast path).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace idid_kernels {

IDK_HOST_DEVICE IDK_FORCE_INLINE float exp_approx(float x) {
  // exp(x) = 2^n e^r, n = round(x / ln2), |r| <= ln2 / 2; ln2 split in two for an exact n ln2.
  const float lo_cut = -87.33654f, hi_cut = 88.37626f;
  const bool underflow = x < lo_cut;
  x = x > hi_cut ? hi_cut : (x < lo_cut ? lo_cut : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
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
  return underflow ? 0.0f : p * scale;
}

IDK_HOST_DEVICE IDK_FORCE_INLINE double exp_approx(double x) {
  using std::exp;
  return exp(x);
}

}  // namespace idid_kernels
