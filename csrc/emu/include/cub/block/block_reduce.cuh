// cub::BlockReduce for the CUDA-execution emulator: the subset the kernels use (Reduce, Sum), with
// cub's contract made observable. Every thread of the block must call it (it holds a barrier);
// the result is valid in thread 0 only (the others get a NaN, or an all-ones pattern for integer
// types, where cub leaves an unspecified partial); the temporary storage may be reused only after
// a __syncthreads() (a missing one lets a fast thread overwrite a partial thread 0 has not read).
#pragma once

#include <cstring>
#include <limits>
#include <type_traits>

#include "../../cuda_runtime.h"

namespace cub {

struct Sum {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

enum BlockReduceAlgorithm { BLOCK_REDUCE_RAKING, BLOCK_REDUCE_RAKING_COMMUTATIVE_ONLY, BLOCK_REDUCE_WARP_REDUCTIONS };

template <typename T, int BLOCK_DIM_X, BlockReduceAlgorithm ALGORITHM = BLOCK_REDUCE_WARP_REDUCTIONS,
          int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1>
class BlockReduce {
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    T partial[kThreads];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <typename Op>
  T Reduce(T input, Op op) {
    return Reduce(input, op, kThreads);
  }

  // Only the first num_valid threads' inputs take part.
  template <typename Op>
  T Reduce(T input, Op op, int num_valid) {
    const dim3& dim = ::idid_emu::block_dim();
    const uint3& tid = ::idid_emu::thread_idx();
    if (static_cast<int>(dim.x * dim.y * dim.z) != kThreads) {
      ::idid_emu::device_fault("cub::BlockReduce used in a block whose size differs from its BLOCK_DIM "
                               "(cub would read or write outside its storage)");
    }
    const int linear = static_cast<int>(tid.x + dim.x * (tid.y + dim.y * tid.z));
    storage_.partial[linear] = input;
    __syncthreads();
    if (linear != 0) return unspecified();
    T total = storage_.partial[0];
    for (int i = 1; i < num_valid && i < kThreads; ++i) total = op(total, storage_.partial[i]);
    return total;
  }

  T Sum(T input) { return Reduce(input, cub::Sum()); }
  T Sum(T input, int num_valid) { return Reduce(input, cub::Sum(), num_valid); }

 private:
  static T unspecified() {
    if constexpr (std::numeric_limits<T>::has_quiet_NaN) {
      return std::numeric_limits<T>::quiet_NaN();
    } else {
      T v;
      std::memset(&v, 0xff, sizeof(T));
      return v;
    }
  }

  TempStorage& storage_;
};

}  // namespace cub
