// A small CUDA-execution emulator: runs the kernels of csrc/cuda/*.cu, compiled as host C++, on the
// CPU with CUDA's execution model, so that CI without a GPU executes the real kernel code (the
// analogue of TRITON_INTERPRET=1 for Triton).
//
// Model (what a kernel can observe, and what the emulator checks):
// - A launch runs its blocks one after another; the threads of a block are user-space fibers on one
//   OS thread, each with its own stack. A fiber runs until it reaches a synchronisation point
//   (__syncthreads, a warp collective such as __shfl_xor_sync) or returns; the scheduler then runs
//   the next ready fiber. Between synchronisation points, shared memory therefore sees the threads'
//   writes in scheduling order, and a missing barrier changes results when the order changes.
// - Scheduling: a queue of ready threads. The threads released by a barrier join its back, in the
//   block's order; the lanes released by a warp collective go to its front, so a warp runs on ahead
//   of the others (as a warp may on a GPU; a thread-by-thread interleaving would hide a missing
//   barrier before shared memory is overwritten).
// - The order is selectable with IDID_KERNELS_CUDA_EMULATE_ORDER (read at every launch): "forward"
//   (default: blocks and threads in index order), "reverse", or "random" / "random:SEED" (seeded
//   permutations of the blocks and of every release, released lanes to the front or the back at
//   random).
// - __syncthreads() is a counted barrier over all the block's threads. A thread that returns while
//   others wait at a barrier, or reaches a barrier after another thread returned, is an error
//   naming the block and the threads (CUDA requires block-uniform control flow at barriers).
// - Warp collectives (__shfl*_sync, __syncwarp, __ballot_sync, __any_sync, __all_sync) are a
//   rendezvous of the lanes in their mask: every lane in the mask must arrive at the same kind of
//   collective with the same mask and width. A lane of the mask that has returned or waits
//   elsewhere, a lane calling with a mask that leaves itself out, or reading a lane outside the
//   mask, is an error naming the warp and the lanes.
// - __shared__ variables are static thread_local storage: one copy per OS thread, shared by the
//   fibers of the block that runs on it, reused by the next block (as on a GPU, nothing
//   initialises shared memory).
// - Launch configurations are checked against CUDA's limits (1024 threads per block, block
//   dimensions (1024, 1024, 64), grid (2^31 - 1, 65535, 65535)): a launch beyond them fails with
//   cudaErrorInvalidConfiguration, as on a GPU.
// An error stops the launch; cudaGetLastError() returns cudaErrorLaunchFailure and
// cudaGetErrorString() the emulator's message.
//
// Not modelled: concurrency between blocks, memory spaces (device pointers are host pointers),
// streams (launches run synchronously), atomics, dynamic shared memory, cooperative groups.
#pragma once

#include <math.h>  // the C++ overloads (exp(float), fmax(float, float), ...) in the global namespace

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA's vector types and runtime API subset -------------------------------------------------

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

namespace idid_emu {

constexpr int kWarpSize = 32;

// The executing thread's coordinates (valid inside a kernel).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads();

// Stops the launch with an error naming the kernel, block and thread (for checks in device code).
[[noreturn]] void device_fault(const char* what);

enum class WarpOp : int { kShflIdx, kShflXor, kShflDown, kShflUp, kSyncWarp, kBallot };

// The rendezvous of the lanes of `mask` at one warp collective: `value` holds this lane's operand
// (size bytes, at most 8); on return it holds the result for this lane. For kBallot the operand is
// the predicate (0/1) and the result the mask of lanes whose predicate was set.
void warp_collective(WarpOp op, unsigned mask, void* value, int size, int arg, int width, const char* name);

// Runs body() once per thread of every block of the grid under the scheduler (body calls the kernel
// with a copy of its arguments). Sets the launch error on a bad configuration or an emulator fault.
void run_grid(dim3 grid, dim3 block, const char* kernel, const std::function<void()>& body);

template <typename T>
T shuffle(WarpOp op, unsigned mask, T v, int arg, int width, const char* name) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffled values: trivially copyable, <= 8 B");
  unsigned char buf[8] = {};
  std::memcpy(buf, &v, sizeof(T));
  warp_collective(op, mask, buf, static_cast<int>(sizeof(T)), arg, width, name);
  T out;
  std::memcpy(&out, buf, sizeof(T));
  return out;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...) is rewritten (csrc/emu/launch_rewrite.py) to
// ::idid_emu::launch("kernel", kernel, grid, block, shared_bytes, stream)(args...): the arguments are converted
// to the kernel's parameter types once, as a launch does, and every thread gets its own copy.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  const char* name;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    void (*k)(Params...) = kernel;
    run_grid(grid, block, name, [&params, k]() { std::apply(k, params); });
  }
};

template <typename... Params>
Launch<Params...> launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                         std::size_t /*shared_bytes*/ = 0, cudaStream_t /*stream*/ = nullptr) {
  return Launch<Params...>{kernel, grid, block, name};
}

}  // namespace idid_emu

#define threadIdx (::idid_emu::thread_idx())
#define blockIdx (::idid_emu::block_idx())
#define blockDim (::idid_emu::block_dim())
#define gridDim (::idid_emu::grid_dim())
#define warpSize (::idid_emu::kWarpSize)

inline void __syncthreads() { ::idid_emu::syncthreads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  int dummy = 0;
  ::idid_emu::warp_collective(::idid_emu::WarpOp::kSyncWarp, mask, &dummy, sizeof(dummy), 0, 32, "__syncwarp");
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::idid_emu::shuffle(::idid_emu::WarpOp::kShflIdx, mask, v, src_lane, width, "__shfl_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::idid_emu::shuffle(::idid_emu::WarpOp::kShflXor, mask, v, lane_mask, width, "__shfl_xor_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::idid_emu::shuffle(::idid_emu::WarpOp::kShflDown, mask, v, static_cast<int>(delta), width,
                             "__shfl_down_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::idid_emu::shuffle(::idid_emu::WarpOp::kShflUp, mask, v, static_cast<int>(delta), width, "__shfl_up_sync");
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  unsigned v = predicate != 0;
  ::idid_emu::warp_collective(::idid_emu::WarpOp::kBallot, mask, &v, sizeof(v), 0, 32, "__ballot_sync");
  return v;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }
