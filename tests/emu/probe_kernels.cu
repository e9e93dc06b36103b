// Small kernels that probe the CUDA-execution emulator's semantics (tests/test_cuda_emulator.py):
// each is launched through a C entry point and returns the launch's cudaError_t.
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

namespace {

// out[t] = the value each shuffle flavour gives thread t (4 entries per thread), with v = 100 t.
__global__ void shuffles_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  const int v = 100 * t;
  out[4 * t + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[4 * t + 1] = __shfl_down_sync(0xffffffffu, v, 3);
  out[4 * t + 2] = __shfl_up_sync(0xffffffffu, v, 2, 16);
  out[4 * t + 3] = __shfl_sync(0xffffffffu, v, (lane * 7) % 32);
}

// out[0] = the block sum of t + 1 in thread 0; out[1 + t] = 1 where thread t's result is NaN.
__global__ void block_sum_kernel(double* out) {
  using Reduce = cub::BlockReduce<double, 128>;
  __shared__ typename Reduce::TempStorage temp;
  const double s = Reduce(temp).Sum(static_cast<double>(threadIdx.x + 1));
  if (threadIdx.x == 0) out[0] = s;
  out[1 + threadIdx.x] = s != s ? 1.0 : 0.0;
}

// Thread `who` of block 1 returns before a barrier the others reach.
__global__ void divergent_barrier_kernel(int who, int* out) {
  if (blockIdx.x == 1 && static_cast<int>(threadIdx.x) == who) return;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// Lane `who` of each warp returns before the warp's full-mask shuffle.
__global__ void lane_leaves_kernel(int who, int* out) {
  const int lane = threadIdx.x % 32;
  if (lane == who) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, lane, 1);
}

// Lanes of one warp at two different collectives.
__global__ void mismatched_collectives_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[lane] = __shfl_xor_sync(0xffffffffu, lane, 1);
  else out[lane] = __shfl_down_sync(0xffffffffu, lane, 1);
}

// Thread 0 publishes a value in shared memory that every thread reads. With `barrier` the read
// follows a __syncthreads(); without it the result depends on the order the threads run in.
__global__ void publish_kernel(int barrier, int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 7 + static_cast<int>(blockIdx.x);
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

// out[block] = the order the blocks ran in; out[gridDim.x + t] of block 0 = the order its threads
// first ran in (a counter in shared memory, bumped by each thread before any barrier).
int blocks_seen = 0;  // reset by the launch's entry point

__global__ void order_kernel(int* out) {
  __shared__ int first;
  if (threadIdx.x == 0) out[blockIdx.x] = blocks_seen++;
  __syncthreads();
  if (threadIdx.x == 0) first = 0;
  __syncthreads();
  if (blockIdx.x == 0) out[gridDim.x + threadIdx.x] = first++;
}

__global__ void noop_kernel() {}

}  // namespace

extern "C" {

int probe_shuffles(int* out) {
  shuffles_kernel<<<1, 64>>>(out);
  return cudaGetLastError();
}
int probe_block_sum(double* out) {
  block_sum_kernel<<<1, 128>>>(out);
  return cudaGetLastError();
}
int probe_block_sum_wrong_size(double* out) {
  block_sum_kernel<<<1, 64>>>(out);
  return cudaGetLastError();
}
int probe_divergent_barrier(int who, int* out) {
  divergent_barrier_kernel<<<3, 64>>>(who, out);
  return cudaGetLastError();
}
int probe_lane_leaves(int who, int* out) {
  lane_leaves_kernel<<<1, 64>>>(who, out);
  return cudaGetLastError();
}
int probe_mismatched_collectives(int* out) {
  mismatched_collectives_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}
int probe_publish(int barrier, int* out) {
  publish_kernel<<<4, 64>>>(barrier, out);
  return cudaGetLastError();
}
int probe_order(int blocks, int threads, int* out) {
  blocks_seen = 0;
  order_kernel<<<blocks, threads>>>(out);
  return cudaGetLastError();
}
int probe_launch(unsigned gx, unsigned gy, unsigned bx) {
  noop_kernel<<<dim3(gx, gy), bx>>>();
  return cudaGetLastError();
}
const char* probe_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
