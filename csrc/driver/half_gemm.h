// GEMMs of the fused drivers (cm_margin, idid_loss) for every input dtype, through ATen.
#pragma once

#include <ATen/ATen.h>

#include "../cpu/gemm.h"

namespace idid_kernels {

// The GEMMs' operand dtype. Half inputs (bfloat16, float16) multiply in their own dtype with
// float32 accumulation and float32 output: tensor-core GEMMs on a GPU (at::mm with an out_dtype), as
// eager PyTorch and the triton backend multiply, instead of float32 GEMMs at a fraction of the rate.
// The operands are then the accumulation-dtype operands (unit rows, logit gradients) rounded to the
// half dtype, and weight gradients accumulate in float32. On the CPU the same rounded operands are
// multiplied as float32 (a product of two half values is exact in float32), so both devices compute
// the same thing. Other dtypes multiply in the accumulation dtype, unchanged. CPU GEMMs go through
// cpu/gemm.h (oneDNN or at::mm).
struct HalfGemm {
  at::ScalarType operand, acc;
  bool native;  // CUDA half inputs: half operands, float32 out_dtype

  static HalfGemm for_input(const at::Tensor& x, at::ScalarType acc) {
    const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
    return {half ? x.scalar_type() : acc, acc, half && x.is_cuda()};
  }
  // The weight as the GEMMs read it (a float32 copy only where the GEMMs run in float32).
  at::Tensor weight(const at::Tensor& w) const { return native ? w.contiguous() : w.to(acc).contiguous(); }
  // t (accumulation dtype) as a GEMM operand: rounded to the half dtype for half inputs.
  at::Tensor operand_of(const at::Tensor& t) const {
    if (operand == acc) return t;
    return native ? t.to(operand) : t.to(operand).to(acc);
  }
  void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
    if (native) {
      at::mm_out(out, a, b, acc);
    } else if (out.is_cpu()) {
      cpu::mm_out(out, a, b);
    } else {
      at::mm_out(out, a, b);
    }
  }
  at::Tensor mm(const at::Tensor& a, const at::Tensor& b) const {
    if (native) return at::mm(a, b, acc);
    return a.is_cpu() ? cpu::mm(a, b) : at::mm(a, b);
  }
  // out += alpha a b
  void addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) const {
    if (native) {
      out.add_(at::mm(a, b, acc), alpha);
    } else if (out.is_cpu()) {
      cpu::addmm_(out, a, b, alpha);
    } else {
      out.addmm_(a, b, 1, alpha);
    }
  }
};

}  // namespace idid_kernels
