// CUDA kernels of class_density: D_c = sum_{i != j, y_i = y_j = c} kappa_ij / (n_c (n_c - 1)),
// kappa_ij = exp(t (<u_i, u_j> - 1)), D_c = 0 for n_c < 2 (spec/idid.md; the CPU kernels in
// csrc/cpu/class_density.cpp hold the same math).
//
// The caller (class_density_binding.cpp) sorts the rows by label on the device (a stable sort, so
// `order` lists the rows of each class in ascending original order) and finds each class's first
// sorted position with a binary search, so class c is the contiguous run of sorted positions
// [offsets[c], offsets[c + 1]). Nothing here reads a count on the host: every shape is known from
// n, d and C alone.
//
//   1. unit rows, one warp per sorted row: u_p = x_{order[p]} / max(||x||, eps) in the accumulation
//      type, written in sorted order (each class a contiguous block of U); forward also writes the
//      norms (in the original row order), backward rebuilds U from the saved norms so its U is
//      bitwise the forward's.
//   2. forward, one block per sorted row p: its warps take the other rows j of p's class in turn,
//      each <u_p, u_j> a warp-shuffle reduction, and sum kappa; the warps' sums are added in warp
//      order by thread 0 -> row_sum[p] = sum_{j != p} kappa_pj.
//   3. forward, one warp per class: D_c = (sum of the class's row sums) / (n_c (n_c - 1)), summed
//      in double (the CPU kernel sums its tiles in double too), written in x's dtype.
//   4. backward, one block per sorted row p: pull_p = sum_{j != p} t kappa_pj u_j, built in chunks of
//      kChunk rows j (warps compute the chunk's weights into shared memory, then every thread adds
//      the chunk into its own columns of pull_p), then dx = normalize_backward(2 g_c / (n_c (n_c - 1))
//      pull_p) written to the row's original position.
//
// The IDID-R1 loss (idid_loss_binding.cpp) has its unit rows already sorted by label: it runs steps 2
// and 3 on them (class_density_sorted_forward), and for its backward adds the same pull, scaled, to
// its gradient with respect to the unit rows (class_density_sorted_pull, step 5), before its own
// normalisation backward.
//
// Determinism: there are no atomics. Every sum has a fixed order (lane-strided partial sums, a
// fixed xor-shuffle tree, warps in index order, chunks in row order), and the sort is stable, so
// the results are bitwise the same on every run with the same inputs on the same GPU.
//
// Rows whose label lies outside [0, C) fall outside every class run; they take no part and get a
// zero gradient (the functional API rejects such labels before any kernel runs; checking them here
// would need a host synchronisation).
#include <cub/block/block_reduce.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../common/density.h"
#include "../common/normalize.h"
#include "launchers.h"
#include "warp_norm.cuh"

namespace idid_kernels {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Rows j per backward chunk: 4 dot products per warp, then 32 rows' worth of column updates per
// read-modify-write of pull_p (so that scratch row costs ~1/32 of the traffic of reading the u_j).
constexpr int kChunk = 32;

// Explicit conversions: torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit __half <-> float conversions.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  __device__ __forceinline__ static float cvt(float v) { return v; }
};
template <>
struct FromAcc<double> {
  __device__ __forceinline__ static double cvt(double v) { return v; }
};
template <>
struct FromAcc<__half> {
  __device__ __forceinline__ static __half cvt(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};

// Butterfly sum over the 32 lanes of a full warp; every lane ends with the same bits (a + b and
// b + a round alike at every step). All 32 lanes must call it.
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// <a, b> over d entries by one full warp (lane-strided partial sums, then warp_sum); every lane
// gets the result.
template <typename A>
__device__ __forceinline__ A warp_dot(const A* __restrict__ a, const A* __restrict__ b, int64_t d, int lane) {
  A s = A(0);
  for (int64_t k = lane; k < d; k += kWarp) s += a[k] * b[k];
  return warp_sum(s);
}

// [start, end) of class c in sorted positions, or an empty run for a label outside [0, C).
__device__ __forceinline__ void class_run(const int64_t* __restrict__ offsets, int64_t c, int64_t num_classes,
                                          int64_t* start, int64_t* end) {
  if (c >= 0 && c < num_classes) {
    *start = offsets[c];
    *end = offsets[c + 1];
  } else {
    *start = 0;
    *end = 0;
  }
}

// 1. us[p] = x[order[p]] / max(r, eps) with r = ||x[order[p]]|| (norm_saved == nullptr: computed,
// and written to norm_out[order[p]]) or r = norm_saved[order[p]]. One warp per sorted row.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    sorted_unit_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ order, int64_t n, int64_t d,
                            const A* __restrict__ norm_saved, A* __restrict__ norm_out, A* __restrict__ us) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (p >= n) return;  // p is the same on all lanes of a warp, and no block barrier follows
  const int64_t i = order[p];
  const T* xr = x + i * d;
  A r;
  if (norm_saved != nullptr) {  // a kernel argument: uniform across the warp
    r = norm_saved[i];
  } else {
    r = warp_row_norm<A>([&](int64_t k) { return static_cast<A>(to_acc(xr[k])); }, d, lane);
    if (lane == 0) norm_out[i] = r;
  }
  // x * (1 / max(r, eps)): the CPU kernels' expression (csrc/cpu/normalize.h scale_row).
  const A inv = A(1) / norm_floor(r);
  A* ur = us + p * d;
  for (int64_t k = lane; k < d; k += kWarp) ur[k] = to_acc(xr[k]) * inv;
}

// 2. row_sum[p] = sum_{j in p's class, j != p} kappa(<u_p, u_j>). One block per sorted row.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    density_row_sums_kernel(const A* __restrict__ us, const int64_t* __restrict__ sorted_labels,
                            const int64_t* __restrict__ offsets, int64_t d, int64_t num_classes, A t,
                            A* __restrict__ row_sum) {
  __shared__ A warp_part[kWarpsPerBlock];
  const int64_t p = blockIdx.x;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  int64_t start, end;
  class_run(offsets, sorted_labels[p], num_classes, &start, &end);
  // A row of a class with no pairs contributes nothing (and the per-class pass does not read it).
  // The condition is the same for the whole block and is taken before the only barrier.
  if (end - start < 2) {
    if (threadIdx.x == 0) row_sum[p] = A(0);
    return;
  }
  const A* up = us + p * d;
  A part = A(0);
  for (int64_t j = start + warp; j < end; j += kWarpsPerBlock) {
    if (j == p) continue;  // the same j on every lane: the warp stays converged for the shuffles
    part += diversity_kernel(warp_dot(up, us + j * d, d, lane), t);
  }
  if (lane == 0) warp_part[warp] = part;
  __syncthreads();
  if (threadIdx.x == 0) {
    A s = A(0);
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) s += warp_part[w];
    row_sum[p] = s;
  }
}

// 3. density[c] = (sum over the class's row sums) / (n_c (n_c - 1)), 0 for n_c < 2. One warp per
// class; the class total in double (a class can hold millions of pairs).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    class_density_reduce_kernel(const A* __restrict__ row_sum, const int64_t* __restrict__ offsets,
                                int64_t num_classes, T* __restrict__ density) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= num_classes) return;  // warp-uniform, no block barrier follows
  const int64_t start = offsets[c], end = offsets[c + 1];
  const int64_t nc = end - start;
  double total = 0.0;
  for (int64_t p = start + lane; p < end; p += kWarp) total += static_cast<double>(row_sum[p]);
  total = warp_sum(total);
  if (lane == 0) density[c] = FromAcc<T>::cvt(static_cast<A>(total * pair_weight<double>(nc)));
}

// pr[k] += scale * sum_{j in [start, end), j != p} t kappa_pj us[j][k] for the d columns of row pr, in
// chunks of kChunk rows j: the warps compute the chunk's weights scale * t kappa_pj into the shared
// `weight` (kChunk entries), then thread tid adds the chunk, in j order, into its own columns
// k = tid (mod kThreads). Contains block barriers: every thread of the block calls it, with
// block-uniform p, start and end.
template <typename A>
__device__ __forceinline__ void add_pull(const A* __restrict__ us, int64_t p, int64_t start, int64_t end, int64_t d,
                                         A t, A scale, A* __restrict__ weight, A* __restrict__ pr) {
  const int tid = threadIdx.x;
  const int warp = tid / kWarp;
  const int lane = tid % kWarp;
  const A* up = us + p * d;
  for (int64_t j0 = start; j0 < end; j0 += kChunk) {  // bounds are block-uniform
    const int jn = static_cast<int>(end - j0 < kChunk ? end - j0 : kChunk);
    // Weights of this chunk: scale * d kappa / d cos = scale * t kappa_pj, 0 on the diagonal (i != j).
    for (int jj = warp; jj < jn; jj += kWarpsPerBlock) {  // warp-uniform loop
      const int64_t j = j0 + jj;
      const A kappa = diversity_kernel(warp_dot(up, us + j * d, d, lane), t);
      if (lane == 0) weight[jj] = j == p ? A(0) : scale * diversity_kernel_grad(kappa, t);
    }
    __syncthreads();  // weights visible to every thread
    for (int64_t k = tid; k < d; k += kThreads) {
      A a = pr[k];
      for (int jj = 0; jj < jn; ++jj) a += weight[jj] * us[(j0 + jj) * d + k];
      pr[k] = a;
    }
    __syncthreads();  // every thread done reading `weight` before the next chunk rewrites it
  }
}

// 4. dx[order[p]] = normalize_backward(scale_c * pull_p) with pull_p = sum_{j != p} t kappa_pj u_j
// and scale_c = 2 g_c / (n_c (n_c - 1)) (kappa is symmetric: both orders of each pair). One block
// per sorted row. pull (n, d) is scratch in the accumulation type; thread `tid` owns columns
// k = tid (mod kThreads) of its row throughout, so the row needs no barrier of its own.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    density_backward_rows_kernel(const A* __restrict__ us, const int64_t* __restrict__ sorted_labels,
                                 const int64_t* __restrict__ offsets, const int64_t* __restrict__ order,
                                 const A* __restrict__ grad, const A* __restrict__ norm, int64_t d,
                                 int64_t num_classes, A t, A* __restrict__ pull, T* __restrict__ dx) {
  using Reduce = cub::BlockReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  __shared__ A weight[kChunk];
  __shared__ A radial_shared;

  const int64_t p = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t i = order[p];
  const int64_t c = sorted_labels[p];
  T* dxr = dx + i * d;
  int64_t start, end;
  class_run(offsets, c, num_classes, &start, &end);
  const int64_t nc = end - start;
  if (nc < 2) {  // block-uniform, before any barrier: no pairs, no gradient
    for (int64_t k = tid; k < d; k += kThreads) dxr[k] = FromAcc<T>::cvt(A(0));
    return;
  }

  const A* up = us + p * d;
  A* pr = pull + p * d;
  for (int64_t k = tid; k < d; k += kThreads) pr[k] = A(0);
  add_pull(us, p, start, end, d, t, A(1), weight, pr);  // each column zeroed and summed by one thread

  // Normalize backward (csrc/common/normalize.h): dx = scale (g - [r > eps] <g, u> u) / max(r, eps).
  const A r = norm[i];
  A radial_part = A(0);
  if (norm_above_floor(r)) {  // block-uniform
    for (int64_t k = tid; k < d; k += kThreads) radial_part += pr[k] * up[k];
  }
  const A radial_sum = Reduce(reduce_storage).Sum(radial_part);  // valid in thread 0 only
  if (tid == 0) radial_shared = radial_sum;
  __syncthreads();
  const A radial = radial_shared;
  const A scale = A(2) * grad[c] * pair_weight<A>(nc);
  const A inv = scale / norm_floor(r);  // scale distributes over both terms, as on the CPU
  for (int64_t k = tid; k < d; k += kThreads) dxr[k] = FromAcc<T>::cvt((pr[k] - radial * up[k]) * inv);
}

// 5. du[p] += 2 grad[c] / (n_c (n_c - 1)) sum_{j != p} t kappa_pj u_j over the unit rows us, for the
// rows of classes with n_c >= 2 (the others are left as they are). One block per sorted row; the
// scale enters each weight, so the pull goes straight into du's row.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    density_pull_add_kernel(const A* __restrict__ us, const int64_t* __restrict__ sorted_labels,
                            const int64_t* __restrict__ offsets, const A* __restrict__ grad, int64_t d,
                            int64_t num_classes, A t, A* __restrict__ du) {
  __shared__ A weight[kChunk];
  const int64_t p = blockIdx.x;
  const int64_t c = sorted_labels[p];
  int64_t start, end;
  class_run(offsets, c, num_classes, &start, &end);
  const int64_t nc = end - start;
  if (nc < 2) return;  // block-uniform, before any barrier
  const A scale = A(2) * grad[c] * pair_weight<A>(nc);
  add_pull(us, p, start, end, d, t, scale, weight, du + p * d);
}

unsigned int warp_blocks(int64_t rows) {
  return static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// gridDim.x is at most 2^31 - 1; the binding rejects larger n and C with a clear message, this
// keeps a direct caller from launching a truncated grid.
bool grid_fits(int64_t n, int64_t num_classes) { return n <= INT_MAX && num_classes <= INT_MAX; }

// Steps 2 and 3 on unit rows us already sorted by label.
template <typename T, typename A>
cudaError_t density_of_sorted_rows(const A* us, const int64_t* sorted_labels, const int64_t* offsets, int64_t n,
                                   int64_t d, int64_t num_classes, A t, A* row_sum, T* density, cudaStream_t stream) {
  if (n > 0) {
    density_row_sums_kernel<A><<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(us, sorted_labels, offsets, d,
                                                                                      num_classes, t, row_sum);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (num_classes > 0) {
    class_density_reduce_kernel<T, A><<<warp_blocks(num_classes), kThreads, 0, stream>>>(row_sum, offsets,
                                                                                        num_classes, density);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace

template <typename T, typename A>
cudaError_t class_density_forward(const T* x, const int64_t* order, const int64_t* sorted_labels,
                                  const int64_t* offsets, int64_t n, int64_t d, int64_t num_classes, A t, A* norm,
                                  A* us, A* row_sum, T* density, cudaStream_t stream) {
  if (!grid_fits(n, num_classes)) return cudaErrorInvalidValue;
  if (n > 0) {
    sorted_unit_rows_kernel<T, A><<<warp_blocks(n), kThreads, 0, stream>>>(x, order, n, d, nullptr, norm, us);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return density_of_sorted_rows(us, sorted_labels, offsets, n, d, num_classes, t, row_sum, density, stream);
}

template <typename T, typename A>
cudaError_t class_density_backward(const A* grad, const T* x, const int64_t* order, const int64_t* sorted_labels,
                                   const int64_t* offsets, const A* norm, int64_t n, int64_t d, int64_t num_classes,
                                   A t, A* us, A* pull, T* dx, cudaStream_t stream) {
  if (!grid_fits(n, num_classes)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  sorted_unit_rows_kernel<T, A><<<warp_blocks(n), kThreads, 0, stream>>>(x, order, n, d, norm, nullptr, us);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  density_backward_rows_kernel<T, A><<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(
      us, sorted_labels, offsets, order, grad, norm, d, num_classes, t, pull, dx);
  return cudaGetLastError();
}

template <typename A>
cudaError_t class_density_sorted_forward(const A* us, const int64_t* sorted_labels, const int64_t* offsets, int64_t n,
                                         int64_t d, int64_t num_classes, A t, A* row_sum, A* density,
                                         cudaStream_t stream) {
  if (!grid_fits(n, num_classes)) return cudaErrorInvalidValue;
  return density_of_sorted_rows(us, sorted_labels, offsets, n, d, num_classes, t, row_sum, density, stream);
}

template <typename A>
cudaError_t class_density_sorted_pull(const A* grad, const A* us, const int64_t* sorted_labels,
                                      const int64_t* offsets, int64_t n, int64_t d, int64_t num_classes, A t, A* du,
                                      cudaStream_t stream) {
  if (!grid_fits(n, num_classes)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  density_pull_add_kernel<A><<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(us, sorted_labels, offsets, grad,
                                                                                     d, num_classes, t, du);
  return cudaGetLastError();
}

#define IDK_INSTANTIATE(T, A)                                                                                     \
  template cudaError_t class_density_forward<T, A>(const T*, const int64_t*, const int64_t*, const int64_t*,      \
                                                   int64_t, int64_t, int64_t, A, A*, A*, A*, T*, cudaStream_t);   \
  template cudaError_t class_density_backward<T, A>(const A*, const T*, const int64_t*, const int64_t*,           \
                                                    const int64_t*, const A*, int64_t, int64_t, int64_t, A, A*, A*, \
                                                    T*, cudaStream_t);
IDK_INSTANTIATE(float, float)
IDK_INSTANTIATE(double, double)
IDK_INSTANTIATE(__half, float)
IDK_INSTANTIATE(__nv_bfloat16, float)
#undef IDK_INSTANTIATE

#define IDK_INSTANTIATE_SORTED(A)                                                                               \
  template cudaError_t class_density_sorted_forward<A>(const A*, const int64_t*, const int64_t*, int64_t, int64_t, \
                                                       int64_t, A, A*, A*, cudaStream_t);                          \
  template cudaError_t class_density_sorted_pull<A>(const A*, const A*, const int64_t*, const int64_t*, int64_t,   \
                                                    int64_t, int64_t, A, A*, cudaStream_t);
IDK_INSTANTIATE_SORTED(float)
IDK_INSTANTIATE_SORTED(double)
#undef IDK_INSTANTIATE_SORTED

}  // namespace cuda
}  // namespace idid_kernels
