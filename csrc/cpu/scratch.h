// Scratch buffers of the CPU kernels kept between calls.
//
// The chunk of logits of cm_margin (up to the chunk budget, 256 MiB by default) is far above
// glibc's mmap threshold (32 MiB at most): a fresh buffer every call is a fresh mapping, and the
// kernel faults in and zeroes every page of it again (N=1024 d=256 C=50000, a 200 MiB chunk, on a
// two-core VM: 970 ms per fused step against 825 ms with the block kept). One block is kept
// instead and handed to the next call that fits in it; a call that finds it in use (another
// thread, or a reduction="none" graph whose saved logit gradients hold it until its backward:
// scratch_tensor) gets a fresh buffer. The block is
// released by idid_kernels.empty_cache() and never kept with IDID_KERNELS_KEEP_SCRATCH=0.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace idid_kernels {
namespace cpu {

// A buffer of `numel` values of `options`' dtype on the CPU for the lifetime of the lease. The
// tensor must not outlive the lease (the block goes to the next call once the lease ends).
class ScratchLease {
 public:
  ScratchLease(int64_t numel, const at::TensorOptions& options);
  ~ScratchLease();
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  const at::Tensor& tensor() const { return tensor_; }

 private:
  at::Tensor tensor_;
  bool cached_ = false;
};

// A tensor of `numel` values on the kept block that holds the block until the tensor's storage is
// freed (a fresh buffer when the block is in use or not kept): for a buffer that outlives the call,
// the logit gradients cm_margin's reduction="none" path saves from forward to backward.
at::Tensor scratch_tensor(int64_t numel, const at::TensorOptions& options);

// Bytes held by the kept block (0 when none).
int64_t scratch_bytes();
// Frees the kept block unless a call holds it; returns the bytes freed.
int64_t scratch_release();
// Whether a block is kept between calls (IDID_KERNELS_KEEP_SCRATCH, read at the first lease;
// setting it here overrides the variable). Turning it off frees the block when it is not in use.
bool scratch_keep();
void set_scratch_keep(bool keep);

}  // namespace cpu
}  // namespace idid_kernels
