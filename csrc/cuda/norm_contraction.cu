// CUDA kernels of norm_contraction (see csrc/cpu/norm_contraction.cpp for the math).
// One warp per row: the row's sum of squares is a warp-shuffle reduction in the accumulation
// type, so a row is read once in forward and twice-free in backward (read x, write dx).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/contraction.h"
#include "launchers.h"
#include "warp_norm.cuh"

namespace idid_kernels {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

// Explicit conversions: torch's nvcc flags (-D__CUDA_NO_HALF_CONVERSIONS__ and friends) remove the
// implicit ones between float and __half / __nv_bfloat16.
__device__ __forceinline__ float to_acc(float v, float) { return v; }
__device__ __forceinline__ double to_acc(double v, double) { return v; }
__device__ __forceinline__ float to_acc(__half v, float) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v, float) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return v; }


template <typename T, typename Acc>
__global__ void norm_contraction_forward_kernel(const T* __restrict__ x, T* __restrict__ out, Acc* __restrict__ norm,
                                                int64_t n, int64_t d, Acc offset, Acc inv_t) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= n) return;
  const T* xr = x + row * d;
  const Acc r = warp_row_norm<Acc>([&](int64_t k) { return to_acc(xr[k], Acc(0)); }, d, lane);
  if (lane == 0) {
    norm[row] = r;
    out[row] = from_acc<T>(contraction(r, offset, inv_t));
  }
}

template <typename T, typename Acc>
__global__ void norm_contraction_backward_kernel(const Acc* __restrict__ grad_out, const Acc* __restrict__ grad_norm,
                                                 const T* __restrict__ x, const Acc* __restrict__ norm,
                                                 T* __restrict__ dx, int64_t n, int64_t d, Acc offset, Acc inv_t) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= n) return;
  const Acc r = norm[row];
  Acc radial = grad_out[row] * contraction_grad(r, offset, inv_t);
  if (grad_norm != nullptr) radial += grad_norm[row];
  const Acc inv = inv_norm_or_zero(r);
  const T* xr = x + row * d;
  T* dr = dx + row * d;
  if (inv < Acc(INFINITY)) {
    const Acc coef = radial * inv;
    for (int64_t k = lane; k < d; k += kWarp) dr[k] = from_acc<T>(coef * to_acc(xr[k], Acc(0)));
  } else {  // a subnormal norm: 1 / r overflows, x_k / r does not
    for (int64_t k = lane; k < d; k += kWarp) dr[k] = from_acc<T>(radial * (to_acc(xr[k], Acc(0)) / r));
  }
}

unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kWarpsPerBlock - 1) / kWarpsPerBlock); }

}  // namespace

template <typename T, typename Acc>
cudaError_t norm_contraction_forward(const T* x, T* out, Acc* norm, int64_t n, int64_t d, Acc offset,
                                     Acc inv_temperature, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  norm_contraction_forward_kernel<T, Acc>
      <<<blocks_for(n), kWarp * kWarpsPerBlock, 0, stream>>>(x, out, norm, n, d, offset, inv_temperature);
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t norm_contraction_backward(const Acc* grad_out, const Acc* grad_norm, const T* x, const Acc* norm, T* dx,
                                      int64_t n, int64_t d, Acc offset, Acc inv_temperature, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  norm_contraction_backward_kernel<T, Acc><<<blocks_for(n), kWarp * kWarpsPerBlock, 0, stream>>>(
      grad_out, grad_norm, x, norm, dx, n, d, offset, inv_temperature);
  return cudaGetLastError();
}

#define IDK_INSTANTIATE(T, Acc)                                                                          \
  template cudaError_t norm_contraction_forward<T, Acc>(const T*, T*, Acc*, int64_t, int64_t, Acc, Acc,  \
                                                        cudaStream_t);                                  \
  template cudaError_t norm_contraction_backward<T, Acc>(const Acc*, const Acc*, const T*, const Acc*, T*, \
                                                         int64_t, int64_t, Acc, Acc, cudaStream_t);
IDK_INSTANTIATE(float, float)
IDK_INSTANTIATE(double, double)
IDK_INSTANTIATE(__half, float)
IDK_INSTANTIATE(__nv_bfloat16, float)
#undef IDK_INSTANTIATE

}  // namespace cuda
}  // namespace idid_kernels
