// GEMMs of the CPU kernels.
//
// at::mm on a CPU runs torch's BLAS (MKL in the x86 wheels). torch also carries oneDNN, whose
// float32 matmul is JIT-compiled for the CPU's instruction set whatever its vendor; MKL picks its
// kernels by vendor, and on AMD CPUs with AVX-512 it runs an AVX2 kernel: on the 2-core Zen 5 VM of
// benchmarks/results, oneDNN's float32 GEMMs of the cm/idid/pairwise shapes ran at 380-480 GFLOP/s
// against MKL's 175-215. The CPU kernels therefore multiply float32 through oneDNN where that is
// faster, decided once per process by timing both on one GEMM (engine "auto"), and through at::mm
// otherwise, for other dtypes (float64), for small products (oneDNN's call overhead, ~10 us, exceeds
// their work) and for operands oneDNN would copy (neither contiguous nor a transposed contiguous
// block). IDID_KERNELS_CPU_GEMM=aten|onednn|auto, or idid_kernels.cpu_gemm(...), picks the engine.
//
// Both engines accumulate in float32 with FMAs; their sums are ordered differently, so results
// differ by float32 rounding (~1e-7 relative), as between any two BLAS builds. torch's own float32
// matmul setting (torch.backends.mkldnn's fp32 precision) applies to oneDNN's GEMMs as to torch's.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace idid_kernels {
namespace cpu {

enum class GemmEngine : int { kAuto = 0, kAten = 1, kOneDnn = 2 };

// out = a b (out: contiguous, shape (a.size(0), b.size(1)), dtype of a and b).
void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
// out = a b in a new tensor.
at::Tensor mm(const at::Tensor& a, const at::Tensor& b);
// out += alpha a b.
void addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0);

// Sets the engine (auto, aten, onednn); throws if oneDNN is asked for but missing. The engine
// float32 GEMMs take under the setting: "aten" or "onednn" (under auto the first call times both).
void set_gemm_engine(GemmEngine engine);
const char* gemm_engine_in_use();
bool onednn_available();
// GEMMs run through oneDNN so far in this process (the engine's own timing included).
int64_t onednn_calls();

}  // namespace cpu
}  // namespace idid_kernels
