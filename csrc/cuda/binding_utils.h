// Helpers shared by the torch-side CUDA bindings (csrc/cuda/*_binding.cpp).
//
// The bindings compile two ways:
// - natively (IDID_KERNELS_WITH_CUDA): the kernels run on CUDA tensors, registered at the CUDA
//   dispatch key of the idid_kernels library, on the tensors' device and current stream;
// - under the CUDA-execution emulator (IDID_KERNELS_CUDA_EMULATOR, the CPU build; csrc/emu): the
//   same kernels, compiled as host C++, run on CPU tensors, registered at the CPU key of the
//   idid_kernels_emu library (same schemas), which backend="cuda" calls on CPU tensors when
//   IDID_KERNELS_CUDA_EMULATE=1.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#ifdef IDID_KERNELS_CUDA_EMULATOR
#include <c10/core/Device.h>
// The registration block of the bindings: the emulated library at the CPU key.
#define IDK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(idid_kernels_emu, CPU, m)
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define IDK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(idid_kernels, CUDA, m)
#endif

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

#ifdef IDID_KERNELS_CUDA_EMULATOR
constexpr bool kEmulated = true;
// CPU tensors: there is one device and no stream (emulated launches run synchronously).
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
constexpr const char* kKernelDevice = "a CPU tensor (the emulated CUDA backend)";
inline c10::Device kernel_device() { return c10::Device(c10::kCPU); }
// Blocks that fill "the GPU" in grid-size heuristics: a small fixed figure, so that test shapes run
// the multi-block paths a large GPU takes at large shapes.
inline int64_t target_blocks() { return 16; }
#else
constexpr bool kEmulated = false;
// Allocations and launches on the inputs' device, launches on its current stream.
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
constexpr const char* kKernelDevice = "a CUDA tensor";
inline c10::Device kernel_device() { return c10::Device(c10::kCUDA, c10::cuda::current_device()); }
// Blocks that fill the current GPU in grid-size heuristics: four per multiprocessor.
inline int64_t target_blocks() {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()) != cudaSuccess ||
      sms <= 0) {
    (void)cudaGetLastError();
    sms = 132;
  }
  return 4 * static_cast<int64_t>(sms);
}
#endif

}  // namespace cuda
}  // namespace idid_kernels
