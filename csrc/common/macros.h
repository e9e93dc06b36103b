// Portability macros shared by the CPU (C++) and CUDA kernels. No torch headers here: the CUDA
// sources include this and must compile with nvcc alone.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define IDK_HOST_DEVICE __host__ __device__
#define IDK_FORCE_INLINE __forceinline__
#else
#define IDK_HOST_DEVICE
#define IDK_FORCE_INLINE inline __attribute__((always_inline))
#endif

namespace idid_kernels {

// Accumulation type: statistics, norms, exp/log in float32, float64 for float64 inputs
// (ARCHITECTURE.md, numerics contract). Half types map to float through the primary template.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// F.normalize's floor on the norm: u = x / max(||x||, kNormEps).
constexpr double kNormEps = 1e-12;

}  // namespace idid_kernels
