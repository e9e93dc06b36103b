// CUDA registration of the IDID-R1 ops: the device-agnostic driver (csrc/driver/idid_loss_driver.h:
// chunk loop, cuBLAS GEMMs through ATen, outputs) with its ATen policy members, the row epilogues of
// idid_loss.cu and the diversity kernels of class_density.cu. Nothing here reads device memory on the
// host: the upstream coefficients, K_2 and the class runs reach the kernels as device pointers.
// Built with CUDA, and in the CPU build under the emulator (binding_utils.h).
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../driver/idid_loss_driver.h"
#include "binding_utils.h"
#include "launchers.h"

namespace idid_kernels {
namespace {

using at::Tensor;

// The ATen members of the driver (layout, sample weights, unit rows, teacher, loss terms,
// normalisation backward) plus the CUDA kernels for the passes over rows and classes.
struct CudaPolicy : idid::AtenPolicy {
  template <typename A>
  static void forward_rows(const IdidChunk<A>& job) {
    cuda::check_launch(cuda::idid_forward_rows<A>(job, cuda::current_stream()), "idid_loss CUDA forward epilogue");
  }

  template <typename A>
  static void grad_rows(const IdidChunk<A>& job) {
    cuda::check_launch(cuda::idid_grad_rows<A>(job, cuda::current_stream()), "idid_loss CUDA gradient epilogue");
  }

  // The fused op's row pass: the two epilogues, one after the other.
  template <typename A>
  static void forward_grad_rows(const IdidChunk<A>& job) {
    forward_rows<A>(job);
    grad_rows<A>(job);
  }

  // D_c over the sorted unit rows (ignored positions carry the label C: they belong to no class).
  template <typename A>
  static Tensor class_density(const Tensor& U, const idid::Layout& L, A t, int64_t /*chunk_rows*/) {
    const int64_t B = U.size(0), d = U.size(1), C = L.num_classes;
    Tensor row_sum = at::empty({B}, U.options());
    Tensor density = at::empty({C}, U.options());
    cuda::check_launch(cuda::class_density_sorted_forward<A>(U.const_data_ptr<A>(), L.key.const_data_ptr<int64_t>(),
                                                             L.start.const_data_ptr<int64_t>(), B, d, C, t,
                                                             row_sum.mutable_data_ptr<A>(),
                                                             density.mutable_data_ptr<A>(), cuda::current_stream()),
                       "idid_loss CUDA class density");
    return density;
  }

  // dU += grad_id dL_ID/dU with L_ID = sum_c D_c / K_2: the density pull with the per-class
  // coefficient grad_id / K_2 (a device scalar broadcast to the C classes; classes without pairs
  // never read it).
  template <typename A>
  static void diversity_backward(const Tensor& U, const idid::Layout& L, A t, const Tensor& grad_id,
                                 int64_t /*chunk_rows*/, Tensor& dU) {
    const int64_t B = U.size(0), d = U.size(1), C = L.num_classes;
    const Tensor per_class =
        (grad_id / L.classes_multi.clamp_min(1).to(grad_id.scalar_type())).expand({C}).contiguous();
    cuda::check_launch(cuda::class_density_sorted_pull<A>(per_class.const_data_ptr<A>(), U.const_data_ptr<A>(),
                                                          L.key.const_data_ptr<int64_t>(),
                                                          L.start.const_data_ptr<int64_t>(), B, d, C, t,
                                                          dU.mutable_data_ptr<A>(), cuda::current_stream()),
                       "idid_loss CUDA diversity pull");
  }
};

using Ops = idid::IdidOps<CudaPolicy>;

// The diversity kernels launch one block per row and a warp per class.
void check_grid(const Tensor& x, const Tensor& proxies) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(x.dim() < 1 || x.size(0) <= kMax, "idid_loss (cuda): at most ", kMax, " rows, got ", x.size(0));
  TORCH_CHECK(proxies.dim() < 1 || proxies.size(0) <= kMax, "idid_loss (cuda): at most ", kMax, " classes, got ",
              proxies.size(0));
}

// The device guard makes every allocation and launch use the inputs' device and its current stream.
// The forward and fused ops take the same arguments: one entry point per op, Op = Ops::forward or
// Ops::fused.
using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
template <auto Op>
ForwardOutputs forward_like_cuda(const Tensor& x, const Tensor& proxies, const Tensor& similarity,
                                 const Tensor& labels, double alpha, double tau, double t, double eps,
                                 bool distillation, bool diversity, bool adaptive_weight, double diversity_weight,
                                 bool class_balanced, int64_t ignore_index, int64_t chunk_rows) {
  const cuda::DeviceGuard guard(x.device());
  check_grid(x, proxies);
  return Op(x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity, adaptive_weight,
            diversity_weight, class_balanced, ignore_index, chunk_rows);
}

std::tuple<Tensor, Tensor, Tensor> backward_cuda(const Tensor& grad_ic, const Tensor& grad_id, const Tensor& x,
                                                 const Tensor& proxies, const Tensor& labels, const Tensor& row_stats,
                                                 const Tensor& x_norm, const Tensor& w_norm,
                                                 const Tensor& teacher_log_prob, double alpha, double tau, double t,
                                                 bool distillation, bool diversity, int64_t ignore_index,
                                                 int64_t chunk_rows) {
  const cuda::DeviceGuard guard(x.device());
  check_grid(x, proxies);
  return Ops::backward(grad_ic, grad_id, x, proxies, labels, row_stats, x_norm, w_norm, teacher_log_prob, alpha, tau,
                       t, distillation, diversity, ignore_index, chunk_rows);
}

std::tuple<Tensor, Tensor, Tensor> fused_backward_cuda(const Tensor& grad_ic, const Tensor& grad_id,
                                                       const Tensor& dx_ic, const Tensor& dx_id,
                                                       const Tensor& dproxies, const Tensor& dphi,
                                                       const Tensor& labels, int64_t ignore_index,
                                                       bool similarity_grad, int64_t num_classes,
                                                       at::ScalarType dtype) {
  const cuda::DeviceGuard guard(dx_ic.device());
  return Ops::fused_backward(grad_ic, grad_id, dx_ic, dx_id, dproxies, dphi, labels, ignore_index, similarity_grad,
                             num_classes, dtype);
}

}  // namespace

IDK_CUDA_LIBRARY_IMPL(m) {
  m.impl("idid_loss_forward", &forward_like_cuda<&Ops::forward>);
  m.impl("idid_loss_backward", &backward_cuda);
  m.impl("idid_loss_fused", &forward_like_cuda<&Ops::fused>);
  m.impl("idid_loss_fused_backward", &fused_backward_cuda);
}

}  // namespace idid_kernels
