// cuda_fp16.h of the CUDA-execution emulator: __half as 16 bits with CUDA's round-to-nearest-even
// conversions (what the kernels use; torch's CUDA flags remove the implicit conversions anyway).
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __half {
  uint16_t __x;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1fu, man = h.__x & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: exact in float
    float f = static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline __half __float2half_rn(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  __half h;
  if (abs >= 0x7f800000u) {  // inf / nan (nan stays a quiet nan)
    h.__x = static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    return h;
  }
  if (abs >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    h.__x = static_cast<uint16_t>(sign | 0x7c00u);
    return h;
  }
  if (abs < 0x38800000u) {  // below 2^-14: subnormal half (or zero), round to nearest even at 2^-24
    float a;
    std::memcpy(&a, &abs, 4);
    const float scaled = a * 16777216.0f;  // exact: a * 2^24
    float r = nearbyintf(scaled);          // the default rounding mode: to nearest even
    h.__x = static_cast<uint16_t>(sign | static_cast<uint16_t>(r));
    return h;
  }
  const uint32_t exp = (abs >> 23) - 112u, man = abs & 0x7fffffu;
  uint32_t half = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // may carry into the exponent: correct
  h.__x = static_cast<uint16_t>(sign | half);
  return h;
}
