// cuda_bf16.h of the CUDA-execution emulator: __nv_bfloat16 as the top 16 bits of a float with
// round-to-nearest-even conversion.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __nv_bfloat16 {
  uint16_t __x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = uint32_t(h.__x) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  __nv_bfloat16 h;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // nan: keep it quiet
    h.__x = static_cast<uint16_t>((bits >> 16) | 0x40u);
    return h;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  h.__x = static_cast<uint16_t>(bits >> 16);
  return h;
}
