// Helpers shared by the torch-side CUDA bindings (csrc/cuda/*_binding.cpp).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace idid_kernels {
namespace cuda {

// The CUDA type a launcher takes for an ATen scalar type: at::Half / at::BFloat16 share the bit
// layout of CUDA's __half / __nv_bfloat16.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace idid_kernels
