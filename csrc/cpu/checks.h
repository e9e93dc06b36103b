// Defensive checks at the C++ op boundary. User-facing validation (with argument names and
// values) happens in idid_kernels/functional.py before any op runs; these catch direct op calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace idid_kernels {

inline void check_2d_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, features), got ", t.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
}

}  // namespace idid_kernels
